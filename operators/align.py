"""Stage 3b, align: each new face's aligned chips, the embedder's input, cut out of the photo.

The caption pipeline runs it in the detect actor's batch call (``pipelines.stages.joined``), where the
photo's pixels are: the chips (by default two 150 px chips a face, 135 KB) go on to the embed actors
instead of the whole photo (megabytes), and the pixels never enter Ray's object store.
"""

from __future__ import annotations

import pyarrow as pa

from operators.base import Resources, Stage
from operators.embed import EmbedConfig
from operators.rows import embedded, map_rows, row_pixels, working_faces
from plvm_model.faces import make_embedder


class AlignFaces:
    """pixels + faces -> chips (each face's chips, as the embedder cuts them)."""

    def __init__(self, config: EmbedConfig) -> None:
        self.embedder = make_embedder(config.kind, **config.options)  # loads its aligner only, not its network

    def _align(self, row: dict) -> None:
        if embedded(row):  # no face, or faces from the face index
            return
        image = row_pixels(row)
        row["chips"] = [[chip.tobytes() for chip in self.embedder.chips(image, face)] for face in working_faces(row)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows(batch, self._align, add=["chips"])


def stage(config: EmbedConfig, tasks: Resources) -> Stage:
    """Adds ``chips``, with the options of the embedder that reads them (the ``embed`` section)."""
    return Stage("align", AlignFaces, (config,), tasks, needs=("pixels", "faces"), adds=("chips",))
