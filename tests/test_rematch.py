"""``plvm rematch``: after a bank changed, only the photos whose names changed get new rows, in one commit."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from conftest import make_config, photo, prometheus_samples
from deltalake import DeltaTable
from test_resilience import assert_exactly_once, caption_command, killed_when, write_manifest

from plvm_model.store.output_table import read_output
from pipelines.caption import caption
from pipelines.cli import run
from pipelines.enroll import enroll
from pipelines.rematch import rematch


def archive(tmp_path: Path, user: str, **sections):
    """A caption run over 3 photos of Thao and 3 of Viruss with only Thao enrolled; its config and paths."""
    paths = [photo(p, f"{i}.jpg") for p in ("thao", "viruss") for i in range(3)]
    config = make_config(tmp_path, input={"uri": write_manifest(tmp_path / "m.csv", paths, user)}, **sections)
    enroll(config, user, "Thao", [photo("thao", "ref_img.jpg")])
    caption(config)
    return config, paths


def data_commits(uri: str, since: int) -> list[str]:
    """The ``plvm.operation`` of each commit after version ``since`` that changed rows (vacuums change none)."""
    history = [c for c in DeltaTable(uri).history() if c["version"] > since]
    return [c["plvm.operation"] for c in sorted(history, key=lambda c: c["version"]) if "VACUUM" not in c["operation"]]


def by_path(uri: str) -> dict[str, dict]:
    return {r["path"]: r for r in read_output(uri).to_pylist()}


def test_rematch_after_enrolling_replaces_only_the_photos_that_now_name_the_person(tmp_path, yollava, tiny_models,
                                                                                     ray_local, capsys):  # fmt: skip
    config, paths = archive(tmp_path, "kim")
    out = config.output.uri
    before, version = by_path(out), DeltaTable(out).version()
    assert {p for p, r in before.items() if r["concepts"] == ["Thao"]} == set(paths[:3])
    enroll(config, "kim", "Viruss", [photo("viruss", "ref_img.jpg")])
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    assert run(["rematch", "--config", str(config_file), out]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["photos"], summary["changed"], summary["rows"], summary["not_indexed"]) == (6, 3, 3, 0)
    assert summary["version"] == version + 1 and data_commits(out, version) == ["rematch"], "one commit"
    metrics = prometheus_samples((Path(out) / "_runs" / f"{summary['run_id']}.prom").read_text())
    mine = {"command": "rematch"}
    counts = {name: metrics[(f"plvm_run_{name}", frozenset(mine.items()))] for name in summary if
              (f"plvm_run_{name}", frozenset(mine.items())) in metrics}  # fmt: skip
    assert counts == {name: summary[name] for name in ("photos", "changed", "rows", "not_indexed")}, "its metrics"
    assert metrics[("plvm_run_status", frozenset({**mine, "status": "ok"}.items()))] == 1
    after = by_path(out)
    assert_exactly_once(out, paths, "kim")
    for path in paths[:3]:
        assert after[path] == before[path], "a photo whose names did not change keeps its row as it was"
    for path in paths[3:]:
        assert after[path]["concepts"] == ["Viruss"] and before[path]["concepts"] == []
        assert [f["concept"] for f in after[path]["faces"]] == ["Viruss"]
        assert after[path]["caption"] and after[path]["error"] is None
    plain = pq.read_table(out).to_pylist()  # a plain Parquet reader of the folder: the current rows only
    assert sorted(r["path"] for r in plain) == sorted(paths)
    assert {r["path"]: r["concepts"] for r in plain} == {p: r["concepts"] for p, r in after.items()}

    assert run(["show", "--config", str(config_file), out]) == 0
    shown = capsys.readouterr().out
    assert all(f"{p}  [Viruss]" in shown for p in paths[3:]) and all(f"{p}  [Thao]" in shown for p in paths[:3])

    assert run(["rematch", "--config", str(config_file), out]) == 0  # nothing changed since: nothing is written
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["changed"], again["version"]) == (0, None) and data_commits(out, version) == ["rematch"]


def test_a_killed_rematch_leaves_the_previous_version_current_and_whole(tmp_path, yollava, tiny_models, ray_local):
    # one photo per part and slow answers: the rematch stages its parts over seconds, the kill lands before its commit
    small = {"concurrency": 1, "num_cpus": 0.25, "threads": 1, "batch_size": 1}
    config, paths = archive(tmp_path, "lee", output={"rows_per_file": 1},
                            generate={"max_new_tokens": 24, "resources": small})  # fmt: skip
    out = Path(config.output.uri)
    before, version = by_path(str(out)), DeltaTable(str(out)).version()
    enroll(config, "lee", "Viruss", [photo("viruss", "ref_img.jpg")])
    command, env = caption_command(tmp_path, config, paths, "lee")
    command = [*command[:3], "rematch", *command[4:], str(out)]

    status = killed_when(command, env, lambda: bool(list(out.glob("_staging/*/*.tmp"))), cwd=tmp_path)
    assert status == -signal.SIGKILL, "the rematch was killed while it ran"
    assert list(out.glob("_staging/*/*.tmp")), "it had staged new rows"

    assert DeltaTable(str(out)).version() == version, "nothing was committed"
    assert by_path(str(out)) == before, "the previous version is current and whole"
    assert sorted(r["path"] for r in pq.read_table(out).to_pylist()) == sorted(paths), "plain readers too"

    done = subprocess.run(command, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # the killed rematch's lease is taken over (its pid is gone)
    assert json.loads(done.stdout.strip().splitlines()[-1])["changed"] == 3
    assert_exactly_once(str(out), paths, "lee")
    assert not list(out.glob("_staging/*/*")), "the killed rematch's staged parts were removed"


def test_a_rematch_of_an_output_without_rows_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for output in (tmp_path / "nowhere", tmp_path / "empty"):
        assert run(["rematch", str(output)]) == 2
        assert capsys.readouterr().err.strip() == (f"plvm rematch: error: {output} holds no rows: nothing to rematch "
                                                   "(give a caption run's output folder)")  # fmt: skip
    assert not (tmp_path / "nowhere").exists() and list((tmp_path / "empty").iterdir()) == []


def test_a_users_first_enrollment_is_rematched_into_rows_for_photos_that_had_no_bank(tmp_path, yollava, tiny_models,
                                                                                      ray_local):  # fmt: skip
    paths = [photo(p, f"{i}.jpg") for p in ("thao", "viruss") for i in range(2)]
    config = make_config(tmp_path, input={"uri": write_manifest(tmp_path / "m.csv", paths, "noa")})
    caption(config)  # noa has no bank yet: every row is an unknown_user error, but the faces are indexed
    out = config.output.uri
    before = by_path(out)
    assert {r["error_kind"] for r in before.values()} == {"unknown_user"}
    assert all(r["caption"] is None for r in before.values())
    enroll(config, "noa", "Thao", [photo("thao", "ref_img.jpg")])

    summary = rematch(config, out)
    assert (summary.photos, summary.changed, summary.rows, summary.not_indexed) == (4, 4, 4, 0)
    after = by_path(out)
    assert_exactly_once(out, paths, "noa")
    assert all(r["error"] is None and r["caption"] for r in after.values()), "every photo now has its caption"
    assert {p for p, r in after.items() if r["concepts"] == ["Thao"]} == set(paths[:2])
    assert all(after[p]["concepts"] == [] for p in paths[2:])
    assert rematch(config, out).changed == 0, "and a second rematch changes nothing"
