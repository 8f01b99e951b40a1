"""The columns a photo's row carries between stages, and per-row error capture.

Every stage takes and returns a ``pyarrow.Table`` whose columns are drawn from
:data:`COLUMNS`, so every block has the same types whatever its content (an all-null
``error`` column is still a string column). A row whose ``error`` is set passes through
the later stages untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)

FACE = pa.struct(
    [
        pa.field("box", pa.list_(pa.float32(), 4)),
        pa.field("score", pa.float32()),
        pa.field("landmarks", pa.list_(pa.list_(pa.float32(), 2), 5)),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("concept", pa.string()),
        pa.field("concept_id", pa.string()),
        pa.field("distance", pa.float32()),
        pa.field("relative_distance", pa.float32()),
    ]
)
"""A face: box (x1, y1, x2, y2) and landmarks in pixels of the original photo (after EXIF rotation)."""

INJECTED = pa.struct(
    [
        pa.field("concept_id", pa.string()),
        pa.field("name", pa.string()),
        pa.field("soft_tokens", pa.binary()),
        pa.field("head_weight", pa.binary()),
        pa.field("hidden", pa.int32()),
    ]
)
"""A concept chosen for a photo's prompt, with its float32 vectors as read from the bank."""
ANSWER = pa.struct([pa.field("question", pa.string()), pa.field("answer", pa.string())])

COLUMNS: dict[str, pa.DataType] = {
    "index": pa.int64(),
    "path": pa.string(),
    "user_id": pa.string(),
    "data": pa.binary(),
    "width": pa.int32(),
    "height": pa.int32(),
    "pixels": pa.binary(),
    "pixels_width": pa.int32(),
    "pixels_height": pa.int32(),
    "faces": pa.list_(FACE),
    "concepts": pa.list_(pa.string()),
    "injected": pa.list_(INJECTED),
    "caption": pa.string(),
    "answers": pa.list_(ANSWER),
    "model": pa.string(),
    "engine": pa.string(),
    "error": pa.string(),
    "error_kind": pa.string(),
}
"""Every column a row may carry, with its type."""


class RowError(Exception):
    """A problem with one photo: it ends that row's processing and is reported in its ``error``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def to_table(rows: list[dict[str, Any]], columns: Iterable[str]) -> pa.Table:
    schema = pa.schema([pa.field(c, COLUMNS[c]) for c in columns])
    return pa.Table.from_pylist(rows, schema=schema)


def output_columns(batch: pa.Table, add: Iterable[str] = (), drop: Iterable[str] = ()) -> list[str]:
    """The batch's columns without ``drop``, plus ``add``, in :data:`COLUMNS` order."""
    keep = (set(batch.column_names) | set(add)) - set(drop)
    return [c for c in COLUMNS if c in keep]


def fail(row: dict[str, Any], kind: str, message: str) -> None:
    row["error"], row["error_kind"] = message, kind


def for_each_row(stage: str, rows: list[dict[str, Any]], process: Callable[[dict[str, Any]], None]) -> None:
    """Run ``process`` on each row that has no error yet, turning its exceptions into row errors."""
    for row in rows:
        if row.get("error") is not None:
            continue
        try:
            process(row)
        except RowError as error:
            fail(row, error.kind, f"{row.get('path')}: {error}")
        except Exception as error:  # one photo's failure must not end the run
            log.exception("%s failed on %s", stage, row.get("path"))
            fail(row, stage, f"{row.get('path')}: {stage} failed: {type(error).__name__}: {error}")


def map_rows(
    stage: str,
    batch: pa.Table,
    process: Callable[[dict[str, Any]], None],
    add: Iterable[str] = (),
    drop: Iterable[str] = (),
) -> pa.Table:
    """Apply ``process`` to each error-free row of ``batch``; the result has ``add`` and lacks ``drop``."""
    rows = batch.to_pylist()
    for_each_row(stage, rows, process)
    return to_table(rows, output_columns(batch, [*add, "error", "error_kind"], drop))
