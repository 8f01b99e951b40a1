"""The face index: per user, every photo's faces (box, landmarks, score, descriptor), keyed by the photo's bytes.

``ROOT/<user_id>/part-<run_id>-<key>.parquet``, one row per photo content (photos without a
face too), in :data:`SCHEMA`. A part is written whole or not at all (a temporary sibling,
renamed) under a name fixed by its run and batch, so a retried batch rewrites the same part.
Runs only add parts (``--rebuild-index`` drops damaged ones, :meth:`FaceIndex.compact` merges a
user's parts into one per descriptor space): the *current* rows are the newest row of each
content hash, and of those the newest of each path (a path whose bytes changed has one
current content). Every part's Parquet metadata carries
``plvm.index_schema_version`` and ``plvm.embedder`` (the descriptor space); parts of another
space are not read for that space.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plvm_model.store import storage
from plvm_model.store.errors import IndexCorrupt
from plvm_model.store.ids import validate_user_id

SCHEMA_VERSION = 1
VERSION_KEY, EMBEDDER_KEY = b"plvm.index_schema_version", b"plvm.embedder"
FACE = pa.struct(
    [
        pa.field("box", pa.list_(pa.float32())),
        pa.field("score", pa.float32()),
        pa.field("landmarks", pa.list_(pa.list_(pa.float32()))),
        pa.field("descriptor", pa.list_(pa.float32())),
    ]
)
SCHEMA = pa.schema(
    [
        pa.field("content_hash", pa.string()),
        pa.field("path", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("faces", pa.list_(FACE)),
        pa.field("indexed_at", pa.timestamp("us", tz="UTC")),
        pa.field("run_id", pa.string()),
    ]
)
"""One row per photo content: its SHA-256, where it was last seen, its upright size and its faces."""


def content_hash(data: bytes) -> str:
    """The index's key of a photo: the SHA-256 (hex) of its bytes."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class BadPart:
    """A part of the index that cannot be read whole, and why."""

    user_id: str
    uri: str
    reason: str


@dataclass(frozen=True)
class Compacted:
    """What :meth:`FaceIndex.compact` did to one user's parts."""

    user_id: str
    parts_before: int
    parts_after: int
    rows: int
    """Current rows, all kept."""
    superseded: int
    """Rows dropped: older rows of a photo's bytes, or of a path whose bytes changed."""


class FaceIndex:
    """The face index at ``root`` (any fsspec URI)."""

    def __init__(self, root: str, storage_options: storage.StorageOptions | None = None) -> None:
        self.uri = root
        self.storage_options = storage_options
        self.fs, self.root = storage.filesystem(root, storage_options)

    def users(self) -> list[str]:
        """The users the index holds parts of."""
        if not self.fs.exists(self.root):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)
                      if self.fs.isdir(p))  # fmt: skip

    def parts(self, user_id: str, run_id: str = "*") -> list[str]:
        """The committed parts of ``user_id`` (of one run, if ``run_id`` is given; filesystem paths), oldest run
        first."""
        folder = posixpath.join(self.root, validate_user_id(user_id))
        return sorted(self.fs.glob(posixpath.join(folder, f"part-{run_id}-*.parquet")))

    def read_part(self, path: str, embedder: str | None = None) -> pa.Table | None:
        """One part's rows; None if it was written for another embedder than ``embedder`` (when given).
        :class:`IndexCorrupt`, naming the part, if it cannot be read whole."""
        table, space = self._load(path)
        return None if embedder is not None and space != embedder else table

    def _load(self, path: str) -> tuple[pa.Table, str]:
        """One part's rows and the descriptor space it was written for; :class:`IndexCorrupt` as ``read_part``."""
        where = storage.unstrip(self.uri, path)
        try:
            with self.fs.open(path, "rb") as f:
                table = pq.read_table(f)
        except (OSError, pa.ArrowException) as error:
            raise IndexCorrupt(f"face index part {where} is damaged: {error} (plvm caption --rebuild-index drops "
                               "it and detects its photos again)") from None  # fmt: skip
        meta = table.schema.metadata or {}
        version = meta.get(VERSION_KEY, b"").decode()
        if version != str(SCHEMA_VERSION) or not table.schema.equals(SCHEMA):
            raise IndexCorrupt(f"face index part {where} is not a face index part of schema version "
                               f"{SCHEMA_VERSION} (it says {version or 'nothing'}; plvm caption --rebuild-index "
                               "drops it)")  # fmt: skip
        return table.replace_schema_metadata(None), meta.get(EMBEDDER_KEY, b"").decode()

    def read(self, user_id: str, embedder: str | None = None, parts: list[str] | None = None) -> pa.Table:
        """The current rows of ``user_id`` (see the module) from ``parts`` (default: all of the user's), of
        the descriptor space ``embedder`` if given; :class:`IndexCorrupt` naming the first damaged part."""
        tables = [t for p in (self.parts(user_id) if parts is None else parts)
                  if (t := self.read_part(p, embedder)) is not None]  # fmt: skip
        return current(pa.concat_tables(tables) if tables else SCHEMA.empty_table())

    def check(self) -> list[BadPart]:
        """Every part of every user that cannot be read whole."""
        bad = []
        for user in self.users():
            for path in self.parts(user):
                try:
                    self.read_part(path)
                except IndexCorrupt as error:
                    bad.append(BadPart(user, storage.unstrip(self.uri, path), str(error)))
        return bad

    def drop(self, parts: list[BadPart]) -> None:
        """Remove ``parts`` (their photos are detected again by the next run)."""
        for part in parts:
            self.fs.rm(storage.filesystem(part.uri, self.storage_options)[1])

    def compact(self, user_id: str, run_id: str, change: Callable[[pa.Table], pa.Table] | None = None) -> Compacted:
        """Merge ``user_id``'s parts into one per descriptor space, ``part-<run_id>-<n>.parquet``, holding the
        current rows only (each space's rows passed through ``change`` if given: ``plvm forget``); then remove the
        parts merged. A compaction stopped between the two leaves both, whose current rows are the same (but for
        ``change``). :class:`IndexCorrupt` (nothing touched) if a part cannot be read whole."""
        parts = self.parts(user_id)
        by_space: dict[str, list[pa.Table]] = {}
        for path in parts:
            table, space = self._load(path)
            by_space.setdefault(space, []).append(table)
        merged = {space: pa.concat_tables(tables) for space, tables in sorted(by_space.items())}
        kept = {space: current(rows) for space, rows in merged.items()}
        rows = sum(t.num_rows for t in kept.values())
        superseded = sum(t.num_rows for t in merged.values()) - rows
        if change is not None:
            kept = {space: change(table) for space, table in kept.items()}
        elif len(parts) == len(kept) and not superseded:  # one part per space, of current rows only, already
            return Compacted(user_id, len(parts), len(parts), rows, 0)
        for n, (space, table) in enumerate(kept.items()):
            self.write(user_id, f"{run_id}-{n}", table, space)
        for path in parts:
            self.fs.rm(path)
        return Compacted(user_id, len(parts), len(by_space), rows, superseded)

    def write(self, user_id: str, name: str, rows: pa.Table, embedder: str,
              before_commit: Callable[[], None] | None = None) -> str:  # fmt: skip
        """Commit ``rows`` (:data:`SCHEMA`) as ``user_id``'s part ``part-<name>.parquet``, whole or not at all:
        the bytes go to a temporary sibling (which readers skip), ``before_commit`` runs (it may raise to
        commit nothing), then the part takes its name. Returns the part's URI."""
        meta = {VERSION_KEY: str(SCHEMA_VERSION).encode(), EMBEDDER_KEY: embedder.encode()}
        data = io.BytesIO()
        pq.write_table(rows.cast(SCHEMA).replace_schema_metadata(meta), data)
        final = posixpath.join(self.root, validate_user_id(user_id), f"part-{name}.parquet")
        tmp = posixpath.join(posixpath.dirname(final), f".part-{name}.{uuid.uuid4().hex[:8]}.tmp")
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        self.fs.pipe_file(tmp, data.getvalue())
        try:
            if before_commit is not None:
                before_commit()
            self.fs.mv(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
        return storage.unstrip(self.uri, final)


def current(rows: pa.Table) -> pa.Table:
    """The newest row (``indexed_at``, then ``run_id``) of each content hash, then of each path."""
    order = pc.sort_indices(rows, sort_keys=[("indexed_at", "descending"), ("run_id", "descending")])
    hashes, paths = (rows.column(key).take(order).to_pylist() for key in ("content_hash", "path"))
    seen_hashes: set[str] = set()
    seen_paths: set[str] = set()
    keep = []
    for i, digest, path in zip(order.to_pylist(), hashes, paths):
        if digest not in seen_hashes:  # the newest row of these bytes ...
            seen_hashes.add(digest)
            if path not in seen_paths:  # ... and of that path among those
                seen_paths.add(path)
                keep.append(i)
    return rows.take(pa.array(keep, pa.int64()))  # one copy of the rows kept, not one per step


@dataclass(frozen=True)
class IndexSource:
    """Where a run's stages find the face index: its root, storage options, the run's descriptor space, and the
    parts of each user the run pinned at its start (those are what the run looks photos up in)."""

    uri: str
    storage_options: storage.StorageOptions | None
    embedder: str
    pinned: dict[str, tuple[str, ...]]

    def open(self) -> FaceIndex:
        return FaceIndex(self.uri, self.storage_options)
