"""The output's lease: one run at a time writes into an output; stale leases are taken over; repair."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, make_config, photo
from deltalake import DeltaTable
from deltalake.transaction import AddAction

from plvm_model.store.output_table import OutputTable, Staged, read_output
from plvm_model.store.output_schema import output_schema
from operators.write import WriteParts
from pipelines.caption import caption
from pipelines.cli import run
from pipelines.enroll import enroll
from plvm_model.store import storage
from plvm_model.store.errors import LeaseLost, OutputLocked, RowCountMismatch
from plvm_model.store.lease import LEASE, Holder, Lease, held_by
from s3_endpoint import moto_endpoint, s3_options
from test_resilience import assert_exactly_once, caption_command, photos, write_manifest


@pytest.fixture(scope="module")
def s3():
    with moto_endpoint() as endpoint:
        options = s3_options(endpoint)
        fs = fsspec.filesystem("s3", **options["s3"])
        fs.mkdir("leases")
        yield fs, options


def plant(fs: fsspec.AbstractFileSystem, root: str, **changes) -> Holder:
    """A lease file written as another process would have written it."""
    holder = Holder(**{**Holder.me("20260101T000000Z-other", "caption", 60).__dict__, **changes})
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{LEASE}", holder.encode())
    return holder


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_taker_is_refused_naming_the_holder_until_the_lease_is_released(tmp_path):
    fs, root = storage.filesystem(str(tmp_path))
    with Lease.take(fs, root, str(tmp_path), "run-a", "caption", 60):
        with pytest.raises(OutputLocked) as refused:
            Lease.take(fs, root, str(tmp_path), "run-b", "repair", 60)
        holder = f"run run-a (plvm caption) on host {socket.gethostname()}, pid {os.getpid()}, heartbeat 0 s ago"
        assert holder in str(refused.value)
        assert held_by(fs, root, "run-a") and not held_by(fs, root, "run-b")
    assert not (tmp_path / LEASE).exists()
    with Lease.take(fs, root, str(tmp_path), "run-b", "repair", 60):
        assert held_by(fs, root, "run-b")


def test_a_live_lease_of_another_host_is_not_taken_over(tmp_path):
    fs, root = storage.filesystem(str(tmp_path))
    plant(fs, root, host="elsewhere", pid=dead_pid(), heartbeat=time.time() - 30)
    with pytest.raises(OutputLocked, match="on host elsewhere, pid .*heartbeat 30 s ago"):
        Lease.take(fs, root, str(tmp_path), "run-b", "caption", 60)


@pytest.mark.parametrize("stale", ["dead process", "expired heartbeat"])
def test_a_stale_lease_is_taken_over(tmp_path, stale, caplog):
    fs, root = storage.filesystem(str(tmp_path))
    if stale == "dead process":
        plant(fs, root, pid=dead_pid())  # this host, fresh heartbeat, but the process is gone
    else:
        plant(fs, root, host="elsewhere", heartbeat=time.time() - 61)
    with Lease.take(fs, root, str(tmp_path), "run-b", "caption", 60):
        assert held_by(fs, root, "run-b")
    reason = "process .* on this host is gone" if stale == "dead process" else "heartbeat is 61 s old, over its expiry"
    assert any(r.levelname == "WARNING" and "took over the stale lease" in r.message for r in caplog.records)
    assert re.search(reason, caplog.text)


RACER = """
import json, os, sys, time
from plvm_model.store import lease, storage
from plvm_model.store.errors import OutputLocked
uri, options, run_id, go, done = sys.argv[1], json.loads(sys.argv[2]), *sys.argv[3:]
fs, root = storage.filesystem(uri, options)
real_lease_file = lease.lease_file

def gated_lease_file(fs, path):  # every racer judges the lease stale, then all replace it at the same moment
    file = real_lease_file(fs, path)
    replace = file.replace
    def replace_at_go(data, version):
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.001)
        return replace(data, version)
    file.replace = replace_at_go
    return file

lease.lease_file = gated_lease_file
try:
    held = lease.Lease.take(fs, root, uri, run_id, "caption", 60)
    print("won", flush=True)
except OutputLocked as error:
    print("refused", error, flush=True)
while not os.path.exists(done):  # the winner holds the lease until every racer has tried
    time.sleep(0.01)
"""


@pytest.mark.parametrize("where", ["local", "s3"])
def test_only_one_of_several_takers_of_a_stale_lease_wins(tmp_path, where, request):
    if where == "s3":
        fs, options = request.getfixturevalue("s3")
        uri = f"s3://leases/{tmp_path.name}"
    else:
        fs, options = fsspec.filesystem("file"), {}
        uri = str(tmp_path / "out")
    root = storage.filesystem(uri, options)[1]
    plant(fs, root, host="elsewhere", heartbeat=time.time() - 600)
    go, done = tmp_path / "go", tmp_path / "done"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, uri, json.dumps(options), f"racer-{i}", str(go), str(done)],
                               env=env, stdout=subprocess.PIPE, text=True) for i in range(4)]  # fmt: skip
    try:
        assert all(r.stdout.readline().strip() == "ready" for r in racers)
        go.touch()
        results = [r.stdout.readline().strip() for r in racers]
    finally:
        done.touch()
        for r in racers:
            r.wait(timeout=60)
    assert sorted(x.split()[0] for x in results) == ["refused"] * 3 + ["won"], results
    winner = f"racer-{results.index('won')}"
    assert all(f"run {winner} (plvm caption)" in x for x in results if x != "won")
    assert json.loads(fs.cat_file(f"{root}/{LEASE}"))["run_id"] == winner


def test_a_holder_whose_lease_was_taken_over_stops_writing(tmp_path):
    fs, root = storage.filesystem(str(tmp_path))
    lease = Lease.take(fs, root, str(tmp_path), "run-a", "caption", 0.2)  # a heartbeat every 0.05 s
    other = plant(fs, root, host="elsewhere", run_id="run-b")  # as a taker whose clock ran ahead would
    time.sleep(0.3)
    with pytest.raises(LeaseLost, match="lost the lease .* held by run run-b .* on host elsewhere"):
        lease.check()
    lease.release()
    assert json.loads((tmp_path / LEASE).read_text()) == other.__dict__, "the new holder's lease is left alone"
    batch = pa.table({"index": [0], "path": [photo("thao", "0.jpg")], "user_id": ["kim"]})
    out = OutputTable(str(tmp_path))
    out.open(output_schema())
    staged = Staged(**WriteParts(str(tmp_path), "run-a")(batch).to_pylist()[0])
    with pytest.raises(LeaseLost, match="no longer holds the lease"):
        out.commit([staged], "run-a")
    assert out.part_files() == [] and not list(tmp_path.glob("part-*")), "nothing was committed or published"


def test_two_runs_started_at_once_into_one_output_write_each_photo_once(tmp_path, yollava, tiny_models):
    config = make_config(tmp_path)
    enroll(config, "kim", "Thao", [photo("thao", "ref_img.jpg")])
    paths = photos(1)
    command, env = caption_command(tmp_path, config, paths, "kim")
    runs = [subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = [(r.wait(timeout=600), *r.communicate()) for r in runs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], [err[-2000:] for _, _, err in results]
    (_, out, _), (_, _, refused) = sorted(results)
    winner = json.loads(out.strip().splitlines()[-1])
    assert f"is being written by run {winner['run_id']} (plvm caption) on host {socket.gethostname()}" in refused
    assert refused.startswith("plvm caption: error:") and len(refused.strip().splitlines()) == 1
    assert_exactly_once(config.output.uri, paths, "kim")
    assert not Path(config.output.uri, LEASE).exists()


def test_a_run_whose_lease_is_taken_over_stops_without_committing(tmp_path, yollava, tiny_models, ray_local):
    paths = photos(1)
    config = make_config(tmp_path, input={"uri": write_manifest(tmp_path / "m.csv", paths, "kim")},
                         output={"lease_expiry_s": 2})  # a heartbeat every 0.5 s  # fmt: skip
    enroll(config, "kim", "Thao", [photo("thao", "ref_img.jpg")])
    out = Path(config.output.uri)
    raised: list[BaseException] = []
    running = threading.Thread(target=lambda: raised.extend(catch(LeaseLost, caption, config)))
    running.start()
    deadline = time.monotonic() + 120
    while not (out / LEASE).exists() and running.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    taker = plant(fsspec.filesystem("file"), str(out), host="elsewhere")  # while the run's pipeline starts
    running.join(timeout=600)
    assert len(raised) == 1, "the run stopped with LeaseLost"
    assert re.match(rf"run \S+ lost the lease {out / LEASE}: another process changed it; it is now held by run "
                    rf"{taker.run_id} \(plvm caption\) on host elsewhere", str(raised[0])), raised  # fmt: skip
    assert OutputTable(str(out)).part_files() == [] and not (out / "_runs").exists()
    assert json.loads((out / LEASE).read_text()) == taker.__dict__


def catch(kind: type[BaseException], function, *args) -> list[BaseException]:
    """The exception of ``kind`` that ``function(*args)`` raised, as a list (empty if none)."""
    try:
        function(*args)
    except kind as error:
        return [error]
    return []


def test_repair_keeps_one_row_per_photo_and_resume_then_works(tmp_path, yollava, tiny_models, ray_local, capsys):
    paths = photos(1)
    config = make_config(tmp_path, input={"uri": write_manifest(tmp_path / "m.csv", paths, "ann")})
    enroll(config, "ann", "Viruss", [photo("viruss", "ref_img.jpg")])
    first = caption(config)
    out = OutputTable(config.output.uri)
    [part] = out.part_files()
    # a second, newer run wrote the same photos (as two overlapping runs did before the lease); its first row failed
    rows = pq.read_table(part).to_pylist()
    rows[0] |= {"error": f"{rows[0]['path']}: generate failed", "error_kind": "stage_failed", "caption": None}
    newer = part.replace(first.run_id, "29991231T000000Z-later0")
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(part)), newer)
    size = os.path.getsize(newer)
    DeltaTable(config.output.uri).create_write_transaction(
        [AddAction(os.path.basename(newer), size, {}, 0, True, "{}")], "append", pq.read_schema(part)
    )  # committed beside the first run's part, as no run under the lease does
    with pytest.raises(RowCountMismatch, match=rf"2 more rows .*\(plvm repair {config.output.uri} keeps one row"):
        caption(config, resume=True)  # the stuck state: every resume fails

    plant(out.fs, out.root, pid=dead_pid())  # and the run that left it was killed holding the lease
    config_file = tmp_path / "repair.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert run(["repair", "--config", str(config_file), config.output.uri]) == 0
    printed = capsys.readouterr().out
    assert "removed 2 duplicate row(s)" in printed
    assert f"removed a second row of {rows[0]['path']} (user ann) with an error: run 29991231T000000Z-later0" in printed
    assert f"removed a second row of {rows[1]['path']} (user ann): run {first.run_id}" in printed
    assert sorted(Path(config.output.uri).glob("part-*.parquet")) == [Path(p) for p in out.part_files()], \
        "the rewritten parts were vacuumed: a plain Parquet reader sees one row per photo"
    assert_exactly_once(config.output.uri, paths, "ann")
    assert all(r["error"] is None for r in read_output(config.output.uri).to_pylist())

    resumed = caption(config, resume=True)
    assert resumed.skipped == len(paths) and resumed.photos == 0
    assert_exactly_once(config.output.uri, paths, "ann")


def test_repair_of_a_missing_output_is_refused(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert run(["repair", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"plvm repair: error: {missing} does not exist: nothing to repair"
    assert not missing.exists()
