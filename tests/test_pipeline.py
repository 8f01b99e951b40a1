"""The caption pipeline end to end on a real local Ray: one row per input photo, always."""

from __future__ import annotations

import base64
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
from PIL import Image

from conftest import REPO, assert_metrics_are_the_record, make_config, photo, prometheus_samples, pushgateway
from test_decode import _png_claiming as png_claiming
from plvm_model.store.output_table import OutputTable, read_output
from pipelines.caption import caption
from pipelines.runner import metrics
from pipelines.enroll import enroll
from pipelines.runner.runtime import ACTOR_RESTART_NOTICE
from plvm_model.store.banks import BankStore, Bank


def unusual_versions(source: str, folder: Path) -> list[Path]:
    """The photo as 16-bit grayscale, CMYK, palette, RGBA, grayscale, EXIF-rotated, and a tiny image."""
    image = Image.open(source).convert("RGB")
    image.thumbnail((800, 800))
    gray16 = Image.fromarray((np.asarray(image.convert("L"), np.uint16) * 257))
    rotated_exif = Image.Exif()
    rotated_exif[0x0112] = 8  # stored turned clockwise; shown upright after a 90-degree counter-turn
    versions = {
        "gray16.png": (gray16, {}),
        "cmyk.jpg": (image.convert("CMYK"), {}),
        "palette.png": (image.convert("P", palette=Image.Palette.ADAPTIVE), {}),
        "rgba.png": (image.convert("RGBA"), {}),
        "gray.jpg": (image.convert("L"), {}),
        "rotated.jpg": (image.transpose(Image.Transpose.ROTATE_270), {"exif": rotated_exif}),
        "tiny.png": (image.resize((6, 8)), {}),
    }
    paths = []
    for name, (picture, options) in versions.items():
        picture.save(folder / name, **options)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory, yollava, tiny_models, ray_local):
    """One pipeline run over a manifest mixing good photos, bad files and bad rows of several users."""
    tmp = tmp_path_factory.mktemp("pipeline")
    config = make_config(tmp)
    enroll(config, "alice", "Thao", [photo("thao", "ref_img.jpg")])
    enroll(config, "bob", "Viruss", [photo("viruss", "ref_img.jpg")])
    paths = config.model_paths()
    BankStore(config.bank).save(Bank("zoe", "dlib-resnet-v1", paths.aligner_identity))  # an empty bank

    good = tmp / "good.jpg"
    Image.open(photo("thao", "7.jpg")).save(good)
    bad = {
        "empty.jpg": b"",
        "notes.jpg": b"shopping list: eggs, milk\n",
        "truncated.jpg": good.read_bytes()[:5000],
        "bomb.png": png_claiming(80_000, 80_000),
    }
    for name, data in bad.items():
        (tmp / name).write_bytes(data)
    unusual = unusual_versions(photo("thao", "9.jpg"), tmp)
    rows = (
        [(photo("thao", f"{i}.jpg"), "alice") for i in range(4)]
        + [(photo("viruss", f"{i}.jpg"), "alice") for i in range(2)]
        + [(photo("viruss", "3.jpg"), "bob"), (photo("thao", "4.jpg"), "bob")]
        + [(str(good), "alice")]
        + [(str(path), "alice") for path in unusual]
        + [(str(tmp / name), "alice") for name in bad]
        + [(str(tmp / "missing.jpg"), "alice")]
        + [(photo("thao", "5.jpg"), "nobody"), (photo("thao", "6.jpg"), "zoe")]
        + [("", "alice"), (photo("thao", "8.jpg"), "../alice")]
    )
    manifest = tmp / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "user_id"])
        writer.writerows(rows)
        f.write(f"{photo('thao', '9.jpg')},alice,an extra field\n")  # a ragged line
    config = config.model_copy(update={"input": config.input.model_copy(update={"uri": str(manifest)})})
    summary = caption(config)
    table = read_output(config.output.uri)
    rows.append((f"{manifest}#line={len(rows) + 2}", "default"))  # the manifest's default user
    return rows, summary, {(r["path"], r["user_id"]): r for r in table.to_pylist()}, table, config


def test_every_input_row_has_exactly_one_output_row(run):
    rows, summary, by_key, table, _ = run
    assert table.num_rows == len(rows) == summary.photos == summary.rows
    manifest = run[4].input.uri
    # a manifest row without a path is known by its place in the manifest
    expected = {(path or f"{manifest}#row={i + 1}", user) for i, (path, user) in enumerate(rows)}
    assert set(by_key) == expected, "no input row is lost or written twice"
    assert summary.output and all(Path(f).exists() for f in summary.output)


def test_enrolled_person_is_named_in_her_own_photos(run):
    rows, _, by_key, _, _ = run
    for i in range(4):
        row = by_key[(photo("thao", f"{i}.jpg"), "alice")]
        assert row["error"] is None
        assert "Thao" in row["concepts"], row["faces"]
        assert row["caption"] and row["answers"][0]["question"] == "Who is in this photo?"
        assert row["model"] == "llava-tiny-random" and row["engine"] == "transformers"
        named = [f for f in row["faces"] if f["concept"] == "Thao"]
        assert len(named) == 1 and named[0]["distance"] < 0.6
        x1, y1, x2, y2 = named[0]["box"]
        assert 0 <= x1 < x2 <= row["width"] and 0 <= y1 < y2 <= row["height"]


def test_other_people_and_other_users_concepts_are_not_named(run):
    _, _, by_key, _, _ = run
    for i in range(2):
        assert "Thao" not in by_key[(photo("viruss", f"{i}.jpg"), "alice")]["concepts"]
    assert by_key[(photo("viruss", "3.jpg"), "bob")]["concepts"] == ["Viruss"]
    thao_in_bobs_photo = by_key[(photo("thao", "4.jpg"), "bob")]
    assert thao_in_bobs_photo["error"] is None and thao_in_bobs_photo["faces"]
    assert "Thao" not in thao_in_bobs_photo["concepts"], "alice's concept is never matched in bob's photo"


def test_bad_inputs_get_clear_errors_and_nothing_else_is_lost(run):
    rows, summary, by_key, table, config = run
    tmp = Path(config.bank).parent
    expected = {
        (str(tmp / "empty.jpg"), "alice"): "empty_file",
        (str(tmp / "notes.jpg"), "alice"): "not_an_image",
        (str(tmp / "truncated.jpg"), "alice"): "truncated",
        (str(tmp / "missing.jpg"), "alice"): "missing_file",
        (str(tmp / "bomb.png"), "alice"): "decompression_bomb",
        rows[-1]: "bad_manifest_row",  # the ragged line
        (photo("thao", "5.jpg"), "nobody"): "unknown_user",
        (photo("thao", "6.jpg"), "zoe"): "empty_bank",
        (photo("thao", "8.jpg"), "../alice"): "invalid_user",
    }
    for key, kind in expected.items():
        row = by_key[key]
        assert row["error_kind"] == kind, row
        assert row["caption"] is None
    assert "nobody" in by_key[(photo("thao", "5.jpg"), "nobody")]["error"]
    assert "empty.jpg" in by_key[(str(tmp / "empty.jpg"), "alice")]["error"]
    empty = rows.index(("", "alice")) + 1
    no_path = by_key[(f"{config.input.uri}#row={empty}", "alice")]
    assert no_path["error_kind"] == "bad_manifest_row" and f"row {empty}: 'path' is empty" in no_path["error"]
    assert "has 3 fields, expected 2" in by_key[rows[-1]]["error"]
    good = by_key[(str(tmp / "good.jpg"), "alice")]
    assert good["error"] is None and good["concepts"] == ["Thao"]
    assert sum(summary.errors.values()) == len(expected) + 1
    assert summary.errors["unknown_user"] == 1


def test_unusual_but_valid_photos_are_handled_and_named(run):
    _, _, by_key, _, config = run
    tmp = Path(config.bank).parent
    for name in ("gray16.png", "cmyk.jpg", "palette.png", "rgba.png", "gray.jpg", "rotated.jpg"):
        row = by_key[(str(tmp / name), "alice")]
        assert row["error"] is None, row["error"]
        assert row["concepts"] == ["Thao"], f"{name}: {row['faces']}"
    rotated = by_key[(str(tmp / "rotated.jpg"), "alice")]
    assert rotated["height"] > rotated["width"], "EXIF orientation applied: the photo is upright, portrait"
    tiny = by_key[(str(tmp / "tiny.png"), "alice")]
    assert tiny["error"] is None and tiny["faces"] == [] and tiny["caption"], "no face is a normal row"


def test_run_record_is_written_next_to_the_output(run):
    _, summary, _, _, config = run
    record = json.loads((Path(config.output.uri) / "_runs" / f"{summary.run_id}.json").read_text())
    assert record["rows"] == record["photos"] == summary.photos
    assert not (Path(config.output.uri) / "_staging" / summary.run_id).exists()


def test_the_run_metrics_beside_its_record_are_the_summary_s(run):
    _, summary, _, _, config = run
    runs = Path(config.output.uri) / "_runs"
    record = json.loads((runs / f"{summary.run_id}.json").read_text())
    samples = prometheus_samples((runs / f"{summary.run_id}.prom").read_text())
    assert_metrics_are_the_record(samples, record, "caption", config.output.uri)
    assert len(record["errors"]) >= 5 and record["status"] == "ok", "errors of several kinds, counted by kind"


def test_the_run_metrics_are_pushed_to_a_pushgateway(run, tmp_path, caplog):
    _, summary, _, _, config = run
    record = json.loads((Path(config.output.uri) / "_runs" / f"{summary.run_id}.json").read_text())
    with pushgateway() as (url, received):
        output = OutputTable(str(tmp_path / "out"))
        metrics.record(output, "caption", record, push=url)
    [(method, path, body)] = received
    key = base64.urlsafe_b64encode(output.uri.encode()).decode()
    assert (method, path) == ("PUT", f"/metrics/job/plvm/command/caption/output@base64/{key}")
    written = (tmp_path / "out" / "_runs" / f"{summary.run_id}.prom").read_text()
    assert prometheus_samples(body) == prometheus_samples(written)

    metrics.record(OutputTable(str(tmp_path / "again")), "caption", record, push=url)  # the gateway is gone
    assert f"run {summary.run_id}: its metrics were not pushed to {url}" in caplog.text
    assert (tmp_path / "again" / "_runs" / f"{summary.run_id}.prom").exists(), "the run's record stands"


def test_the_readme_commands_work_from_the_command_line(tmp_path, yollava, tiny_models):
    """enroll, caption and show through the ``plvm`` console script, as a user runs them."""
    plvm = [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run_cli(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*plvm, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    viruss = photo("viruss", "ref_img.jpg")
    enrolled = run_cli("enroll", "--bank", "banks", "--user", "demo", "--name", "Viruss", viruss)
    assert "enrolled 'Viruss'" in enrolled.stdout
    caption = run_cli("caption", "--bank", "banks", "--user", "demo", "--input", str(yollava / "viruss" / "[4-6].jpg"),
                      "--output", "captions")  # fmt: skip
    assert "3 photos -> 3 rows" in caption.stdout
    assert json.loads(caption.stdout.strip().splitlines()[-1])["rows"] == 3
    # progress and the summary, not Ray's internal notices that read like failures (pipelines/runtime.py)
    assert "progress: 3/3 photos written" in caption.stderr
    assert ACTOR_RESTART_NOTICE not in caption.stderr and "core_worker.cc" not in caption.stderr
    assert "Progress bars disabled" not in caption.stderr
    shown = run_cli("show", "captions").stdout
    assert shown.count("[Viruss]") >= 2

    bad = subprocess.run([*plvm, "caption", "--input", str(tmp_path / "nowhere"), "--output", "x"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "nowhere does not exist" in bad.stderr
