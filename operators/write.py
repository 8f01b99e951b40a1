"""Stage 8, write: rows in the output schema, committed part by part, each photo exactly once.

Each write task turns its batch into one Parquet part: the bytes go to
``OUTPUT/_staging/<run>/`` first and are then renamed to ``OUTPUT/part-<run>-<key>.parquet``,
so a part appears whole or not at all (readers of ``OUTPUT`` skip ``_`` folders, as
pyarrow, pandas, Ray and Spark do). ``<key>`` is a hash of the input positions of the
part's photos: a task that Ray retries after a worker died writes the same name again,
never a second copy. A run that crashes leaves its committed parts, which ``--resume``
keeps, and staging debris, which the next run removes. At the end the run checks that
the output holds each listed photo exactly once and records itself in ``OUTPUT/_runs/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from operators.base import Resources, Stage, StageConfig
from operators.rows import OUTPUT, RETRYABLE, output_schema
from plvm_model import storage
from plvm_model.errors import LeaseLost
from plvm_model.lease import Lease, held_by


class OutputConfig(StageConfig):
    uri: str | None = Field(
        None, description="The output folder: a local path or an `s3://` URI (the two on which it can be leased)."
    )
    face_embeddings: bool = Field(False, description="Also write each face's descriptor.")
    rows_per_file: int = Field(
        1000,
        ge=1,
        description="Rows per Parquet part: the unit of commit (a crash loses at most the parts being written).",
    )
    lease_expiry_s: float = Field(
        120.0,
        gt=0,
        description="A run's lease on the output (`_lease.json`, heartbeat every quarter of this) is stale, and "
        "may be taken over by another run, when its heartbeat is older than this.",
    )


def new_run_id() -> str:
    """A run's id: its start time (UTC, so ids sort by age) and a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def keys(table: pa.Table) -> Counter:
    """How many times each (path, user_id) occurs: an input photo's identity."""
    return Counter(zip(table.column("path").to_pylist(), table.column("user_id").to_pylist()))


@dataclass(frozen=True)
class Duplicate:
    """A committed row that ``plvm repair`` removed: a second row of the same photo."""

    path: str
    user_id: str
    part: str
    run_id: str
    error: bool
    """Whether the removed row was an error row."""


class OutputFolder:
    """The output folder ``uri``: its committed parts, staging and run records."""

    def __init__(self, uri: str, storage_options: storage.StorageOptions | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options
        self.fs, self.root = storage.filesystem(uri, storage_options)

    def lease(self, run_id: str, command: str, expiry_s: float) -> Lease:
        """The folder's lease for ``run_id`` (see :mod:`plvm_model.lease`); use it as a context manager."""
        return Lease.take(self.fs, self.root, self.uri, run_id, command, expiry_s)

    def staging(self, run_id: str) -> str:
        return posixpath.join(self.root, "_staging", run_id)

    def part_files(self, run_id: str = "*") -> list[str]:
        return sorted(self.fs.glob(posixpath.join(self.root, f"part-{run_id}-*.parquet")))

    def read(self, columns: list[str] | None = None, run_id: str = "*") -> pa.Table:
        """The committed rows (of one run, if ``run_id`` is given), with ``columns`` only if given."""
        tables = []
        for path in self.part_files(run_id):
            with self.fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        if not tables:
            empty = output_schema().empty_table()
            return empty if columns is None else empty.select(columns)
        return pa.concat_tables(tables, promote_options="permissive")

    def clear(self) -> None:
        """Remove every earlier run's output (``--overwrite``)."""
        for path in self.part_files():
            self.fs.rm(path)
        for folder in ("_runs", "_staging"):
            if self.fs.exists(posixpath.join(self.root, folder)):
                self.fs.rm(posixpath.join(self.root, folder), recursive=True)

    def drop_retryable(self) -> int:
        """Remove the rows whose error is retryable (``--retry-errors``): each part that holds some is
        rewritten without them. The photos are then missing, so a resumed run writes them again; a crash in
        between loses no photo."""
        retryable = pa.array(RETRYABLE)
        dropped = 0
        for path in self.part_files():
            with self.fs.open(path, "rb") as f:  # the error kinds first: most parts have no retryable row
                kinds = pq.read_table(f, columns=["error_kind"]).column("error_kind")
            drop = pc.fill_null(pc.is_in(kinds, value_set=retryable), False)
            dropped += self._drop_rows(path, drop)
        return dropped

    def deduplicate(self) -> list[Duplicate]:
        """Keep one committed row per photo (path, user_id), remove the others (``plvm repair``).

        The row kept is one without an error if there is one, then the newest run's (run ids begin with
        their start time). Each part holding a removed row is rewritten without it; the kept rows are
        never touched, so a crash part-way leaves every photo at least once and a second repair finishes.
        """
        rows: list[tuple[tuple[str, str], tuple[bool, str], str, int]] = []  # photo, rank, part, row
        sizes: dict[str, int] = {}
        for part in self.part_files():
            with self.fs.open(part, "rb") as f:
                table = pq.read_table(f, columns=["path", "user_id", "error"])
            sizes[part] = table.num_rows
            run = posixpath.basename(part).removeprefix("part-").rsplit("-", 1)[0]
            for i, (path, user, error) in enumerate(zip(*(table.column(c).to_pylist() for c in table.column_names))):
                rows.append(((path, user), (error is None, run), part, i))
        best: dict[tuple[str, str], tuple[tuple[bool, str], str, int]] = {}
        for photo, rank, part, i in rows:
            if photo not in best or rank > best[photo][0]:
                best[photo] = (rank, part, i)
        removed: list[Duplicate] = []
        drop: dict[str, set[int]] = {}
        for photo, (clean, run), part, i in rows:
            if best[photo][1:] != (part, i):
                removed.append(Duplicate(*photo, storage.unstrip(self.uri, part), run, not clean))
                drop.setdefault(part, set()).add(i)
        for part, indices in drop.items():
            self._drop_rows(part, pa.array([i in indices for i in range(sizes[part])], pa.bool_()))
        return removed

    def _drop_rows(self, path: str, drop: pa.Array) -> int:
        """Rewrite the part ``path`` without the rows where ``drop`` is true, atomically under its own name
        (a part left empty is removed); how many rows were dropped."""
        n = pc.sum(drop).as_py() or 0
        if n and n == len(drop):
            self.fs.rm(path)
        elif n:
            with self.fs.open(path, "rb") as f:
                kept = pq.read_table(f).filter(pc.invert(drop))
            data = io.BytesIO()
            pq.write_table(kept, data)
            storage.write_atomic(self.fs, path, data.getvalue())
        return n

    def discard_staging(self) -> list[str]:
        """Remove what interrupted runs left in ``_staging`` (never visible output); returns the folders."""
        base = posixpath.join(self.root, "_staging")
        stale = self.fs.ls(base, detail=False) if self.fs.exists(base) else []
        for path in stale:
            self.fs.rm(path, recursive=True)
        return stale

    def record(self, run_id: str, summary: dict) -> None:
        """Write ``_runs/<run_id>.json`` and drop the run's staging folder."""
        path = posixpath.join(self.root, "_runs", f"{run_id}.json")
        storage.write_atomic(self.fs, path, json.dumps(summary, indent=1).encode())
        if self.fs.exists(self.staging(run_id)):
            self.fs.rm(self.staging(run_id), recursive=True)


def read_output(uri: str, storage_options: storage.StorageOptions | None = None, columns=None) -> pa.Table:
    """All committed rows under ``uri``."""
    return OutputFolder(uri, storage_options).read(columns)


@dataclass
class WriteParts:
    """Internal rows -> one committed Parquet part per batch; returns (file, rows) per part."""

    uri: str
    run_id: str
    storage_options: storage.StorageOptions | None = None
    face_embeddings: bool = False

    def __post_init__(self) -> None:
        self.schema = output_schema(self.face_embeddings)
        self.face_fields = [f.name for f in self.schema.field("faces").type.value_type]

    def to_output(self, batch: pa.Table) -> pa.Table:
        """The batch in the output schema: working columns dropped, missing ones null."""
        rows = batch.select([c for c in batch.column_names if c in OUTPUT]).to_pylist()
        for row in rows:
            row["faces"] = [{k: face.get(k) for k in self.face_fields} for face in row.get("faces") or []]
        return pa.Table.from_pylist(rows, schema=self.schema)

    def __call__(self, batch: pa.Table) -> pa.Table:
        folder = OutputFolder(self.uri, self.storage_options)
        positions = ",".join(map(str, sorted(batch.column("index").to_pylist())))
        key = hashlib.sha1(positions.encode()).hexdigest()[:20]
        final = posixpath.join(folder.root, f"part-{self.run_id}-{key}.parquet")
        data = io.BytesIO()
        pq.write_table(self.to_output(batch), data)
        staged = posixpath.join(folder.staging(self.run_id), f"{key}.{uuid.uuid4().hex[:8]}.tmp")
        folder.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
        folder.fs.pipe_file(staged, data.getvalue())
        if not held_by(folder.fs, folder.root, self.run_id):  # taken over: commit nothing beside the new holder
            raise LeaseLost(f"run {self.run_id} no longer holds the lease of {self.uri}; part {key} not committed")
        folder.fs.mv(staged, final)  # a retried task renames identical bytes onto the same name
        return pa.table({"file": [storage.unstrip(self.uri, final)], "rows": [batch.num_rows]})


def stage(config: OutputConfig, run_id: str, storage_options: storage.StorageOptions | None, tasks: Resources,
          parts: int) -> Stage:  # fmt: skip
    """One task per part (``rows_per_file`` rows): its rows become one committed file, and the stage's
    rows are the parts written (file, rows), not the photos."""
    concurrency = min(tasks.concurrency, parts)
    resources = tasks.model_copy(update={"batch_size": config.rows_per_file, "concurrency": concurrency})
    args = (config.uri, run_id, storage_options, config.face_embeddings)
    return Stage(
        "write", WriteParts, args, resources, needs=("index", *OUTPUT), adds=("file", "rows"), keeps_rows=False
    )
