"""The output as a Delta table: what the log names is the output, replacements are one commit, and plain Parquet
readers of the folder see the current rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from test_lease import plant

from plvm_model.store.output_table import OutputTable, Staged, keys
from plvm_model.store.output_schema import output_schema
from plvm_model.store import storage
from plvm_model.store.errors import ConfigError

RUN = "20260101T000000Z-aaaaaa"


def rows(*paths: str) -> pa.Table:
    return pa.Table.from_pylist([{"path": p, "user_id": "kim", "caption": f"{p} caption"} for p in paths],
                                schema=output_schema())  # fmt: skip


def stage(out: OutputTable, key: str, table: pa.Table) -> Staged:
    """A part as the write stage stages it."""
    path = f"{out.staging(RUN)}/{key}.tmp"
    out.fs.makedirs(out.staging(RUN), exist_ok=True)
    pq.write_table(table, path)
    return Staged(path, f"part-{RUN}-{key}.parquet", table.num_rows)


def test_a_folder_of_parts_becomes_a_table_and_only_committed_parts_are_output(tmp_path):
    pq.write_table(rows("/a.jpg", "/b.jpg"), tmp_path / "part-old-k1.parquet")  # written before the Delta log
    out = OutputTable(str(tmp_path))
    assert not out.is_table() and keys(out.read()) == {("/a.jpg", "kim"): 1, ("/b.jpg", "kim"): 1}
    plant(out.fs, out.root, run_id=RUN)
    out.open(output_schema())
    assert out.is_table() and DeltaTable(str(tmp_path)).version() == 0, "the parts are the table's first version"
    assert keys(out.read()) == {("/a.jpg", "kim"): 1, ("/b.jpg", "kim"): 1}

    committed = out.commit([stage(out, "k2", rows("/c.jpg"))], RUN)
    assert committed == [str(tmp_path / f"part-{RUN}-k2.parquet")]
    pq.write_table(rows("/d.jpg"), tmp_path / f"part-{RUN}-k3.parquet")  # renamed, never committed: a killed run's
    (tmp_path / "_faces" / "kim").mkdir(parents=True)
    pq.write_table(rows("/index"), tmp_path / "_faces" / "kim" / "part-x.parquet")
    assert set(keys(out.read())) == {("/a.jpg", "kim"), ("/b.jpg", "kim"), ("/c.jpg", "kim")}
    assert out.vacuum() == [f"part-{RUN}-k3.parquet"], "the next command removes what the log does not name"
    assert (tmp_path / "_faces" / "kim" / "part-x.parquet").exists(), "the _ folders are left alone"
    assert sorted(pq.read_table(tmp_path).column("path").to_pylist()) == ["/a.jpg", "/b.jpg", "/c.jpg"]


def test_a_replacement_is_one_commit_and_plain_readers_see_the_current_rows(tmp_path):
    out = OutputTable(str(tmp_path))
    plant(out.fs, out.root, run_id=RUN)
    out.open(output_schema())
    out.commit([stage(out, "k1", rows("/a.jpg", "/b.jpg")), stage(out, "k2", rows("/c.jpg"))], RUN)
    before = DeltaTable(str(tmp_path)).version()
    new = rows("/b.jpg").set_column(2, "width", pa.array([7], pa.int32()))
    drop = {p: pc.equal(out.read_part(p, ["path"]).column("path"), "/b.jpg") for p in out.part_files()}
    version = out.replace(drop, [stage(out, "k9", new)], RUN, "rematch")
    [commit] = [c for c in DeltaTable(str(tmp_path)).history() if c["version"] == before + 1]
    assert version == before + 1 and commit["plvm.operation"] == "rematch" and commit["plvm.run_id"] == RUN
    current = {r["path"]: r for r in out.read().to_pylist()}
    assert sorted(current) == ["/a.jpg", "/b.jpg", "/c.jpg"] and current["/b.jpg"]["width"] == 7
    assert current["/a.jpg"]["caption"] == "/a.jpg caption", "the other rows of a rewritten part are kept"
    plain = pq.read_table(tmp_path).to_pylist()
    assert sorted((r["path"], r["width"]) for r in plain) == [("/a.jpg", None), ("/b.jpg", 7), ("/c.jpg", None)]
    assert not (tmp_path / "_staging" / RUN).exists()
    assert out.vacuum() == [], "the replaced part is gone already, and not reported again"
    assert out.replace({p: pa.array([False] * out.read_part(p).num_rows) for p in out.part_files()}, [], RUN,
                       "rematch") is None, "nothing to replace: no commit"  # fmt: skip


def test_a_table_of_other_rows_is_refused_and_s3_options_are_translated_or_refused(tmp_path):
    out = OutputTable(str(tmp_path))
    out.open(output_schema())
    with pytest.raises(ConfigError, match="output.face_embeddings is true, but .* holds rows without face embeddings"):
        out.open(output_schema(face_embeddings=True))
    out.open(output_schema(face_embeddings=True), overwrite=True)
    assert "embedding" in str(DeltaTable(str(tmp_path)).schema())

    given = {"s3": {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s", "client_kwargs": {"region_name": "r"}}}
    assert storage.object_store_options("s3://b/out", given) == {
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true", "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "r", "AWS_ALLOW_HTTP": "true"}  # fmt: skip
    with pytest.raises(ConfigError, match="storage.s3.profile: not an option"):
        storage.object_store_options("s3://b/out", {"s3": {"profile": "p"}})
