"""Dataset stage 1, output rows: a slice of a caption run's output part becomes its rows, for ``plvm dataset``.

A dataset build lists its source as slices of the output's parts (``path`` the part, ``part_start`` and
``part_rows`` the slice), so that no photo's row passes through the driver. This stage reads its slice's rows
of the chosen users (the others' rows are left out), with for each the version of the user's bank that the run
which wrote it read (``bank_version``: the names in the row are that bank's) and the content hash the face index
holds for its path (``captioned_hash``: the bytes the row describes; null when the index does not know the path).
A row with an error stays one (it gives no item). ``shard`` is the slice's key, which names what it writes.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.base import Resources, RowStage, Stage
from operators.index_lookup import known_rows
from operators.rows import COLUMNS, STATS
from plvm_model.store import storage
from plvm_model.store.face_index import IndexSource
from plvm_model.store.ids import key_of
from plvm_model.store.output_table import run_of

READ = ("path", "user_id", "width", "height", "faces", "concepts", "caption", "answers", "model", "engine", "error",
        "error_kind")  # fmt: skip


def slice_key(part: str, start: int, plan: str) -> str:
    """The key of the slice of ``part`` (its file name) from row ``start``, in the build of ``plan`` (a digest)."""
    return key_of(f"{posixpath.basename(part)}:{start}:{plan}")


class OutputRows(RowStage):
    """A slice (``path``: an output part, ``part_start``, ``part_rows``) -> its rows of ``users``, each with
    ``bank_version``, ``captioned_hash`` and the slice's key ``shard``."""

    needs = ("index", "path", "part_start", "part_rows")
    adds = (*(c for c in READ if c != "path"), "shard", "bank_version", "captioned_hash")
    drops = ("part_start", "part_rows")

    def __init__(self, users: tuple[str, ...], runs: dict[str, dict[str, int]], index: IndexSource, plan: str,
                 storage_options: storage.StorageOptions | None = None) -> None:  # fmt: skip
        self.users, self.runs, self.index, self.plan = users, runs, index, plan
        self.storage_options = storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = [c for c in COLUMNS if c in ("index", *READ, *self.adds, STATS)]
        schema = pa.schema([pa.field(c, COLUMNS[c]) for c in columns])
        tables = [table.select(columns) for slice_ in batch.to_pylist() for table in self.rows(slice_)]
        return pa.concat_tables([schema.empty_table(), *tables])

    def rows(self, slice_: dict) -> list[pa.Table]:
        """The slice's rows of the chosen users, a table per user."""
        fs, path = storage.filesystem(slice_["path"], self.storage_options)
        with fs.open(path, "rb") as f:
            rows = pq.read_table(f, columns=list(READ)).slice(slice_["part_start"], slice_["part_rows"])
        rows = rows.filter(pc.is_in(rows.column("user_id"), value_set=pa.array(self.users, pa.string())))
        versions = self.runs.get(run_of(path), {})
        out = []
        for user in sorted(set(rows.column("user_id").to_pylist())):
            mine = rows.filter(pc.equal(rows.column("user_id"), user))
            indexed = known_rows(self.index, user).rows
            at = pc.index_in(mine.column("path"), value_set=indexed.column("path"))
            hashes = indexed.column("content_hash").take(at)
            n = mine.num_rows
            out.append(pa.table({
                "index": pa.array([slice_["index"]] * n, pa.int64()),
                **{c: mine.column(c).cast(COLUMNS[c]) for c in READ},
                "shard": pa.array([slice_key(path, slice_["part_start"], self.plan)] * n, pa.string()),
                "bank_version": pa.array([versions.get(user, 0)] * n, pa.int32()),
                "captioned_hash": hashes.cast(pa.string()),
                STATS: pa.nulls(n, COLUMNS[STATS]),
            }))  # fmt: skip
        self.stat_update("photos", rows.num_rows)
        return out


def stage(users: tuple[str, ...], runs: dict[str, dict[str, int]], index: IndexSource, plan: str,
          storage_options: storage.StorageOptions | None, tasks: Resources) -> Stage:  # fmt: skip
    return Stage.of("output_rows", OutputRows, (users, runs, index, plan, storage_options), tasks, keeps_rows=False)

