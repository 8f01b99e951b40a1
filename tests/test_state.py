"""Bad state is found at the start and said in one line: an unset variable, a missing output to show,
an output that cannot be written, resources no Ray node has; and every ``plvm`` exit has its code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, make_config
from plvm_model.store.output_schema import output_schema
from pipelines.caption import caption
from pipelines.config import load_config
from pipelines.report import caption_rows
from plvm_model.store.errors import INTERRUPTED, ConfigError, InputError, InputNotFound, OutputUnwritable, ResourcesUnavailable
from s3_endpoint import moto_endpoint, s3_options
from test_resilience import caption_command, photos

PLVM = [sys.executable, "-m", "pipelines.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def plvm(*args: str, cwd: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``plvm ARGS`` as a user runs it (a process of its own), optionally under a wrapper command."""
    return subprocess.run([*prefix, *PLVM, *args], check=False, capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=600)  # fmt: skip


def assert_one_line_error(done: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """The process exited ``code`` with one line on stderr that holds ``words``, and no traceback."""
    assert done.returncode == code, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr and "terminate called" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]


def test_an_unset_variable_without_a_default_is_an_error_naming_it_and_its_key(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("bank: ${PLVM_TEST_ROOT}/banks\n")
    monkeypatch.delenv("PLVM_TEST_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"c\.yaml: bank: the environment variable PLVM_TEST_ROOT is not set"):
        load_config(path)
    path.write_text("generate:\n  questions: ['Who is here?', '${PLVM_TEST_QUESTION}']\n")
    with pytest.raises(ConfigError, match=r"generate\.questions\[1\]: the environment variable PLVM_TEST_QUESTION"):
        load_config(path)
    # a default, or a variable set (even to the empty string), is used as given
    path.write_text("bank: ${PLVM_TEST_ROOT:-/data}/banks\noutput:\n  uri: out${PLVM_TEST_EMPTY}\n")
    monkeypatch.setenv("PLVM_TEST_EMPTY", "")
    config = load_config(path)
    assert (config.bank, config.output.uri) == ("/data/banks", "out")


def test_show_and_report_refuse_an_output_that_is_missing_or_holds_no_rows(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(plvm("show", "nowhere", cwd=tmp_path), 2, "plvm show: error: nowhere does not exist")
    done = plvm("report", "empty", "--out", "pages", cwd=tmp_path)
    assert_one_line_error(done, 2, "plvm report: error: empty holds no rows")
    assert not (tmp_path / "pages").exists(), "no report was written"
    with pytest.raises(InputNotFound, match="empty/part-1.parquet does not exist"):
        caption_rows(str(tmp_path / "empty" / "part-1.parquet"), None)
    (tmp_path / "notes.txt").write_text("not an output")
    with pytest.raises(InputError, match="notes.txt is a file, not a caption run's output"):
        caption_rows(str(tmp_path / "notes.txt"), None)


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, yollava):
    (tmp_path / "file.txt").write_text("not a folder")
    started = time.monotonic()
    done = plvm("caption", "--input", str(yollava / "viruss" / "[0-2].jpg"), "--output", "file.txt/out", cwd=tmp_path)
    assert_one_line_error(done, 2, "output file.txt/out cannot be written", "Not a directory")
    assert time.monotonic() - started < 30, "refused at the start, not after the run"


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, yollava):
    folder = tmp_path / "readonly"
    folder.mkdir()
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount of the folder, in a namespace
        remount = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"
        if subprocess.run(["unshare", "-m", "sh", "-c", remount], check=False, capture_output=True).returncode != 0:
            pytest.skip("running as root, and no mount namespace to make a folder read-only in")
        prefix = ("unshare", "-m", "sh", "-c", f'{remount} && exec "$@"', "sh")
    else:
        folder.chmod(0o555)
    done = plvm("caption", "--input", str(yollava / "viruss" / "[0-2].jpg"), "--output", str(folder / "out"),
                cwd=tmp_path, prefix=prefix)  # fmt: skip
    assert_one_line_error(done, 2, f"output {folder / 'out'} cannot be written")


def test_an_output_on_s3_is_probed_before_any_work_and_read_by_show(tmp_path, yollava):
    with moto_endpoint() as endpoint:
        options = s3_options(endpoint)
        fs = fsspec.filesystem("s3", **options["s3"])
        fs.mkdir("results")
        config = make_config(tmp_path, storage=options, input={"uri": str(yollava / "viruss" / "[0-1].jpg")})
        missing = config.model_copy(update={"output": config.output.model_copy(update={"uri": "s3://nobucket/run"})})
        with pytest.raises(OutputUnwritable, match="output s3://nobucket/run cannot be written"):
            caption(missing)
        assert not fs.exists("nobucket"), "the probe never creates a bucket"
        from pipelines.runner.preflight import check_output

        check_output("s3://results/run", options)
        assert fs.ls("results", refresh=True) == [], "the probe object is removed"
        # plvm show and report read an output on S3 the same way, and refuse a prefix that holds nothing
        with pytest.raises(InputNotFound, match="s3://results/run does not exist"):
            caption_rows("s3://results/run", options)
        table = pa.Table.from_pylist([{"path": "s3://photos/0.jpg", "user_id": "kim"}], schema=output_schema())
        with fs.open("results/run/part-run-0.parquet", "wb") as f:
            pq.write_table(table, f)
        assert caption_rows("s3://results/run", options).column("path").to_pylist() == ["s3://photos/0.jpg"]


@pytest.mark.parametrize(
    "section, words",
    [
        ({"detect": {"resources": {"num_cpus": 64}}}, "stage detect asks for 64 CPU per actor, but no node of the Ray cluster has more than 2"),
        ({"generate": {"resources": {"num_gpus": 1}}}, "stage generate asks for 1 GPU per actor, but no node of the Ray cluster has more than 0"),
        ({"tasks": {"num_cpus": 3}}, "stage read asks for 3 CPU per task"),
    ],
)  # fmt: skip
def test_resources_no_node_has_are_refused_at_the_start(tmp_path, yollava, tiny_models, ray_local, section, words):
    # a short no-progress timeout: without the check, the run would wait for the resources until then
    config = make_config(tmp_path, input={"uri": str(yollava / "viruss" / "[0-1].jpg"), "user": "kim"},
                         ray={"no_progress_timeout_s": 20}, **section)  # fmt: skip
    started = time.monotonic()
    with pytest.raises(ResourcesUnavailable, match=words):
        caption(config)
    assert time.monotonic() - started < 15


BUSY_PYARROW = """
import io, threading
import pyarrow as pa, pyarrow.parquet as pq

def busy():
    data = io.BytesIO()
    pq.write_table(pa.table({"x": list(range(100_000))}), data)
    while True:
        pq.read_table(io.BytesIO(data.getvalue()), use_threads=True)

for _ in range(4):
    threading.Thread(target=busy, daemon=True).start()
"""
"""A ``sitecustomize`` that keeps pyarrow's thread pools at work in every Python process started with it."""


def test_show_exits_0_every_time_with_pyarrow_threads_at_work(tmp_path):
    """``plvm show`` aborted now and then at exit (``terminate called without an active exception``, exit 134):
    pyarrow's native threads, alive at the interpreter's teardown. Threads kept at work (``BUSY_PYARROW``) make
    the race frequent: before ``plvm`` ended with ``os._exit``, half of these runs aborted or hung at exit."""
    rows = [{"path": f"/photos/{i}.jpg", "user_id": "kim", "concepts": ["Kim"], "caption": "Kim smiles."}
            for i in range(3)]  # fmt: skip
    (tmp_path / "out").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=output_schema()), tmp_path / "out" / "part-run-0.parquet")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BUSY_PYARROW)
    env = {**ENV, "PYTHONPATH": f"{tmp_path / 'site'}:{REPO}"}
    for _ in range(6):
        done = subprocess.run([*PLVM, "show", "out"], check=False, capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=60)  # fmt: skip
        assert done.returncode == 0 and "terminate called" not in done.stderr, (done.returncode, done.stderr[-2000:])
        assert done.stdout.count("[Kim]  Kim smiles.") == 3


def command_line(process: psutil.Process) -> list[str]:
    """The process's command line; none once it has exited (a zombie's cannot be read)."""
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def test_ctrl_c_stops_a_run_with_exit_code_130_and_stops_its_ray(tmp_path, yollava, tiny_models):
    config = make_config(tmp_path, input={"user": "kim"})
    command, env = caption_command(tmp_path, config, photos(4), "kim")
    run = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    driver, family = psutil.Process(run.pid), []
    deadline = time.monotonic() + 300
    while run.poll() is None and time.monotonic() < deadline:  # until the run's actors are at work
        family = driver.children(recursive=True)
        if any("MapBatches(" in " ".join(command_line(p)) for p in family):
            break
        time.sleep(0.2)
    assert run.poll() is None, "the run was still going when interrupted"
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C does: SIGINT to the command's process group
    _, err = run.communicate(timeout=120)
    assert run.returncode == INTERRUPTED, err[-3000:]
    assert err.strip().splitlines()[-1] == "plvm: interrupted" and "Traceback" not in err, err[-3000:]
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"the run's Ray processes outlived it: {[p.name() for p in alive]}"
