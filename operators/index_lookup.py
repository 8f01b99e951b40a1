"""Stage 1b, index lookup: a photo whose bytes the user's face index already holds takes its faces from there.

Such a row gets ``faces`` (each with its descriptor as ``embedding``), ``width`` and
``height`` from the index, so decode (for the faces), detect and embed pass it by; its
``indexed`` is true when the index knows it under this path (else the index stage records
the new path). Other rows keep ``faces`` null. The index is read at the parts the run pinned
at its start, once per worker process and user.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from operators.base import Resources, RowStage, Stage
from operators.rows import as_row_faces
from plvm_model.store.face_index import SCHEMA, IndexSource


@dataclass(frozen=True)
class _Known:
    """A user's current index rows (content_hash, path, width, height, faces as rows' faces), held column by column
    (an archive of a million photos takes about a GB, not a Python object per face), and each content hash's row."""

    rows: pa.Table
    at: dict[str, int]

    def get(self, content_hash: str) -> dict | None:
        i = self.at.get(content_hash)
        return None if i is None else self.rows.slice(i, 1).to_pylist()[0]


_CACHE: dict[tuple[str, str, tuple[str, ...]], _Known] = {}
"""What this worker process read: (index root, user, pinned parts) -> the user's current rows."""


def known_rows(source: IndexSource, user_id: str) -> _Known:
    """The current index rows of ``user_id``, at the parts the run pinned."""
    parts = source.pinned.get(user_id, ())
    key = (source.uri, user_id, parts)
    if key not in _CACHE:
        if len(_CACHE) >= 8:
            _CACHE.clear()
        rows = source.open().read(user_id, source.embedder, parts=list(parts)) if parts else SCHEMA.empty_table()
        rows = rows.select(["content_hash", "path", "width", "height", "faces"])
        rows = rows.set_column(4, "faces", as_row_faces(rows.column("faces")))
        _CACHE[key] = _Known(rows, {h: i for i, h in enumerate(rows.column("content_hash").to_pylist())})
    return _CACHE[key]


class IndexLookup(RowStage):
    """content_hash + user_id -> faces, width, height and indexed, for photos the index holds."""

    needs = ("path", "user_id", "content_hash")
    adds = ("width", "height", "faces", "indexed")

    def __init__(self, source: IndexSource) -> None:
        self.source = source

    def process(self, row: dict) -> None:
        found = known_rows(self.source, row["user_id"]).get(row["content_hash"])
        row["indexed"] = found is not None and found["path"] == row["path"]
        if found is not None:
            row["width"], row["height"], row["faces"] = found["width"], found["height"], found["faces"]
            self.stat_update("known")


def stage(source: IndexSource, tasks: Resources) -> Stage:
    return Stage.of("index_lookup", IndexLookup, (source,), tasks)
