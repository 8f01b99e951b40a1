"""Stage 1b, index lookup: a photo whose bytes the user's face index already holds takes its faces from there.

Such a row gets ``faces`` (each with its descriptor as ``embedding``), ``width`` and
``height`` from the index, so decode (for the faces), detect and embed pass it by; its
``indexed`` is true when the index knows it under this path (else the index stage records
the new path). Other rows keep ``faces`` null. The index is read at the parts the run pinned
at its start, once per worker process and user.
"""

from __future__ import annotations

import pyarrow as pa

from operators.base import Resources, Stage
from operators.rows import map_rows
from plvm_model.face_index import IndexSource

_CACHE: dict[tuple[str, str, tuple[str, ...]], dict[str, dict]] = {}
"""What this worker process read: (index root, user, pinned parts) -> content_hash -> current row."""


def _known(source: IndexSource, user_id: str) -> dict[str, dict]:
    """content_hash -> the current index row of ``user_id``, at the parts the run pinned."""
    parts = source.pinned.get(user_id, ())
    key = (source.uri, user_id, parts)
    if key not in _CACHE:
        if len(_CACHE) >= 8:
            _CACHE.clear()
        rows = source.open().read(user_id, source.embedder, parts=list(parts)) if parts else None
        _CACHE[key] = {} if rows is None else {row["content_hash"]: row for row in rows.to_pylist()}
    return _CACHE[key]


class IndexLookup:
    """content_hash + user_id -> faces, width, height and indexed, for photos the index holds."""

    def __init__(self, source: IndexSource) -> None:
        self.source = source

    def _lookup(self, row: dict) -> None:
        found = _known(self.source, row["user_id"]).get(row["content_hash"])
        row["indexed"] = found is not None and found["path"] == row["path"]
        if found is not None:
            row["width"], row["height"] = found["width"], found["height"]
            row["faces"] = [{"box": f["box"], "score": f["score"], "landmarks": f["landmarks"],
                             "embedding": f["descriptor"]} for f in found["faces"]]  # fmt: skip

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows(batch, self._lookup, add=["width", "height", "faces", "indexed"])


def stage(source: IndexSource, tasks: Resources) -> Stage:
    return Stage("index_lookup", IndexLookup, (source,), tasks, needs=("path", "user_id", "content_hash"),
                 adds=("width", "height", "faces", "indexed"))  # fmt: skip
