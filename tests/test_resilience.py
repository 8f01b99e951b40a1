"""A run that loses a worker, or is interrupted, still writes every photo exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO, make_config, photo

from plvm_model.store.output_table import OutputTable, keys, read_output
from pipelines.caption import caption
from pipelines.enroll import enroll
from plvm_model.store.errors import OutputExists


def photos(n_each: int) -> list[str]:
    return [photo(p, f"{i}.jpg") for p in ("viruss", "thao") for i in range(n_each)]


def write_manifest(path: Path, paths: list[str], user: str) -> str:
    path.write_text("path,user_id\n" + "".join(f"{p},{user}\n" for p in paths))
    return str(path)


def assert_exactly_once(uri: str, paths: list[str], user: str) -> None:
    written = keys(read_output(uri, columns=["path", "user_id"]))
    assert written == {(p, user): 1 for p in paths}


def caption_command(tmp_path: Path, config, paths: list[str], user: str) -> tuple[list[str], dict[str, str]]:
    """The ``plvm caption`` command line (and its environment) of ``config`` over a manifest of ``paths``."""
    data = config.model_dump(mode="json")
    data["input"]["uri"] = write_manifest(tmp_path / "m.csv", paths, user)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "pipelines.cli", "caption", "--config", str(config_file)]
    return command, {**os.environ, "PYTHONPATH": str(REPO)}


def killed_when(command: list[str], env: dict[str, str], ready, cwd: Path | None = None) -> int:
    """Run ``command`` in a session of its own and SIGKILL it, with every process it started, as soon as ``ready()``
    (or it ended, or 600 s went by); its exit status. Its session is stopped (SIGSTOP) first, at once, so that
    nothing its driver does after ``ready()`` (a commit) lands while the processes to kill are listed."""
    started = subprocess.Popen(command, env=env, cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    while not ready() and time.monotonic() < deadline and started.poll() is None:
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(started.pid, signal.SIGSTOP)
    family = psutil.Process(started.pid).children(recursive=True) if started.poll() is None else []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(started.pid, signal.SIGKILL)
    for proc in family:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return started.wait()


def kill_once(pattern: str, found: list[int], stop: threading.Event) -> None:
    """SIGKILL the first process whose command line contains ``pattern``."""
    while not stop.is_set():
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if pattern in " ".join(proc.info["cmdline"] or []):
                    time.sleep(1.0)  # let it take work first
                    proc.kill()
                    found.append(proc.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.2)


def test_a_killed_actor_is_replaced_and_every_row_is_written_once(tmp_path, yollava, tiny_models, ray_local):
    config = make_config(tmp_path, output={"rows_per_file": 2})
    enroll(config, "kim", "Viruss", [photo("viruss", "ref_img.jpg")])
    paths = photos(6)
    manifest = write_manifest(tmp_path / "m.csv", paths, "kim")
    config = config.model_copy(update={"input": config.input.model_copy(update={"uri": manifest})})
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_once, args=("MapBatches(EmbedFaces)", killed, stop), daemon=True)
    killer.start()
    try:
        summary = caption(config)
    finally:
        stop.set()
    assert killed, "the embed actor was killed during the run"
    assert summary.rows == summary.photos == len(paths) and not summary.missing and not summary.duplicates
    assert_exactly_once(config.output.uri, paths, "kim")
    rows = read_output(config.output.uri).to_pylist()
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    assert sum("Viruss" in r["concepts"] for r in rows) >= 5


def test_an_interrupted_run_is_completed_by_resume_without_duplicates(tmp_path, yollava, tiny_models):
    # small generate batches of longer answers: the parts are written over seconds, so the kill lands part-way
    small = {"concurrency": 1, "num_cpus": 0.25, "threads": 1, "batch_size": 2}
    config = make_config(tmp_path, output={"rows_per_file": 2}, ray={"num_cpus": 2, "progress": "off"},
                         generate={"max_new_tokens": 24, "resources": small})  # fmt: skip
    enroll(config, "lee", "Thao", [photo("thao", "ref_img.jpg")])
    paths = photos(8)
    command, env = caption_command(tmp_path, config, paths, "lee")
    out = Path(config.output.uri)

    # killed once the first part is committed: the table's log has its version 1 (0 made the table)
    killed_when(command, env, (out / "_delta_log" / f"{1:020d}.json").exists, cwd=tmp_path)
    before = keys(read_output(str(out), columns=["path", "user_id"]))
    assert 0 < sum(before.values()) < len(paths), "the run was stopped part-way"
    assert all(n == 1 for n in before.values())

    refused = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    done = subprocess.run([*command, "--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == sum(before.values())
    assert summary["photos"] == len(paths) - summary["skipped"]
    assert_exactly_once(str(out), paths, "lee")
    assert not (out / "_staging").exists() or not any((out / "_staging").iterdir())


def test_overwrite_starts_again(tmp_path, yollava, tiny_models, ray_local):
    config = make_config(tmp_path)
    enroll(config, "max", "Thao", [photo("thao", "ref_img.jpg")])
    paths = photos(1)
    config = config.model_copy(
        update={"input": config.input.model_copy(update={"uri": write_manifest(tmp_path / "m.csv", paths, "max")})}
    )
    first = caption(config)
    with pytest.raises(OutputExists, match="already holds 2 rows"):
        caption(config)
    second = caption(config, overwrite=True)
    assert second.run_id != first.run_id
    assert_exactly_once(config.output.uri, paths, "max")
    assert OutputTable(config.output.uri).part_files(first.run_id) == []

