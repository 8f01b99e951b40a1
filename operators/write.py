"""Stage 8, write: rows in the output schema, written to a staging prefix and committed at the end.

Ray writes Parquet files under ``OUTPUT/_staging/<run_id>/``; :meth:`OutputWriter.commit`
then counts their rows, moves each into ``OUTPUT/`` as ``part-<run_id>-<n>.parquet`` and
writes ``OUTPUT/_runs/<run_id>.json``. Readers of ``OUTPUT`` (pyarrow, Ray, pandas, Spark
skip ``_``-prefixed folders) never see a partial run.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from operators.base import StageConfig
from plvm_model import storage

_FACE_FIELDS = [
    pa.field("box", pa.list_(pa.float32(), 4)),
    pa.field("score", pa.float32()),
    pa.field("landmarks", pa.list_(pa.list_(pa.float32(), 2), 5)),
    pa.field("concept", pa.string()),
    pa.field("concept_id", pa.string()),
    pa.field("distance", pa.float32()),
]
_ANSWER = pa.struct([pa.field("question", pa.string()), pa.field("answer", pa.string())])


def output_schema(face_embeddings: bool = False) -> pa.Schema:
    """The schema of the output Parquet files (see the README for each column's meaning)."""
    face = pa.struct(_FACE_FIELDS + ([pa.field("embedding", pa.list_(pa.float32()))] if face_embeddings else []))
    return pa.schema(
        [
            pa.field("path", pa.string()),
            pa.field("user_id", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("faces", pa.list_(face)),
            pa.field("concepts", pa.list_(pa.string())),
            pa.field("caption", pa.string()),
            pa.field("answers", pa.list_(_ANSWER)),
            pa.field("model", pa.string()),
            pa.field("engine", pa.string()),
            pa.field("error", pa.string()),
            pa.field("error_kind", pa.string()),
        ]
    )


class OutputConfig(StageConfig):
    uri: str | None = None
    face_embeddings: bool = False
    """Also write each face's descriptor."""
    min_rows_per_file: int = Field(5000, ge=1)


class ToOutput:
    """Any row -> a row of the output schema (working columns dropped, missing ones null)."""

    def __init__(self, face_embeddings: bool = False) -> None:
        self.schema = output_schema(face_embeddings)
        self.face_fields = [f.name for f in self.schema.field("faces").type.value_type]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select([c for c in batch.column_names if c in self.schema.names]).to_pylist()
        for row in rows:
            row["faces"] = [{k: face.get(k) for k in self.face_fields} for face in row.get("faces") or []]
        return pa.Table.from_pylist(rows, schema=self.schema)


def read_output(uri: str, storage_options: storage.StorageOptions | None = None, columns=None) -> pa.Table:
    """All committed rows under ``uri`` (staging and run records are skipped)."""
    fs, root = storage.filesystem(uri, storage_options)
    files = sorted(p for p in fs.glob(posixpath.join(root, "part-*.parquet")))
    if not files:
        return output_schema().empty_table() if columns is None else output_schema().empty_table().select(columns)
    return pa.concat_tables(
        [pq.read_table(fs.open(p, "rb"), columns=columns) for p in files], promote_options="permissive"
    )


@dataclass
class Commit:
    run_id: str
    files: list[str]
    rows: int


class OutputWriter:
    """Staging and commit of one run's Parquet files under ``uri``."""

    def __init__(self, uri: str, run_id: str, storage_options: storage.StorageOptions | None = None) -> None:
        self.uri = uri
        self.run_id = run_id
        self.fs, self.root = storage.filesystem(uri, storage_options)
        self.staging = posixpath.join(self.root, "_staging", run_id)

    def staging_target(self) -> tuple[pa.fs.FileSystem, str]:
        """(pyarrow filesystem, path) for Ray's ``write_parquet``."""
        from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem
        from fsspec.implementations.local import LocalFileSystem as FsspecLocal

        if isinstance(self.fs, FsspecLocal):
            return LocalFileSystem(), self.staging
        return PyFileSystem(FSSpecHandler(self.fs)), self.staging

    def staged_files(self) -> list[str]:
        if not self.fs.exists(self.staging):
            return []
        return sorted(p for p in self.fs.find(self.staging) if p.endswith(".parquet"))

    def count_rows(self, paths: list[str]) -> int:
        return sum(pq.read_metadata(io.BytesIO(self.fs.cat_file(p))).num_rows for p in paths)

    def commit(self, summary: dict | None = None) -> Commit:
        """Move the staged files into the output folder and record the run."""
        staged = self.staged_files()
        rows = self.count_rows(staged)
        final = []
        for index, path in enumerate(staged):
            target = posixpath.join(self.root, f"part-{self.run_id}-{index:05d}.parquet")
            self.fs.mv(path, target)
            final.append(target)
        commit = Commit(self.run_id, [storage.unstrip(self.uri, p) for p in final], rows)
        record = {**asdict(commit), **(summary or {})}
        storage.write_atomic(
            self.fs, posixpath.join(self.root, "_runs", f"{self.run_id}.json"), json.dumps(record, indent=1).encode()
        )
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)
        return commit
