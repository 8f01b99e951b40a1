"""Stage 8, write: rows in the output schema, one staged Parquet part per batch, for the driver to commit.

Each write task turns its batch into one Parquet part in ``OUTPUT/_staging/<run>/`` (readers
of ``OUTPUT`` skip ``_`` folders). The run's driver renames each part to
``OUTPUT/part-<run>-<key>.parquet`` and commits it to the output's Delta table
(``plvm_model.store.output_table``) as it arrives. ``<key>`` is a hash of the input positions of
the part's photos: a task that Ray retries after a worker died makes the same name again,
never a second copy. A run that crashes leaves its committed parts, which ``--resume``
keeps, and staging debris, which the next run removes. At the end the run checks that
the output holds each listed photo exactly once and records itself in ``OUTPUT/_runs/``.
"""

from __future__ import annotations

import io
import posixpath
import uuid
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from operators.base import Resources, RowStage, Stage, StageConfig
from operators.rows import COLUMNS, STATS, stats_of, with_stats
from plvm_model.store import storage
from plvm_model.store.ids import batch_key
from plvm_model.store.output_schema import OUTPUT, output_schema
from plvm_model.store.output_table import OutputTable, part_name


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

    def parts(self, rows: int) -> int:
        """How many parts a run of ``rows`` photos writes (at least one)."""
        return max(1, -(-rows // self.rows_per_file))


@dataclass
class WriteParts(RowStage):
    """Internal rows -> one staged Parquet part per batch; returns (staged path, final name, rows, stats) per part.

    The part's stats are its rows' (every stage's counts that came with them) and what it holds: faces, named
    faces and rows by error kind (``write.faces``, ``write.named``, ``write.error_kind.<kind>``), which the run's
    summary adds up over the parts it committed.
    """

    needs = ("index", *OUTPUT)
    adds = ("staged", "name", "rows", STATS)

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
        folder = OutputTable(self.uri, self.storage_options)
        key = batch_key(batch.column("index").to_pylist())
        rows = self.to_output(batch)
        data = io.BytesIO()
        pq.write_table(rows, data)
        staged = posixpath.join(folder.staging(self.run_id), f"{key}.{uuid.uuid4().hex[:8]}.tmp")
        folder.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
        folder.fs.pipe_file(staged, data.getvalue())
        part = {"staged": [staged], "name": [part_name(self.run_id, key)], "rows": [batch.num_rows], STATS: [None]}
        return with_stats(pa.table(part, schema=PART), stats_of(batch) + self.holds(rows))

    @staticmethod
    def holds(rows: pa.Table) -> Counter:
        """What a part of output rows holds: faces, named faces, rows by error kind."""
        kinds = rows.column("error_kind").drop_null().value_counts().to_pylist()
        return Counter({"write.faces": pc.sum(pc.list_value_length(rows.column("faces"))).as_py() or 0,
                        "write.named": pc.sum(pc.list_value_length(rows.column("concepts"))).as_py() or 0,
                        **{f"write.error_kind.{k['values']}": k["counts"] for k in kinds}})  # fmt: skip


PART = pa.schema([("staged", pa.string()), ("name", pa.string()), ("rows", pa.int64()), (STATS, COLUMNS[STATS])])
"""The write stage's rows: one per part it staged."""


def stage(config: OutputConfig, run_id: str, storage_options: storage.StorageOptions | None, tasks: Resources,
          parts: int) -> Stage:  # fmt: skip
    """One task per part (``rows_per_file`` rows): its rows become one staged file, and the stage's rows are
    the parts written (:class:`plvm_model.store.output_table.Staged`'s fields), not the photos."""
    concurrency = min(tasks.concurrency, parts)
    resources = tasks.model_copy(update={"batch_size": config.rows_per_file, "concurrency": concurrency})
    args = (config.uri, run_id, storage_options, config.face_embeddings)
    return Stage.of("write", WriteParts, args, resources, keeps_rows=False)
