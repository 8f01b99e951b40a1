"""Stage 4, embed: one descriptor per face (dlib by default; any ``FaceEmbedder``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from operators.base import Resources, RowStage, Stage, StageConfig
from operators.rows import embedded
from plvm_model.faces import make_embedder


class EmbedConfig(StageConfig):
    kind: str = Field("dlib", description="The face embedder (`dlib`: dlib's 128-d ResNet descriptor).")
    options: dict[str, Any] = Field(
        {},
        description="Passed to the embedder; empty: its own defaults. dlib's: `alignment` (`dlib`, `landmarks` or "
        "`both`), `flip` (also the mirror image), `num_jitters`, `padding`.",
    )
    resources: Resources = Field(Resources(), description="The embedder actors.")


class EmbedFaces(RowStage):
    """chips -> each face's ``embedding`` (inside ``faces``); the chips go."""

    needs = ("faces", "chips")
    drops = ("chips",)

    def __init__(self, config: EmbedConfig) -> None:
        # dlib runs without torch: this actor does not import it (seconds of CPU per actor)
        self.embedder = make_embedder(config.kind, **config.options)

    def process(self, row: dict) -> None:
        if embedded(row):  # no face, or faces from the face index
            return
        shape = self.embedder.chip_shape
        chips = [[np.frombuffer(chip, np.uint8).reshape(shape) for chip in face] for face in row["chips"]]
        for face, vector in zip(row["faces"], self.embedder.describe(chips), strict=True):
            face["embedding"] = vector.tolist()
        self.stat_update("faces", len(chips))


def stage(config: EmbedConfig) -> Stage:
    """Adds each face's ``embedding`` (inside ``faces``) from the chips of the align stage, which it drops."""
    return Stage.of("embed", EmbedFaces, (config,), config.resources, actors=True)
