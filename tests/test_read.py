"""Input listing: a photo has one identity (its normalised path) however the input spells it, and only the
allowed inputs are listed and read."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, serving
from s3_endpoint import moto_endpoint, s3_options

from operators.read import InputConfig, ReadBytes, ReadConfig, list_inputs
from plvm_model.store.errors import InputError
from plvm_model.store.storage import normalize


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """tmp/photos/{a.jpg, b.png}, tmp/lists/, tmp/other/, and tmp/link -> tmp/other/deep (a symlinked folder)."""
    (tmp_path / "photos").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "photos" / name).write_bytes(b"not decoded here")
    (tmp_path / "lists").mkdir()
    (tmp_path / "other" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "other" / "deep")
    return tmp_path


def paths(uri: str, **config) -> list[str]:
    return list_inputs(InputConfig(uri=uri, **config)).column("path").to_pylist()


def test_folders_and_globs_spelled_with_dot_segments_list_normalised_absolute_paths(photos, monkeypatch):
    expected = [str(photos / "photos" / "a.jpg"), str(photos / "photos" / "b.png")]
    assert paths(f"{photos}/other/../photos") == expected
    assert paths(f"{photos}/./other/deep/../../photos//") == expected
    assert paths(f"{photos}/other/../photos/*.jpg") == expected[:1]
    assert paths(f"{photos}/lists/../photos/b.png") == expected[1:]
    monkeypatch.chdir(photos / "other")
    assert paths("../photos") == expected  # relative: from the current directory, made absolute
    assert paths("./../photos/*") == expected


def test_manifest_rows_and_the_manifest_itself_are_normalised(photos, monkeypatch):
    a, b = str(photos / "photos" / "a.jpg"), str(photos / "photos" / "b.png")
    manifest = photos / "lists" / "m.csv"
    manifest.write_text(
        "path,user_id\n"
        "../photos/a.jpg,u\n"  # relative to the manifest's folder
        f"{photos}/photos/./a.jpg,u\n"  # the same photo, spelled otherwise
        f"{photos}/other/../photos/../photos/b.png,u\n"
        ",u\n"  # no path: known by its place in the manifest
    )
    monkeypatch.chdir(photos / "other")
    listing = list_inputs(InputConfig(uri="../other/../lists/m.csv")).to_pylist()
    assert [r["path"] for r in listing] == [a, a, b, f"{manifest}#row=4"]
    # one photo under two spellings is one key: the run writes it once per listed row, under one name
    assert listing[0]["path"] == listing[1]["path"] and listing[0]["user_id"] == listing[1]["user_id"]


def test_dot_dot_after_a_symlinked_folder_goes_where_the_system_goes(photos):
    # link -> other/deep, so link/.. is other/, not the folder that holds link
    assert normalize(f"{photos}/link/../x.jpg") == str(photos / "other" / "x.jpg")
    assert Path(normalize(f"{photos}/link/../deep")).samefile(photos / "link")


@pytest.mark.parametrize(
    "given, expected",
    [
        ("s3://bucket/a/../b/./c.jpg", "s3://bucket/b/c.jpg"),
        ("s3://bucket/../../c.jpg", "s3://bucket/c.jpg"),  # never above the bucket
        ("s3://bucket/a//c.jpg", "s3://bucket/a//c.jpg"),  # another key in an object store: kept
        ("gs://bucket/a/b/../c.jpg?generation=7", "gs://bucket/a/c.jpg?generation=7"),
        ("file:///data/x/../y.jpg", "file:///data/y.jpg"),
        ("/data/./x//y.jpg", "/data/x/y.jpg"),
    ],
)
def test_uris_lose_their_dot_segments(given, expected):
    assert normalize(given) == expected


def test_object_store_inputs_spelled_with_dot_segments_list_as_spelled_without(tmp_path):
    fs = fsspec.filesystem("memory")  # shared by the whole process: a folder of this test's own
    bucket = f"memory://bucket-{os.getpid()}-{tmp_path.name}"
    fs.pipe({f"{bucket}/photos/a.jpg": b"x", f"{bucket}/lists/m.csv": b"path,user_id\n../photos/a.jpg,u\n"})
    try:
        assert paths(f"{bucket}/lists/../photos") == paths(f"{bucket}/photos")
        assert paths(f"{bucket}/photos/./../lists/m.csv") == [f"{bucket}/photos/a.jpg"]
    finally:
        fs.rm(bucket, recursive=True)


@pytest.fixture
def http_server():
    """A file server on 127.0.0.1 in a thread; yields its base URL and the list of paths it was asked for."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\xff\xd8 secret")

        do_HEAD = do_GET

        def log_message(self, *args) -> None:
            pass

    with serving(Handler) as url:
        yield url, asked


def test_manifest_rows_outside_its_folder_are_refused_and_never_opened(photos, http_server):
    base, asked = http_server
    (photos / "lists" / "inside.jpg").write_bytes(b"listed, inside")
    manifest = photos / "lists" / "m.csv"
    outside = [f"{base}/photos/x.jpg", f"file://{photos}/photos/a.jpg", "../photos/b.png", f"{photos}/lists2/c.jpg"]
    manifest.write_text("path,user_id\n" + "".join(f"{p},u\n" for p in ["inside.jpg", *outside]))
    listing = list_inputs(InputConfig(uri=str(manifest)))
    rows = listing.to_pylist()
    assert rows[0]["path"] == str(photos / "lists" / "inside.jpg") and rows[0]["error"] is None
    for row, given in zip(rows[1:], outside, strict=True):
        assert row["error_kind"] == "outside_input_scope", given
        assert row["path"] in row["error"] and f"[{photos / 'lists'}]" in row["error"]
        assert "input.allowed is not set, so the manifest's folder" in row["error"]
    read = ReadBytes(ReadConfig())(listing).to_pylist()
    assert read[0]["data"] == b"listed, inside"
    assert [r["data"] for r in read[1:]] == [None] * len(outside)
    assert [r["error_kind"] for r in read[1:]] == ["outside_input_scope"] * len(outside)  # the read left them
    assert asked == []  # the URL was never fetched


def test_allowed_roots_are_matched_normalised_with_their_scheme_at_segment_boundaries(photos, http_server):
    base, asked = http_server
    (photos / "photos2").mkdir()
    manifest = photos / "lists" / "m.csv"
    given = {
        f"{photos}/photos/a.jpg": True,
        f"file://{photos}/photos/b.png": True,  # another spelling of the same place
        f"{photos}/other/../photos/a.jpg": True,
        f"{photos}/photos2/a.jpg": False,  # a prefix of the name, not a folder above it
        f"{photos}/photos/../other/x.jpg": False,
        f"file://{photos}/photos/../../x.jpg": False,
        f"{photos}/link/../photos/a.jpg": False,  # link/.. is other/, where the link's target is
        f"memory:/{photos}/photos/a.jpg": False,  # another filesystem with the same path
        f"{base}/photos/a.jpg": True,
        f"{base}/photos/%2e%2e/secret.jpg": False,  # a server may decode it to /secret.jpg
        f"{base}/photos/..?x=/photos/a.jpg": False,
        f"{base}/photos/..\\secret.jpg": False,
        f"{base}/photos2/a.jpg": False,
    }
    manifest.write_text("path,user_id\n" + "".join(f"{p},u\n" for p in given))
    allowed = [f"file://{photos}/lists/../photos/", f"{base}/photos"]
    rows = list_inputs(InputConfig(uri=str(manifest), allowed=allowed)).to_pylist()
    assert {p: r["error"] is None for p, r in zip(given, rows, strict=True)} == given
    refused = next(r for r in rows if r["error"])
    assert f"[file://{photos}/photos, {base}/photos] (input.allowed)" in refused["error"]
    assert asked == []


def test_a_folder_or_glob_lists_files_only_and_never_the_output(photos):
    out = photos / "photos" / "out"
    for name in ("part-r1-k.parquet", "_staging/r2/part-r2-k.parquet", "_runs/r1.json", "_index/a.jpg"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"the run's own")
    (photos / "photos" / "album").mkdir()
    (photos / "photos" / "album" / "c.jpg").write_bytes(b"a photo in a subfolder")
    a, b, c = (str(photos / "photos" / name) for name in ("a.jpg", "b.png", "album/c.jpg"))

    def listed(uri: str) -> list[str]:
        return list_inputs(InputConfig(uri=uri), output=str(out)).column("path").to_pylist()

    assert listed(f"{photos}/photos/*") == [a, b]  # neither album/ nor out/
    assert listed(f"{photos}/photos/**") == [a, c, b]
    assert listed(f"{photos}/photos/**/*.jpg") == [a, c]
    assert listed(f"{photos}/photos") == [a, c, b]
    (photos / "lists" / "m.csv").write_text(f"path,user_id\n{out}/_index/a.jpg,u\n")
    [row] = list_inputs(InputConfig(uri=str(photos / "lists" / "m.csv"), allowed=[str(photos)]),
                        output=f"{photos}/lists/../photos/out/").to_pylist()  # fmt: skip
    assert row["error_kind"] == "outside_input_scope"
    assert row["error"].endswith(f"{out}/_index/a.jpg is inside the output folder {out}, which is never input")


@pytest.mark.parametrize("uri", ["empty", "photos/*.gif", "photos/nothing-*", "lists/m.csv", "lists/m.parquet"])
def test_an_input_that_lists_no_photo_is_an_error_unless_allowed(photos, uri):
    (photos / "empty").mkdir()
    (photos / "lists" / "m.csv").write_text("path,user_id\n")
    pq.write_table(pa.table({"path": pa.array([], pa.string())}), photos / "lists" / "m.parquet")
    with pytest.raises(InputError, match=rf"^input {re.escape(str(photos / uri))} lists no photos: .*--allow-empty"):
        list_inputs(InputConfig(uri=str(photos / uri)))
    assert list_inputs(InputConfig(uri=str(photos / uri), allow_empty=True)).num_rows == 0


def test_plvm_caption_of_an_empty_folder_exits_2_naming_it_unless_allow_empty(tmp_path, tiny_models):
    (tmp_path / "empty").mkdir()
    command = [sys.executable, "-m", "pipelines.cli", "caption", "--input", "empty", "--output", "out"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = partial(subprocess.run, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    refused = run(command)
    assert refused.returncode == 2, refused.stderr
    message = (
        f"plvm caption: error: input {tmp_path / 'empty'} lists no photos: check the folder, glob or manifest, "
        "or pass --allow-empty (input.allow_empty) if an empty input is expected"
    )
    assert refused.stderr.strip().splitlines() == [message]
    written = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written == ["_lease.lock"], "nothing is written but the lock of the lease (the lease itself is released)"
    allowed = run([*command, "--allow-empty"])
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout.splitlines()[-1])["photos"] == 0


def test_on_s3_a_glob_lists_objects_only_never_the_output_and_a_manifest_reaches_only_its_folder():
    with moto_endpoint() as endpoint:
        options = s3_options(endpoint)
        fs = fsspec.filesystem("s3", **options["s3"])
        fs.mkdir("photos"), fs.mkdir("secrets")
        fs.pipe({"photos/u/a.jpg": b"a", "photos/u/album/c.jpg": b"c", "photos/u/out/part-r-k.parquet": b"p",
                 "photos/u/out/_runs/r.json": b"r", "photos/secrets/key.jpg": b"k", "secrets/key.jpg": b"k"})  # fmt: skip

        def listed(uri: str) -> list[str]:
            return list_inputs(InputConfig(uri=uri), options, output="s3://photos/u/out").column("path").to_pylist()

        assert listed("s3://photos/u/*") == ["s3://photos/u/a.jpg"]  # neither album/ nor out/
        assert listed("s3://photos/u/**") == ["s3://photos/u/a.jpg", "s3://photos/u/album/c.jpg"]
        outside = ["../../secrets/key.jpg", "s3://secrets/key.jpg", "s3://photos/u/../secrets/key.jpg", "/etc/hostname"]
        fs.pipe("photos/u/m.csv", ("path,user_id\na.jpg,u\n" + "".join(f"{p},u\n" for p in outside)).encode())
        listing = list_inputs(InputConfig(uri="s3://photos/u/m.csv"), options)
        read = ReadBytes(ReadConfig(), options)(listing).to_pylist()
    assert [r["path"] for r in read] == ["s3://photos/u/a.jpg", "s3://photos/secrets/key.jpg", "s3://secrets/key.jpg",
                                         "s3://photos/secrets/key.jpg", "/etc/hostname"]  # fmt: skip
    assert read[0]["data"] == b"a"
    assert [(r["error_kind"], r["data"]) for r in read[1:]] == [("outside_input_scope", None)] * len(outside)
    assert all("[s3://photos/u]" in r["error"] for r in read[1:])


def test_a_manifest_cell_is_missing_only_when_empty(photos):
    manifest = photos / "lists" / "users.csv"
    manifest.write_text("path,user_id\n../photos/a.jpg,nan\n../photos/b.png,NULL\n../photos/a.jpg,NA\n../photos/b.png,\n")
    listing = list_inputs(InputConfig(uri=str(manifest), allowed=[str(photos)])).to_pylist()
    assert [r["user_id"] for r in listing[:3]] == ["nan", "NULL", "NA"]
    assert [r["error"] for r in listing[:3]] == [None] * 3
    assert "'user_id' is empty" in listing[3]["error"]
