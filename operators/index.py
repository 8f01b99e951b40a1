"""Stage 4b, index: the faces of the photos the index did not hold (or held under another path) committed to it.

Each batch commits one part per user, ``part-<run>-<key>`` with ``<key>`` a hash of the
batch's input positions (as the write stage names output parts), so a batch that Ray
retries rewrites the same part. The part is committed only while the run holds the
output's lease, as output parts are. Rows pass through unchanged; rows with an error (an
unreadable photo) are not indexed.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

import pyarrow as pa
from pydantic import Field

from operators.base import Resources, RowStage, Stage, StageConfig
from plvm_model.store import storage
from plvm_model.store.face_index import SCHEMA, IndexSource
from plvm_model.store.ids import batch_key
from plvm_model.store.lease import ensure_held


class IndexConfig(StageConfig):
    uri: str | None = Field(
        None,
        description="Root of the face index (per user: each photo's faces, keyed by its bytes; a local path or any "
        "fsspec URI). null: `OUTPUT/_faces`, beside the output.",
    )
    compact_parts: int | None = Field(
        64,
        ge=1,
        description="After a caption run that did not fail, each of its users whose index then has more parts than "
        "this is compacted (as `plvm index compact`: one part per descriptor space), under the run's lease. null: "
        "only by hand.",
    )

    def root(self, output_uri: str) -> str:
        """The index's root for a run into ``output_uri``."""
        return self.uri or storage.join(output_uri, "_faces")


class IndexFaces(RowStage):
    """Commits the batch's newly found faces to the user's face index; returns the batch as it is. Batches of
    ``tasks.batch_size`` rows (larger ones would merge the run's blocks, and the later stages would lose their
    parallelism): one part per batch and user."""

    needs = ("index", "path", "user_id", "content_hash", "width", "height", "faces", "indexed")

    def __init__(self, source: IndexSource, output_uri: str, run_id: str) -> None:
        self.source, self.output_uri, self.run_id = source, output_uri, run_id

    def _check_lease(self) -> None:
        fs, root = storage.filesystem(self.output_uri, self.source.storage_options)
        ensure_held(fs, root, self.output_uri, self.run_id, "face index part")

    def __call__(self, batch: pa.Table) -> pa.Table:
        by_user: dict[str, list[dict]] = defaultdict(list)
        now = datetime.now(UTC)
        columns = ["path", "user_id", "content_hash", "width", "height", "faces", "indexed", "error"]
        for row in batch.select(columns).to_pylist():
            if row["error"] is not None or row["indexed"] or row["faces"] is None:
                continue
            faces = [{"box": f["box"], "score": f["score"], "landmarks": f["landmarks"], "descriptor": f["embedding"]}
                     for f in row["faces"]]  # fmt: skip
            by_user[row["user_id"]].append({"content_hash": row["content_hash"], "path": row["path"],
                                            "width": row["width"], "height": row["height"], "faces": faces,
                                            "indexed_at": now, "run_id": self.run_id})  # fmt: skip
        if by_user:
            key = batch_key(batch.column("index").to_pylist())
            index = self.source.open()
            for user, rows in sorted(by_user.items()):
                table = pa.Table.from_pylist(rows, schema=SCHEMA)
                index.write(user, f"{self.run_id}-{key}", table, self.source.embedder, before_commit=self._check_lease)
                self.stat_update("indexed", table.num_rows)
        return batch


def stage(source: IndexSource, output_uri: str, run_id: str, tasks: Resources) -> Stage:
    return Stage.of("index", IndexFaces, (source, output_uri, run_id), tasks)
