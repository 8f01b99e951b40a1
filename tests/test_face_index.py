"""The face index: runs reuse the faces of photos whose bytes they have seen, and name faces over the whole index."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
from conftest import make_config, photo
from test_failures import replacing
from test_resilience import write_manifest

from operators.detect import DetectFaces
from operators.embed import EmbedFaces
from operators.prompt import ChooseConcepts
from plvm_model.store.output_table import read_output
from operators.rows import COLUMNS, as_row_faces, face_vectors, to_table
from pipelines import cli
from pipelines.caption import caption
from pipelines.stage_lists import caption_stages
from pipelines.enroll import enroll
from plvm_model.store.errors import IndexCorrupt
from plvm_model.store.face_index import SCHEMA, SCHEMA_VERSION, FaceIndex, content_hash

# Ray's workers cannot import the tests: the counting and buggy stages below travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PEOPLE = ("thao", "viruss", "thuytien", "phuc-map", "willinvietnam")


def _row(digest: str, path: str, minutes: int, run: str, faces: int = 1) -> dict:
    face = {"box": [0, 0, 10, 10], "score": 0.99, "landmarks": [[1, 1]] * 5, "descriptor": [float(minutes)] * 4}
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes)
    return {"content_hash": digest, "path": path, "width": 10, "height": 10, "faces": [face] * faces,
            "indexed_at": at, "run_id": run}  # fmt: skip


def test_the_current_rows_are_the_newest_per_photo_bytes_then_per_path(tmp_path):
    index = FaceIndex(str(tmp_path / "faces"))
    index.write("ann", "r1-a", pa.Table.from_pylist([_row("A", "/p/a.jpg", 0, "r1"), _row("B", "/p/b.jpg", 0, "r1"),
                                                     _row("C", "/p/c.jpg", 0, "r1", faces=0)], schema=SCHEMA), "space")  # fmt: skip
    # run 2: a.jpg was moved to a2.jpg; b.jpg got new bytes D
    index.write("ann", "r2-a", pa.Table.from_pylist([_row("A", "/p/a2.jpg", 5, "r2"), _row("D", "/p/b.jpg", 5, "r2")],
                                                    schema=SCHEMA), "space")  # fmt: skip
    index.write("ann", "r3-a", pa.Table.from_pylist([_row("E", "/p/e.jpg", 9, "r3")], schema=SCHEMA), "other-space")
    current = {r["content_hash"]: r["path"] for r in index.read("ann", "space").to_pylist()}
    assert current == {"A": "/p/a2.jpg", "C": "/p/c.jpg", "D": "/p/b.jpg"}, "B is no longer at its path"
    assert set(index.read("ann").column("content_hash").to_pylist()) == {"A", "C", "D", "E"}
    assert index.users() == ["ann"] and index.read("bob").num_rows == 0
    meta = pq.read_schema(index.parts("ann")[0]).metadata
    assert meta[b"plvm.index_schema_version"] == str(SCHEMA_VERSION).encode() and meta[b"plvm.embedder"] == b"space"
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert not list((tmp_path / "faces" / "ann").glob(".*")), "no temporary file is left"


def test_index_faces_become_rows_faces_column_by_column():
    rows = [_row("a", "/p/a.jpg", 1, "r1", faces=2), _row("b", "/p/b.jpg", 2, "r1", faces=0),
            _row("c", "/p/c.jpg", 3, "r1")]  # fmt: skip
    table = pa.Table.from_pylist(rows, SCHEMA)
    column = pa.concat_tables([table, table]).slice(1, 4).column("faces")  # two chunks, the first sliced
    faces = as_row_faces(column)
    expected = [[{"box": f["box"], "score": f["score"], "landmarks": f["landmarks"], "embedding": f["descriptor"]}
                 for f in photo_faces] for photo_faces in column.to_pylist()]  # fmt: skip
    assert faces.type == COLUMNS["faces"]
    assert faces.equals(to_table([{"faces": f} for f in expected], ["faces"]).column("faces"))
    assert face_vectors(faces, 4).tolist() == [[3.0] * 4, [1.0] * 4, [1.0] * 4]  # b (no face), c, a (two)


def test_compaction_keeps_the_current_rows_in_one_part_per_descriptor_space(tmp_path, capsys):
    output = tmp_path / "out"
    index = FaceIndex(str(output / "_faces"))
    for name, rows, space in [("r1-a", [_row("A", "/p/a.jpg", 0, "r1"), _row("B", "/p/b.jpg", 0, "r1")], "space"),
                              ("r1-b", [_row("C", "/p/c.jpg", 1, "r1", faces=0)], "space"),
                              ("r2-a", [_row("A", "/p/a2.jpg", 5, "r2"), _row("D", "/p/b.jpg", 5, "r2")], "space"),
                              ("r3-a", [_row("E", "/p/e.jpg", 9, "r3")], "other-space")]:  # fmt: skip
        index.write("ann", name, pa.Table.from_pylist(rows, schema=SCHEMA), space)
    index.write("bob", "r1-a", pa.Table.from_pylist([_row("F", "/p/f.jpg", 0, "r1")], schema=SCHEMA), "space")
    before = {space: index.read("ann", space).to_pylist() for space in ("space", "other-space")}
    old_parts = index.parts("ann")

    assert cli.run(["index", "compact", str(output)]) == 0
    printed = capsys.readouterr().out.splitlines()
    # A's row at a.jpg (moved to a2.jpg) and B's (b.jpg has new bytes D) are superseded
    assert printed == ["user ann: 4 part(s) -> 2, 4 photos' rows kept, 2 superseded rows dropped",
                       "user bob: 1 part(s) -> 1, 1 photos' rows kept, 0 superseded rows dropped"]  # fmt: skip
    parts = index.parts("ann")
    assert len(parts) == 2 and not set(parts) & set(old_parts), "one new part per space, the merged ones removed"
    assert {space: index.read("ann", space).to_pylist() for space in before} == before, "the same current rows"
    assert sorted(pq.read_table(parts[0]).column("content_hash").to_pylist() +
                  pq.read_table(parts[1]).column("content_hash").to_pylist()) == ["A", "C", "D", "E"]  # fmt: skip
    assert not list((output / "_faces" / "ann").glob(".*")) and not (output / "_lease.json").exists()

    assert cli.run(["index", "compact", str(output), "--user", "ann"]) == 0  # nothing left to merge
    assert capsys.readouterr().out.startswith("user ann: 2 part(s) -> 2,") and index.parts("ann") == parts
    assert cli.run(["index", "compact", str(tmp_path / "nowhere")]) == 2


def test_a_damaged_part_is_refused_naming_it_and_nothing_else_is_touched(tmp_path):
    index = FaceIndex(str(tmp_path / "faces"))
    good = index.write("ann", "r1-a", pa.Table.from_pylist([_row("A", "/p/a.jpg", 0, "r1")], schema=SCHEMA), "s")
    cut = index.write("ann", "r2-a", pa.Table.from_pylist([_row("B", "/p/b.jpg", 1, "r2")], schema=SCHEMA), "s")
    Path(cut).write_bytes(Path(cut).read_bytes()[:-30])  # a part cut short
    foreign = tmp_path / "faces" / "ann" / "part-r3-a.parquet"
    pq.write_table(pa.table({"x": [1]}), foreign)  # a Parquet file that is no index part
    with pytest.raises(IndexCorrupt, match=f"face index part {cut} is damaged"):
        index.read("ann")
    assert {part.uri for part in index.check()} == {cut, str(foreign)}
    assert "not a face index part of schema version 1" in next(p.reason for p in index.check() if p.uri == str(foreign))
    assert Path(good).exists() and index.read_part(good) is not None


class Counting:
    """Mixin of the real detect and embed stages that counts their model's calls in ``log`` (one line per call)."""

    log = ""

    def count(self, method):
        def counted(*args):
            with open(self.log, "a") as f:
                f.write(f"{type(self).__name__}\n")
            return method(*args)

        return counted


class CountingDetect(Counting, DetectFaces):
    def __init__(self, config) -> None:
        super().__init__(config)
        self.detector.detect = self.count(self.detector.detect)


class CountingEmbed(Counting, EmbedFaces):
    def __init__(self, config) -> None:
        super().__init__(config)
        self.embedder.describe = self.count(self.embedder.describe)


def counting(log: Path):
    def stages(config, **kwargs):
        udfs = {"detect": type("CountingDetect", (CountingDetect,), {"log": str(log)}),
                "embed": type("CountingEmbed", (CountingEmbed,), {"log": str(log)})}  # fmt: skip
        return [replace(s, udf=udfs[s.name]) if s.name in udfs else s for s in caption_stages(config, **kwargs)]

    return stages


def calls(log: Path) -> dict[str, int]:
    lines = log.read_text().split() if log.exists() else []
    out = {name: lines.count(name) for name in ("CountingDetect", "CountingEmbed")}
    log.unlink(missing_ok=True)
    return out


def test_a_second_run_detects_only_new_bytes_and_reports_deleted_photos(tmp_path, yollava, tiny_models, ray_local):
    archive = tmp_path / "archive"
    archive.mkdir()
    for person in ("thao", "viruss"):
        for i in range(3):
            shutil.copy(photo(person, f"{i}.jpg"), archive / f"{person}-{i}.jpg")
    config = make_config(tmp_path, input={"uri": str(archive), "user": "ann"})
    enroll(config, "ann", "Thao", [photo("thao", "ref_img.jpg")])
    log = tmp_path / "calls.log"
    first = caption(config, stages=counting(log))
    assert first.indexed == 6 and calls(log) == {"CountingDetect": 6, "CountingEmbed": 6}
    before = {r["path"]: r for r in read_output(config.output.uri).to_pylist()}

    shutil.copy(archive / "thao-0.jpg", archive / "copy-of-thao-0.jpg")  # known bytes under a new path
    shutil.copy(photo("thao", "5.jpg"), archive / "viruss-2.jpg")  # the same path, new bytes
    (archive / "thao-1.jpg").unlink()  # deleted from the archive
    second = caption(config, overwrite=True, stages=counting(log))  # from scratch, but the index stays
    assert calls(log) == {"CountingDetect": 1, "CountingEmbed": 1}, "only the changed photo is detected and embedded"
    assert second.rows == second.photos == 6 and second.missing == 0
    assert second.indexed == 2, "the changed photo, and the known bytes' new path"
    assert (second.deleted, second.deleted_paths) == (1, [str(archive / "thao-1.jpg")])
    assert "1 indexed photos deleted from the archive" in "\n".join(second.lines())
    after = {r["path"]: r for r in read_output(config.output.uri).to_pylist()}
    for name in ("thao-0.jpg", "thao-2.jpg", "viruss-0.jpg", "viruss-1.jpg"):
        path = str(archive / name)
        assert after[path]["faces"] == before[path]["faces"] and after[path]["concepts"] == before[path]["concepts"]
    assert after[str(archive / "copy-of-thao-0.jpg")]["concepts"] == ["Thao"]
    assert after[str(archive / "viruss-2.jpg")]["concepts"] == ["Thao"], "the new bytes were detected and named"


class FailsOnPrompt(ChooseConcepts):
    """The real prompt stage with a bug that strikes the photos whose path contains one of ``markers``."""

    markers: tuple[str, ...] = ()

    def __call__(self, batch: pa.Table) -> pa.Table:
        for path in batch.column("path").to_pylist():
            if any(marker in path for marker in self.markers):
                raise ZeroDivisionError(f"bug on {Path(path).name}")
        return super().__call__(batch)


def test_three_runs_name_every_face_as_one_run_over_the_whole_archive(tmp_path, yollava, tiny_models, ray_local):
    """The archive is written in three runs: the first two fail on a third of it each time (a bug after
    naming), and ``--retry-errors`` goes on; every face is named as one run over all of it names it. The
    split runs compact the index at their end (``index.compact_parts: 1``), which changes no name."""
    paths = [photo(person, f"{i}.jpg") for i in range(3) for person in PEOPLE]  # 15 photos, every person in each third
    thirds = [paths[:5], paths[5:10], paths[10:]]
    one = manifest_config(tmp_path / "one", paths)
    caption(one)
    split = manifest_config(tmp_path / "split", paths, run={"max_failed_fraction": 1.0}, index={"compact_parts": 1})
    index = FaceIndex(split.index.root(split.output.uri))
    for run, failing in enumerate([thirds[1] + thirds[2], thirds[2], []]):
        bug = type("FailsOnPrompt", (FailsOnPrompt,), {"markers": tuple(failing)})
        summary = caption(split, retry_errors=run > 0, stages=replacing("prompt", bug))
        done = [r["path"] for r in read_output(split.output.uri).to_pylist() if r["error"] is None]
        assert sorted(done) == sorted(paths[: 5 * (run + 1)]), "each run wrote one third"
        # the first run indexed all 15 photos, in a part per batch of 4, and merged them; the others added none
        assert summary.index_compacted == ({"ann": [4, 1]} if run == 0 else {}) and len(index.parts("ann")) == 1

    def names(config) -> dict[str, list[tuple]]:
        rows = read_output(config.output.uri).to_pylist()
        return {r["path"]: [(f["concept"], f["relative_distance"]) for f in r["faces"]] for r in rows}

    alone, split_names = names(one), names(split)
    assert sum(len(f) for f in alone.values()) >= 15 and any(c for f in alone.values() for c, _ in f)
    for path in paths:
        assert [c for c, _ in split_names[path]] == [c for c, _ in alone[path]], path
        assert [d for _, d in split_names[path]] == pytest.approx([d for _, d in alone[path]], rel=1e-5), path


def manifest_config(tmp_path: Path, paths: list[str], **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = make_config(tmp_path, input={"uri": write_manifest(tmp_path / "m.csv", paths, "ann")}, **sections)
    enroll(config, "ann", "Thao", [photo("thao", "ref_img.jpg")])
    enroll(config, "ann", "Viruss", [photo("viruss", "ref_img.jpg")])
    return config


def test_a_damaged_index_part_stops_the_run_and_rebuild_index_recovers(tmp_path, yollava, tiny_models, ray_local,
                                                                       capsys):  # fmt: skip
    paths = [photo("thao", f"{i}.jpg") for i in range(3)]
    config = manifest_config(tmp_path, paths, tasks={"batch_size": 2})
    caption(config)
    index = FaceIndex(config.index.root(config.output.uri))
    damaged = index.parts("ann")[0]
    lost = pq.read_metadata(damaged).num_rows
    Path(damaged).write_bytes(b"PAR1 cut short")
    with pytest.raises(IndexCorrupt, match=f"face index part {damaged} is damaged"):
        caption(config, overwrite=True)
    assert len(read_output(config.output.uri)) == 3, "the refused run touched nothing"

    assert cli.run(["index", "check", config.output.uri]) == 2
    out, err = capsys.readouterr()
    assert f"damaged: face index part {damaged} is damaged" in out
    assert err.strip() == f"plvm index: error: {index.uri}: 1 of 2 parts are damaged (listed above); plvm " \
        "caption --rebuild-index drops them and detects their photos again"  # fmt: skip

    summary = caption(config, overwrite=True, rebuild_index=True)
    assert summary.index_dropped == [damaged] and summary.indexed == lost, "the dropped part's photos detected again"
    assert [r["concepts"] for r in read_output(config.output.uri).to_pylist()] == [["Thao"]] * 3
    assert cli.run(["index", "check", config.output.uri]) == 0
