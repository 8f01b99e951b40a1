"""Inputs, banks and output on S3 (a real endpoint on 127.0.0.1), through the whole pipeline."""

from __future__ import annotations

import fsspec
import pytest

from conftest import make_config, photo
from plvm_model.store.output_table import read_output
from pipelines.caption import caption
from pipelines.enroll import enroll
from plvm_model.store import storage
from plvm_model.store.banks import BankStore
from plvm_model.store.face_index import FaceIndex
from s3_endpoint import moto_endpoint, s3_options


@pytest.fixture(scope="module")
def s3():
    with moto_endpoint() as endpoint:
        options = s3_options(endpoint)
        fs = fsspec.filesystem("s3", **options["s3"])
        for bucket in ("photos", "banks", "results"):
            fs.mkdir(bucket)
        yield fs, options


def test_photos_bank_and_output_on_s3(s3, tmp_path, yollava, tiny_models, ray_local):
    fs, options = s3
    for i in range(3):
        fs.put(photo("thao", f"{i}.jpg"), f"photos/nina/thao-{i}.jpg")
    fs.put(photo("viruss", "0.jpg"), "photos/nina/viruss-0.jpg")
    fs.pipe("photos/nina/broken.jpg", b"not a jpeg")
    fs.put(photo("thao", "ref_img.jpg"), "photos/refs/thao.jpg")
    config = make_config(tmp_path, storage=options, bank="s3://banks/prod",
                         input={"uri": "s3://photos/nina", "user": "nina", "allowed": ["s3://photos"]},
                         output={"uri": "s3://results/run1"})  # fmt: skip

    enroll(config, "nina", "Thao", ["s3://photos/refs/thao.jpg"])
    assert fs.exists("banks/prod/nina/concepts.v000001.parquet")
    assert BankStore("s3://banks/prod", options).load("nina").concepts[0].references == ["s3://photos/refs/thao.jpg"]

    summary = caption(config)
    assert summary.rows == summary.photos == 5
    assert all(f.startswith("s3://results/run1/part-") for f in summary.output)
    assert fs.exists(f"results/run1/_runs/{summary.run_id}.json")
    assert summary.indexed == 4 and FaceIndex("s3://results/run1/_faces", options).read("nina").num_rows == 4
    assert not fs.exists(f"results/run1/_staging/{summary.run_id}") or not fs.ls(f"results/run1/_staging/{summary.run_id}")
    rows = {r["path"]: r for r in read_output("s3://results/run1", options).to_pylist()}
    assert set(rows) == {f"s3://photos/nina/{n}" for n in
                         ("thao-0.jpg", "thao-1.jpg", "thao-2.jpg", "viruss-0.jpg", "broken.jpg")}  # fmt: skip
    for i in range(3):
        assert rows[f"s3://photos/nina/thao-{i}.jpg"]["concepts"] == ["Thao"]
    assert rows["s3://photos/nina/viruss-0.jpg"]["error"] is None
    assert rows["s3://photos/nina/broken.jpg"]["error_kind"] == "not_an_image"
    assert "s3://photos/nina/broken.jpg" in rows["s3://photos/nina/broken.jpg"]["error"]


def test_a_damaged_bank_on_s3_is_refused_before_the_run(s3, tmp_path, tiny_models):
    fs, options = s3
    fs.pipe("banks/prod/oscar/concepts.parquet", b"garbage")
    fs.pipe("photos/oscar/a.jpg", b"unused")
    config = make_config(tmp_path, storage=options, bank="s3://banks/prod",
                         input={"uri": "s3://photos/oscar", "user": "oscar", "allowed": ["s3://photos"]},
                         output={"uri": "s3://results/oscar"})  # fmt: skip
    with pytest.raises(ValueError, match="s3://banks/prod/oscar/concepts.parquet is damaged"):
        caption(config)
    assert not fs.exists("results/oscar")


def test_photos_gone_from_s3_are_found_by_listing_their_folders(s3, yollava):
    fs, options = s3
    for name in ("kept/a.jpg", "kept/b.jpg", "emptied/c.jpg"):
        fs.put(photo("thao", "0.jpg"), f"photos/{name}")
    fs.rm("photos/kept/a.jpg")
    fs.rm("photos/emptied/c.jpg")  # its folder (a prefix) is gone with it
    uris = [f"s3://photos/{name}" for name in ("kept/a.jpg", "kept/b.jpg", "emptied/c.jpg", "never/d.jpg")]
    assert storage.gone(uris, options) == {uris[0], uris[2], uris[3]}
    assert storage.gone(uris[1:2], options) == set()
