"""A real two-node Ray cluster on 127.0.0.1, a job through ``submit.py``, photos and output on S3."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter

import psutil
import pytest
from conftest import REPO
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
    code, stdout, stderr = result["submit"]
    assert code == 0, stdout + stderr
    assert "SUCCEEDED" in stderr

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
