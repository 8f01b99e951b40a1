"""A real two-node Ray cluster on 127.0.0.1, scheduled jobs through ``submit.py``, photos and output on S3."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter

import psutil
import pytest
from conftest import REPO, assert_metrics_are_the_record, prometheus_samples
from test_ray_exposure import family, running

pytestmark = pytest.mark.cluster


def private_network() -> list[str]:
    """A command prefix that runs in a new network namespace with loopback up, where allowed."""
    probe = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True)
    if shutil.which("unshare") and probe.returncode == 0:
        return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    return []


def test_caption_job_on_a_two_node_cluster_with_s3(tmp_path, yollava, tiny_models, ray_local):
    other = [p for p in family(psutil.Process().pid) if p.name() in ("gcs_server", "raylet")]  # ray_local's
    result_file = tmp_path / "result.json"
    command = [*private_network(), sys.executable, str(REPO / "tests" / "cluster_scenario.py"), str(result_file)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(result_file.read_text())
    stopped = Counter(result["cluster"]["stopped"])
    assert stopped["gcs_server"] == 1 and stopped["raylet"] == 2, stopped
    assert result["cluster"]["running"] == [], "the scenario stops the cluster it started"
    assert other and all(running(p) for p in other), "and no other Ray on the machine"
    assert [code for code, _ in result["enroll"]] == [0, 0], result["enroll"]
    assert result["head"][0] == 0 and result["worker"][0] == 0, (result["head"], result["worker"])
    assert result["nodes"] == [True, True], "two live nodes"
    scheduled(result)

    expected = {(path, user): person for path, user, person in result["expected"]}
    rows = {(r["path"], r["user_id"]): r for r in result["rows"]}
    assert Counter((r["path"], r["user_id"]) for r in result["rows"]) == Counter(list(expected)), "each photo once"
    names = {"ana": {"thao": "Thao"}, "ben": {"willinvietnam": "Will"}}
    for key, person in expected.items():
        row = rows[key]
        if person is None:
            assert row["error_kind"] == "empty_file"
            continue
        assert row["error_kind"] is None and row["caption"] and row["engine"] == "transformers"
        wanted = names[key[1]].get(person)
        if wanted:
            assert wanted in row["concepts"], row
        assert not set(row["concepts"]) - set(names[key[1]].values()), "only the photo owner's concepts"


def scheduled(result: dict) -> None:
    """What a scheduler relies on, as the scenario's submissions saw it (tests/cluster_scenario.py)."""
    jobs = result["jobs"]
    (first, a_out, a_err), (second, b_out, b_err) = result["twice"]
    [tick] = {out.splitlines()[0] for out in (a_out, b_out)}
    assert tick.startswith("plvm-caption-20260820T000000Z-"), "one tick, spelled two ways, is one submission id"
    attempts = [tick, f"{tick}-retry1", f"{tick}-retry2"]
    assert sorted(j for j in jobs if j.startswith(tick)) == attempts, "the tick submitted twice ran once (3 attempts)"
    for job in attempts:
        assert sum(f"submit.py: {job} was submitted before" in err for err in (a_err, b_err)) == 1, "one submitted it"

    # killed mid-way (its driver, then the retry's engine), each attempt retried with --resume, every photo once (below)
    assert [jobs[j]["driver_exit_code"] for j in attempts] in ([-9, 3, 0], [137, 3, 0]), "SIGKILL, failed, done"
    assert [jobs[j]["status"] for j in attempts] == ["FAILED", "FAILED", "SUCCEEDED"]
    assert "--resume" not in jobs[tick]["entrypoint"]
    assert all(jobs[j]["entrypoint"].endswith(" --resume") for j in attempts[1:])
    assert first == second == 0, (a_err, b_err)
    for err in (a_err, b_err):
        assert f"{tick} ended with exit code 137, which is retryable: attempt 1 of 2" in err
        assert f"{tick}-retry1 ended with exit code 3, which is retryable: attempt 2 of 2" in err

    # --wait ends with the driver's exit code: 3, and 137 for the killed one, for the jobs found submitted before
    code, out, err = result["retried"]
    assert out.splitlines()[0] == attempts[1] and code == 3, err
    code, out, err = result["again"]
    assert out.splitlines()[0] == tick and code == 137, err
    # without --wait, a tick submitted before is reported: each attempt's status and exit code
    code, out, err = result["reported"]
    assert out.splitlines()[0] == tick and code == 0, err
    reported = [line for line in err.splitlines() if line.startswith(f"submit.py: {tick}") and "exit code" in line]
    assert reported == [f"submit.py: {job}: {status}, exit code {ended}" for job, status, ended in
                        zip(attempts, ("FAILED", "FAILED", "SUCCEEDED"), (137, 3, 0))], err  # fmt: skip

    # the overlapping tick: refused by the lease, exit code 2 as its driver's, not retried
    code, out, err = result["overlapping"]
    other = out.splitlines()[0]
    assert other.startswith("plvm-caption-20260821T020000Z-") and jobs[other]["driver_exit_code"] == code == 2, err
    assert "is being written by run" in jobs[other]["log"] and f"{other}-retry1" not in jobs, "a user error: no retry"
    assert len(jobs) == 4

    # the kept logs are the cluster's own logs of each job, whole; the streamed output holds them too
    for job in attempts:
        assert result["kept"][f"{job}.log"] == jobs[job]["log"] and jobs[job]["log"] in a_out
        assert f"Running entrypoint for job {job}" in jobs[job]["log"]
    [summary] = [json.loads(line) for line in jobs[attempts[2]]["log"].splitlines() if line.startswith('{"run_id"')]

    # the runs that ended recorded their summary and metrics beside the output, and pushed them
    records = {name: json.loads(text) for name, text in result["records"].items() if name.endswith(".json")}
    failed, done = sorted(records.values(), key=lambda r: r["started"])
    assert (failed["status"], done["status"], done["run_id"]) == ("failed", "ok", summary["run_id"])
    assert failed["skipped"] > 0, "the first retry skipped what the killed run had committed"
    assert done["skipped"] == failed["skipped"] + failed["rows"] and done["skipped"] + done["photos"] == 13
    assert len(result["pushes"]) == 2
    for record, (method, path, body) in zip((failed, done), result["pushes"]):
        samples = prometheus_samples(body)
        assert method == "PUT" and path.startswith("/metrics/job/plvm/command/caption/output@base64/")
        assert samples == prometheus_samples(result["records"][f"{record['run_id']}.prom"])
        assert_metrics_are_the_record(samples, record, "caption", "s3://results/cluster")
