"""Stage 3b, align: each new face's aligned chips, the embedder's input, cut out of the photo.

The caption pipeline runs it in the detect actor's batch call (``operators.base.joined``), where the
photo's pixels are: the chips (by default two 150 px chips a face, 135 KB) go on to the embed actors
instead of the whole photo (megabytes), and the pixels never enter Ray's object store.
"""

from __future__ import annotations

from operators.base import Resources, RowStage, Stage
from operators.embed import EmbedConfig
from operators.rows import embedded, row_pixels, working_faces
from plvm_model.faces import make_embedder


class AlignFaces(RowStage):
    """pixels + faces -> chips (each face's chips, as the embedder cuts them)."""

    needs = ("pixels", "faces")
    adds = ("chips",)

    def __init__(self, config: EmbedConfig) -> None:
        self.embedder = make_embedder(config.kind, **config.options)  # loads its aligner only, not its network

    def process(self, row: dict) -> None:
        if embedded(row):  # no face, or faces from the face index
            return
        image = row_pixels(row)
        row["chips"] = [[chip.tobytes() for chip in self.embedder.chips(image, face)] for face in working_faces(row)]
        self.stat_update("faces", len(row["chips"]))


def stage(config: EmbedConfig, tasks: Resources) -> Stage:
    """Adds ``chips``, with the options of the embedder that reads them (the ``embed`` section)."""
    return Stage.of("align", AlignFaces, (config,), tasks)
