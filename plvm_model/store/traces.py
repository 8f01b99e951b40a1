"""A byte-level search of stored files for what ``plvm forget`` removed: a name, and vectors.

Every file under the given folders is searched as it is stored, and a Parquet file also as its decoded
columns: its values are compressed on disk, so a name or a vector can be there without its bytes being
there. A decoded Parquet file is searched in the Arrow buffers of every column at every depth (the
strings' UTF-8 bytes, the float32 values of every list) and in its schema's metadata.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def _buffers(array: pa.Array) -> Iterable[bytes]:
    for buffer in array.buffers():
        if buffer is not None:
            yield buffer.to_pybytes()


def decoded(data: bytes) -> bytes | None:
    """A Parquet file's decoded values and metadata as one byte string; None if ``data`` is not Parquet."""
    if not data.startswith(b"PAR1"):
        return None
    try:
        table = pq.read_table(io.BytesIO(data))
    except (OSError, pa.ArrowException):
        return None
    meta = [k + b"=" + v for k, v in (table.schema.metadata or {}).items()]
    return b"\0".join([*meta, *_children(table)])


def _children(table: pa.Table) -> Iterable[bytes]:
    """The buffers of every nested array (list values, struct fields) of every column."""
    stack = [chunk for column in table.columns for chunk in column.chunks]
    while stack:
        array = stack.pop()
        if isinstance(array, pa.ListArray | pa.LargeListArray | pa.FixedSizeListArray):
            stack.append(array.values)
        elif isinstance(array, pa.StructArray):
            stack.extend(array.field(i) for i in range(array.type.num_fields))
        elif isinstance(array, pa.MapArray):
            stack.extend([array.keys, array.items])
        yield from _buffers(array)


def search(fs: fsspec.AbstractFileSystem, roots: list[str], needles: dict[str, bytes]) -> list[tuple[str, str]]:
    """Every (file, needle's label) where a needle is found in a file under ``roots`` (folders or files)."""
    found = []
    for root in roots:
        if not fs.exists(root):
            continue
        files = [root] if fs.isfile(root) else [p for p in fs.find(root) if not posixpath.basename(p) == "_lease.lock"]
        for path in files:
            data = fs.cat_file(path)
            values = decoded(data) or b""
            for label, needle in needles.items():
                if needle and (needle in data or needle in values):
                    found.append((path, label))
    return found
