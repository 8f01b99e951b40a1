"""Input listing: a photo has one identity (its normalised path) however the input spells it."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

from operators.read import InputConfig, list_inputs
from plvm_model.storage import normalize


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
