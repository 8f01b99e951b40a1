"""Stage 4, embed: one descriptor per face (dlib by default; any ``FaceEmbedder``)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from operators.base import Resources, Stage, StageConfig
from operators.rows import map_rows, row_pixels, working_faces
from plvm_model.faces import make_embedder


class EmbedConfig(StageConfig):
    kind: str = Field("dlib", description="The face embedder (`dlib`: dlib's 128-d ResNet descriptor).")
    options: dict[str, Any] = Field(
        {},
        description="Passed to the embedder; empty: its own defaults. dlib's: `alignment` (`dlib`, `landmarks` or "
        "`both`), `flip` (also the mirror image), `num_jitters`, `padding`.",
    )
    resources: Resources = Field(Resources(), description="The embedder actors.")


class EmbedFaces:
    """pixels + faces -> each face's ``embedding``."""

    def __init__(self, config: EmbedConfig) -> None:
        # dlib runs without torch: this actor does not import it (seconds of CPU per actor)
        self.embedder = make_embedder(config.kind, **config.options)

    def _embed(self, row: dict) -> None:
        if all(face.get("embedding") is not None for face in row["faces"] or []):  # none, or from the face index
            return
        vectors = self.embedder.embed(row_pixels(row), working_faces(row))
        for face, vector in zip(row["faces"], vectors):
            face["embedding"] = vector.tolist()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows(batch, self._embed)


def stage(config: EmbedConfig) -> Stage:
    """Adds each face's ``embedding`` (inside ``faces``)."""
    return Stage("embed", EmbedFaces, (config,), config.resources, needs=("pixels", "faces"), actors=True)
