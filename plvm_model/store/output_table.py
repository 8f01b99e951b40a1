"""The output: a Delta Lake table of Parquet parts, one current row per photo, replaced atomically.

The folder ``OUTPUT`` holds the parts (``part-<run>-<key>.parquet``) and the table's log
(``OUTPUT/_delta_log/``, written with the ``deltalake`` package). A part is *current* when
the log says so: the write stage's tasks put each part in ``OUTPUT/_staging/<run>/``, and the
run's driver renames it to its final name and commits it to the log as soon as it arrives
(one commit per part, so a crash loses at most the parts not yet committed). A rematch,
``--retry-errors`` and ``plvm repair`` change rows with :meth:`OutputTable.replace`: the
parts that hold the rows are rewritten without them and, with the new parts, swapped in by
one commit, so a reader sees the old version or the new, never a mix. After every change
the table is vacuumed at once: files the log no longer names (replaced parts, and parts a
killed run renamed but never committed) are deleted, so a plain Parquet reader of the folder
sees the current rows too. Only one process writes at a time: it holds the output's lease
(``plvm_model.store.lease``), which is why the log needs no locking provider on S3.

An output folder without a log (written before the output was a Delta table) is read as its
part files; the first command that writes into it makes them the table's first version.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import posixpath
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, Schema
from deltalake.transaction import AddAction, CommitProperties, RemoveAction, create_table_with_add_actions

from plvm_model.store import storage
from plvm_model.store.errors import ConfigError, InputError, InputNotFound
from plvm_model.store.ids import key_of
from plvm_model.store.lease import Lease, ensure_held
from plvm_model.store.output_schema import RETRYABLE, output_schema

log = logging.getLogger(__name__)

LOG = "_delta_log"
RANDOM_WEIGHTS = "plvm.random_weights"
"""The table's property that says some of its rows were written by models with random weights (``true``)."""


def keys(table: pa.Table) -> Counter:
    """How many times each (path, user_id) occurs: an input photo's identity."""
    return Counter(zip(table.column("path").to_pylist(), table.column("user_id").to_pylist()))


def part_name(run_id: str, key: str) -> str:
    return f"part-{run_id}-{key}.parquet"


def run_of(part: str) -> str:
    """The run id in a part's name."""
    return posixpath.basename(part).removeprefix("part-").rsplit("-", 1)[0]


@dataclass(frozen=True)
class Staged:
    """A part the write stage put in staging, not yet in the table: its staged path, final name and rows."""

    staged: str
    name: str
    rows: int
    stats: list[tuple[str, float]] | None = None
    """The counts of the stages that made its rows (``operators.rows.STATS``)."""


@dataclass(frozen=True)
class Duplicate:
    """A committed row that ``plvm repair`` removed: a second row of the same photo."""

    path: str
    user_id: str
    part: str
    run_id: str
    error: bool
    """Whether the removed row was an error row."""


class OutputTable:
    """The output folder ``uri``: its Delta table of parts, staging and run records."""

    def __init__(self, uri: str, storage_options: storage.StorageOptions | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options
        self.fs, self.root = storage.filesystem(uri, storage_options)

    @cached_property
    def _table_uri(self) -> str:
        return self.uri if "://" in self.uri else storage.normalize(self.uri)

    @cached_property
    def _delta_options(self) -> dict[str, str]:
        return storage.object_store_options(self.uri, self.storage_options)

    def lease(self, run_id: str, command: str, expiry_s: float) -> Lease:
        """The folder's lease for ``run_id`` (see :mod:`plvm_model.store.lease`); use it as a context manager."""
        return Lease.take(self.fs, self.root, self.uri, run_id, command, expiry_s)

    def is_table(self) -> bool:
        return self.fs.exists(posixpath.join(self.root, LOG))

    def holds_random_weights(self) -> bool:
        """Whether the table's metadata says that rows written by models with random weights are in it (set by
        such a command, cleared only when a command without them overwrites the table)."""
        return self.is_table() and self._delta().metadata().configuration.get(RANDOM_WEIGHTS) == "true"

    def _delta(self) -> DeltaTable:
        return DeltaTable(self._table_uri, storage_options=self._delta_options)

    def staging(self, run_id: str) -> str:
        return posixpath.join(self.root, "_staging", run_id)

    def part_files(self, run_id: str = "*") -> list[str]:
        """The current parts (of one run, if ``run_id`` is given): those the log names, or in a folder without a
        log, its part files."""
        pattern = part_name(run_id, "*")
        if not self.is_table():
            return sorted(self.fs.glob(posixpath.join(self.root, pattern)))
        names = self._delta().get_add_actions().column("path").to_pylist()
        return sorted(posixpath.join(self.root, n) for n in names if fnmatch.fnmatch(n, pattern))

    def version(self) -> int | None:
        """The table's version (None: a folder of parts without a log)."""
        return self._delta().version() if self.is_table() else None

    def part_rows(self) -> list[tuple[str, int]]:
        """Each current part with its rows: from the log's statistics, else (a folder without a log, a part
        committed without them) from the part's footer."""
        counted: dict[str, int] = {}
        if self.is_table():
            actions = self._delta().get_add_actions(flatten=True)
            if "num_records" in actions.column_names:
                names = actions.column("path").to_pylist()
                counted = {posixpath.join(self.root, n): r for n, r in zip(names, actions.column("num_records").to_pylist())
                           if r is not None}  # fmt: skip
        out = []
        for path in self.part_files():
            if path not in counted:
                with self.fs.open(path, "rb") as f:
                    counted[path] = pq.read_metadata(f).num_rows
            out.append((path, int(counted[path])))
        return out

    def run_record(self, run_id: str) -> dict | None:
        """What run ``run_id`` recorded at its end (``_runs/<run_id>.json``; see :meth:`record`), or None."""
        path = posixpath.join(self.root, "_runs", f"{run_id}.json")
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def read(self, columns: list[str] | None = None, run_id: str = "*") -> pa.Table:
        """The current rows (of one run, if ``run_id`` is given), with ``columns`` only if given."""
        tables = [self.read_part(path, columns) for path in self.part_files(run_id)]
        if not tables:
            empty = output_schema().empty_table()
            return empty if columns is None else empty.select(columns)
        return pa.concat_tables(tables, promote_options="permissive")

    def read_part(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    # Writing: only under the output's lease.

    def open(self, schema: pa.Schema, overwrite: bool = False) -> None:
        """Make the folder a table of ``schema`` if it is not one (its part files, if any, become the first
        version); with ``overwrite``, a version without rows. A table of another schema is refused unless
        ``overwrite`` (the faces' ``embedding`` comes and goes with ``output.face_embeddings``)."""
        if not self.is_table():
            parts = self.part_files()
            if parts:
                log.warning("%s: made its %d part files the first version of its Delta table", self.uri, len(parts))
            adds = [self._add(posixpath.basename(p)) for p in parts]
            create_table_with_add_actions(self._table_uri, Schema.from_arrow(schema), adds, mode="append",
                                          storage_options=self._delta_options)  # fmt: skip
        table = self._delta()
        if overwrite:
            table.create_write_transaction([], "overwrite", schema, commit_properties=_commit("overwrite"))
            self.vacuum()
            if self.fs.exists(posixpath.join(self.root, "_runs")):
                self.fs.rm(posixpath.join(self.root, "_runs"), recursive=True)
        elif table.schema() != Schema.from_arrow(schema):
            embeddings = "embedding" in schema.field("faces").type.value_type.names
            raise ConfigError(
                f"output.face_embeddings is {str(embeddings).lower()}, but {self.uri} holds rows "
                f"{'without' if embeddings else 'with'} face embeddings: write into it with the same setting, or "
                "pass --overwrite"
            )

    def prepare(self, schema: pa.Schema, overwrite: bool = False, random_weights: bool = False) -> list[str]:
        """What every command that writes into the output does first, under its lease: remove what killed
        commands left (staging folders, and parts renamed but never committed), :meth:`open` the table, and
        with ``random_weights`` (a command whose models have random weights) mark it so
        (:meth:`holds_random_weights`). The paths removed, each logged."""
        removed = self.discard_staging()
        self.open(schema, overwrite=overwrite)
        marked = self.holds_random_weights()
        if random_weights != marked and (random_weights or overwrite):  # a mark goes only with the rows it marks
            mark = {RANDOM_WEIGHTS: str(random_weights).lower()}
            self._delta().alter.set_table_properties(mark, raise_if_not_exists=False, commit_properties=_commit("mark"))
        removed += self.vacuum()
        for path in removed:
            log.warning("%s: removed %s, left by a command that did not finish", self.uri, path)
        return removed

    def _add(self, name: str, rows: int | None = None) -> AddAction:
        """The add action of the part ``name`` in the folder (its rows read from its footer unless given)."""
        path = posixpath.join(self.root, name)
        if rows is None:
            with self.fs.open(path, "rb") as f:
                rows = pq.read_metadata(f).num_rows
        stats = json.dumps({"numRecords": rows})
        return AddAction(name, self.fs.size(path), {}, int(time.time() * 1000), True, stats)

    def _publish(self, staged: Iterable[Staged], run_id: str) -> list[AddAction]:
        """Rename staged parts to their final names (checking the lease first); their add actions."""
        adds = []
        for part in staged:
            ensure_held(self.fs, self.root, self.uri, run_id, f"part {part.name}")
            self.fs.mv(part.staged, posixpath.join(self.root, part.name))
            adds.append(self._add(part.name, part.rows))
        return adds

    def commit(self, staged: list[Staged], run_id: str) -> list[str]:
        """Add ``staged`` parts to the table in one commit; their final URIs."""
        adds = self._publish(staged, run_id)
        if adds:
            table = self._delta()
            table.create_write_transaction(adds, "append", table.schema(), commit_properties=_commit("append", run_id))
        return [storage.join(self.uri, a.path) for a in adds]

    def replace(self, drop: dict[str, pa.Array], staged: list[Staged], run_id: str, operation: str) -> int | None:
        """One commit that removes the rows where ``drop[part]`` is true (each such part is rewritten without
        them, under a new name of the run that wrote it) and adds the ``staged`` parts; then the table is
        vacuumed (which commits too when it deletes files). The version of the commit (None: nothing to do)."""
        rewritten, removes = [], []
        for part, mask in drop.items():
            if not pc.any(mask).as_py():
                continue
            name = posixpath.basename(part)
            removes.append(RemoveAction(name, True, int(time.time() * 1000)))
            kept = self.read_part(part).filter(pc.invert(mask))
            if kept.num_rows:
                data = io.BytesIO()
                pq.write_table(kept, data)
                path = posixpath.join(self.staging(run_id), f"{uuid.uuid4().hex}.tmp")
                self.fs.makedirs(self.staging(run_id), exist_ok=True)
                self.fs.pipe_file(path, data.getvalue())
                # the rows keep the name of the run that wrote them, under a new key
                key = key_of(f"{name} {run_id}")
                rewritten.append(Staged(path, part_name(run_of(name), key), kept.num_rows))
        if not removes and not staged:
            return None
        adds = self._publish([*rewritten, *staged], run_id)
        table = self._delta()
        table.create_write_transaction([*removes, *adds], "append", table.schema(),
                                       commit_properties=_commit(operation, run_id))  # fmt: skip
        table.update_incremental()
        version = table.version()
        self.vacuum()
        if self.fs.exists(self.staging(run_id)):
            self.fs.rm(self.staging(run_id), recursive=True)
        return version

    def vacuum(self) -> list[str]:
        """Delete the files the log does not name (replaced parts, parts a killed run never committed); the
        ``_`` folders (staging, run records, the face index) are left alone. The names of the files deleted
        (delta-rs also lists the replaced parts that an earlier vacuum deleted: those are left out)."""
        table = self._delta()
        names = {posixpath.basename(f) for f in table.vacuum(retention_hours=0, enforce_retention_duration=False,
                                                             full=True)}  # fmt: skip
        present = sorted(n for n in names if self.fs.exists(posixpath.join(self.root, n)))
        table.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False, full=True)
        return present

    def drop_retryable(self, run_id: str) -> int:
        """Remove the rows whose error is retryable (``--retry-errors``), in one commit. The photos are then
        missing, so the resumed run writes them again."""
        retryable = pa.array(RETRYABLE)
        drop = {}
        for path in self.part_files():
            kinds = self.read_part(path, ["error_kind"]).column("error_kind")
            drop[path] = pc.fill_null(pc.is_in(kinds, value_set=retryable), False)
        self.replace(drop, [], run_id, "retry-errors")
        return sum(pc.sum(mask).as_py() or 0 for mask in drop.values())

    def deduplicate(self, run_id: str) -> list[Duplicate]:
        """Keep one current row per photo (path, user_id), remove the others in one commit (``plvm repair``).

        The row kept is one without an error if there is one, then the newest run's (run ids begin with
        their start time).
        """
        rows: list[tuple[tuple[str, str], tuple[bool, str], str, int]] = []  # photo, rank, part, row
        sizes: dict[str, int] = {}
        for part in self.part_files():
            table = self.read_part(part, ["path", "user_id", "error"])
            sizes[part] = table.num_rows
            for i, (path, user, error) in enumerate(zip(*(table.column(c).to_pylist() for c in table.column_names))):
                rows.append(((path, user), (error is None, run_of(part)), part, i))
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
        masks = {p: pa.array([i in rows_ for i in range(sizes[p])], pa.bool_()) for p, rows_ in drop.items()}
        self.replace(masks, [], run_id, "repair")
        return removed

    def discard_staging(self) -> list[str]:
        """Remove what interrupted runs left in ``_staging`` (never visible output); returns the folders."""
        base = posixpath.join(self.root, "_staging")
        stale = self.fs.ls(base, detail=False) if self.fs.exists(base) else []
        for path in stale:
            self.fs.rm(path, recursive=True)
        return stale

    def record(self, run_id: str, summary: dict, metrics: bytes | None = None) -> None:
        """Write ``_runs/<run_id>.json`` (and its ``metrics``, Prometheus' text format, to ``_runs/<run_id>.prom``),
        and drop the run's staging folder."""
        runs = posixpath.join(self.root, "_runs")
        if metrics is not None:
            storage.write_atomic(self.fs, posixpath.join(runs, f"{run_id}.prom"), metrics)
        storage.write_atomic(self.fs, posixpath.join(runs, f"{run_id}.json"), json.dumps(summary, indent=1).encode())
        if self.fs.exists(self.staging(run_id)):
            self.fs.rm(self.staging(run_id), recursive=True)


def _commit(operation: str, run_id: str | None = None) -> CommitProperties:
    """The commit's record in the log: what made it, and which run."""
    return CommitProperties(custom_metadata={"plvm.operation": operation, "plvm.run_id": run_id or ""})


def read_output(uri: str, storage_options: storage.StorageOptions | None = None, columns=None) -> pa.Table:
    """The current rows under ``uri``."""
    return OutputTable(uri, storage_options).read(columns)


def caption_rows(results: str, storage_options: storage.StorageOptions | None) -> pa.Table:
    """The rows of a caption run's output (a folder of part files, or one Parquet file), sorted by path.

    An output that does not exist, or a folder without a part file, is an error naming it, not an
    empty table: a mistyped output would otherwise be an empty report and exit 0.
    """
    fs, path = storage.filesystem(results, storage_options)
    if not fs.exists(path):
        raise InputNotFound(f"{results} does not exist (give a caption run's output folder or one of its part files)")
    if fs.isfile(path):
        if not path.endswith(".parquet"):
            raise InputError(f"{results} is a file, not a caption run's output folder or Parquet part")
        table = pq.read_table(io.BytesIO(fs.cat_file(path)))
    else:
        folder = OutputTable(results, storage_options)
        if not folder.part_files():
            raise InputError(f"{results} holds no rows: no part-*.parquet file (is it a caption run's output?)")
        table = folder.read()
    return table.sort_by("path")
