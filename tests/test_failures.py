"""Failures of the system are not photo errors: they stop the run loudly, or past a budget, and
``--retry-errors`` redoes exactly the rows they left."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import ray.cloudpickle
from conftest import REPO, assert_metrics_are_the_record, make_config, photo, prometheus_samples
from test_resilience import assert_exactly_once, photos, write_manifest

from operators.detect import DetectFaces
from operators.generate import Generate
from plvm_model.store.output_schema import ErrorKind
from plvm_model.store.output_table import keys, read_output
from pipelines.caption import caption
from pipelines.stage_lists import caption_stages
from pipelines.enroll import enroll
from plvm_model.store.errors import EXIT_CODES, RunFailed

# Ray's workers cannot import the tests: the buggy stage below travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FailsOn(DetectFaces):
    """The real detect stage, with a bug that strikes the photos whose path contains ``marker``."""

    marker = ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        for path in batch.column("path").to_pylist():
            if self.marker in path:
                raise ZeroDivisionError(f"bug on {Path(path).name}")
        return super().__call__(batch)


class DiesMidRun(Generate):
    """The real generate stage, whose process dies (SIGKILL, as the OOM killer does) at its second batch."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.batches = getattr(self, "batches", 0) + 1
        if self.batches == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def replacing(name: str, udf: type):
    """``caption_stages`` with the batch function of stage ``name`` replaced by ``udf``."""

    def stages(config, **kwargs):
        return [replace(s, udf=udf) if s.name == name else s for s in caption_stages(config, **kwargs)]

    return stages


def buggy(marker: str):
    """``caption_stages`` with the detect stage replaced by :class:`FailsOn` ``marker``."""
    return replacing("detect", type("FailsOn", (FailsOn,), {"marker": marker}))


def manifest_config(tmp_path: Path, user: str, paths: list[str], **sections):
    config = make_config(tmp_path, **sections)
    enroll(config, user, "Thao", [photo("thao", "ref_img.jpg")])
    uri = write_manifest(tmp_path / "m.csv", paths, user)
    return config.model_copy(update={"input": config.input.model_copy(update={"uri": uri})})


def record(config) -> dict:
    [path] = (Path(config.output.uri) / "_runs").glob("*.json")
    return json.loads(path.read_text())


def test_a_stage_that_raises_on_every_photo_fails_the_run_naming_the_stage(tmp_path, yollava, tiny_models, ray_local):
    config = manifest_config(tmp_path, "ann", photos(2), run={"retries": 0})
    with pytest.raises(RunFailed) as failed:
        caption(config, stages=buggy(marker="/"))
    message = str(failed.value)
    assert "stage detect failed on a batch of" in message and "ZeroDivisionError: bug on" in message
    assert "Traceback" in message, "the first traceback is in the summary"
    assert failed.value.exit_code == 3
    recorded = record(config)
    assert recorded["status"] == "failed", "the failed run is recorded beside the output"
    metrics = (Path(config.output.uri) / "_runs" / f"{recorded['run_id']}.prom").read_text()
    # plvm_run_status: failed
    assert_metrics_are_the_record(prometheus_samples(metrics), recorded, "caption", config.output.uri)
    assert read_output(config.output.uri).num_rows == 0, "no photo was turned into an error row"


def test_within_a_budget_failures_are_rows_and_retry_errors_rewrites_exactly_them(
    tmp_path, yollava, tiny_models, ray_local
):
    paths = [*photos(2), str(tmp_path / "missing.jpg")]
    config = manifest_config(tmp_path, "bo", paths, run={"max_failed_fraction": 0.5, "retries": 0})
    summary = caption(config, stages=buggy(marker="thao/1.jpg"))
    assert summary.failed == 1 and summary.errors == {"stage_failed": 1, "missing_file": 1}
    by_path = {r["path"]: r for r in read_output(config.output.uri).to_pylist()}
    failed = by_path[photo("thao", "1.jpg")]
    assert failed["error_kind"] == "stage_failed"
    assert "detect failed: ZeroDivisionError: bug on 1.jpg" in failed["error"]
    assert by_path[photo("thao", "0.jpg")]["concepts"] == ["Thao"], "the other photos of its batch are whole"

    again = caption(config, retry_errors=True)  # the bug fixed: the real stages
    assert again.retried == 1 and again.photos == 1 and again.failed == 0
    assert_exactly_once(config.output.uri, paths, "bo")
    by_path = {r["path"]: r for r in read_output(config.output.uri).to_pylist()}
    assert by_path[photo("thao", "1.jpg")]["error"] is None and by_path[photo("thao", "1.jpg")]["concepts"] == ["Thao"]
    assert by_path[str(tmp_path / "missing.jpg")]["error_kind"] == "missing_file", "input faults stay as they are"


def test_past_the_budget_the_run_fails_at_its_end_with_the_rows_written(tmp_path, yollava, tiny_models, ray_local):
    config = manifest_config(tmp_path, "cy", photos(2), run={"max_failed_fraction": 0.2, "retries": 0})
    with pytest.raises(RunFailed, match=r"1 of 4 photos failed in the system \(stage_failed: 1\), over "
                                        r"run.max_failed_fraction=0.2; the first: .*bug on 1.jpg"):  # fmt: skip
        caption(config, stages=buggy(marker="thao/1.jpg"))
    assert_exactly_once(config.output.uri, photos(2), "cy")


def test_an_engine_that_answers_no_batch_in_time_fails_the_run_and_retry_errors_fixes_it(
    tmp_path, yollava, tiny_models, ray_local
):
    small = {"concurrency": 1, "num_cpus": 0.25, "threads": 1, "batch_size": 2}
    config = manifest_config(tmp_path, "di", photos(1), generate={"timeout_s": 0.001, "resources": small})
    with pytest.raises(RunFailed, match="engine_timeout: 2.*gave no answer within 0.001 s"):
        caption(config)
    rows = read_output(config.output.uri).to_pylist()
    assert [r["error_kind"] for r in rows] == ["engine_timeout"] * 2 and all(r["faces"] for r in rows)
    patient = config.model_copy(update={"generate": config.generate.model_copy(update={"timeout_s": 600})})
    summary = caption(patient, retry_errors=True)
    assert summary.retried == 2 and summary.errors == {}
    assert_exactly_once(config.output.uri, photos(1), "di")


def test_an_engine_stuck_twice_stops_the_run_instead_of_marking_every_photo(tmp_path, yollava, tiny_models, ray_local):
    small = {"concurrency": 1, "num_cpus": 0.25, "threads": 1, "batch_size": 1}
    config = manifest_config(tmp_path, "ed", photos(3), generate={"timeout_s": 0.001, "resources": small})
    with pytest.raises(RunFailed, match="twice in a row: it is stuck"):
        caption(config)
    assert read_output(config.output.uri).num_rows < len(photos(3))


def test_a_model_that_cannot_load_fails_the_run_naming_the_stage(tmp_path, yollava, tiny_models, ray_local):
    empty = tmp_path / "no-model"
    empty.mkdir()
    config = manifest_config(tmp_path, "gil", photos(1), models={"llava": str(empty)})
    with pytest.raises(RunFailed, match="stage generate could not start: .*no-model"):
        caption(config)
    assert read_output(config.output.uri).num_rows == 0, "no photo was turned into an error row"


def test_an_engine_whose_process_dies_stops_the_run_and_resume_finishes_it(tmp_path, yollava, tiny_models, ray_local):
    small = {"concurrency": 1, "num_cpus": 0.25, "threads": 1, "batch_size": 2}
    paths = photos(3)
    config = manifest_config(tmp_path, "ann", paths, output={"rows_per_file": 2}, generate={"resources": small})
    with pytest.raises(RunFailed, match="the Generate actor died and is not restarted") as stopped:
        caption(config, stages=replacing("generate", type("Generate", (DiesMidRun,), {})))
    assert "--resume" in str(stopped.value) and stopped.value.exit_code == 3
    before = keys(read_output(config.output.uri, columns=["path", "user_id"]))
    assert sum(before.values()) <= 2, "no batch after the engine's death was answered by a restarted engine"
    assert not any(r["error"] for r in read_output(config.output.uri).to_pylist()), "no photo took the engine's fault"

    summary = caption(config, resume=True)
    assert summary.skipped == sum(before.values()) and summary.photos == len(paths) - summary.skipped
    assert_exactly_once(config.output.uri, paths, "ann")


def test_every_error_kind_and_exit_code_is_in_the_readme():
    readme = "".join((REPO / "docs" / page).read_text() for page in ("output.md", "cli.md"))
    for kind in ErrorKind:
        assert f"| `{kind}` | {kind.meaning} |" in readme, f"README lacks the error kind {kind}"
    for code, meaning in EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in readme, f"README lacks exit code {code}"
