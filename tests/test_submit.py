"""submit.py's own decisions, without a cluster: ticks and submission ids, exit codes, what is retried and how.

The same on a real two-node cluster: tests/test_cluster.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from ray.job_submission import JobInfo, JobStatus

import submit


def args(*argv: str):
    return submit.build_parser().parse_args(["--address", "http://127.0.0.1:8265", *argv])


CAPTION = ["--", "caption", "--input", "s3://photos/archive", "--output", "s3://plvm/captions"]


def test_a_tick_is_an_iso_time_or_a_cron_schedules_latest_tick_in_utc():
    assert submit.tick_of("2026-08-20T02:00:00+02:00") == submit.tick_of("2026-08-20T00:00Z") == "20260820T000000Z"
    at = datetime(2026, 8, 20, 3, 17, 42, tzinfo=UTC)
    assert submit.tick_of("0 2 * * *", now=at) == "20260820T020000Z"
    assert submit.tick_of("0 2 * * *", now=at.replace(hour=1)) == "20260819T020000Z", "before 02:00: yesterday's"
    assert submit.tick_of("*/15 * * * *", now=at) == "20260820T031500Z"
    with pytest.raises(submit.Refused, match="'tonight' is neither an ISO time .* nor a cron schedule"):
        submit.tick_of("tonight")


def test_the_submission_id_is_the_same_for_the_same_command_and_tick_only():
    same = submit.submission_id(args("--tick", "2026-08-20T02:00+02:00", *CAPTION), CAPTION[1:])
    assert same == submit.submission_id(args("--tick", "2026-08-20T00:00Z", "--wait", *CAPTION), CAPTION[1:])
    assert same.startswith("plvm-caption-20260820T000000Z-")
    assert same != submit.submission_id(args("--tick", "2026-08-21T00:00Z", *CAPTION), CAPTION[1:])
    other = [*CAPTION[1:], "--resume"]
    assert same != submit.submission_id(args("--tick", "2026-08-20T00:00Z", *CAPTION), other)
    assert submit.submission_id(args(*CAPTION), CAPTION[1:]) is None, "without --tick: Ray's"


def test_a_command_line_plvm_refuses_is_not_submitted(capsys):
    assert submit.main(["--address", "http://127.0.0.1:9", "--", "caption", "--inptu", "x"]) == 2
    assert "plvm does not accept caption --inptu x" in capsys.readouterr().err
    assert submit.main(["--address", "http://127.0.0.1:9", "--retries", "2", *CAPTION]) == 2
    assert "--retries needs --wait" in capsys.readouterr().err


def test_a_cluster_that_cannot_be_reached_is_a_failure_of_the_system(capsys):
    assert submit.main(["--address", "http://127.0.0.1:9", "--wait", *CAPTION]) == 3
    assert "submit.py: error: the cluster at http://127.0.0.1:9" in capsys.readouterr().err


@pytest.mark.parametrize(
    "status, driver, code",
    [
        (JobStatus.SUCCEEDED, 0, 0),
        (JobStatus.FAILED, 2, 2),
        (JobStatus.FAILED, 3, 3),
        (JobStatus.FAILED, 4, 4),
        (JobStatus.FAILED, -9, 137),  # the driver killed (the out-of-memory killer)
        (JobStatus.FAILED, 137, 137),  # by a shell that reported it
        (JobStatus.STOPPED, None, 130),  # ray job stop
        (JobStatus.FAILED, None, 3),  # the driver never ran, or its node was lost
    ],
)
def test_wait_exits_with_the_drivers_exit_code(status, driver, code):
    assert submit.exit_code(JobInfo(status=status, entrypoint="plvm caption", driver_exit_code=driver)) == code


def test_only_failures_of_the_system_are_retried_and_a_caption_run_goes_on_with_resume():
    assert [c for c in (0, 1, 2, 3, 4, 130, 134, 137, 143) if submit.retryable(c)] == [3, 134, 137, 143]
    assert submit.resumed(CAPTION[1:]) == [*CAPTION[1:], "--resume"]
    assert submit.resumed([*CAPTION[1:], "--overwrite"]) == [*CAPTION[1:], "--resume"], "never removes the attempt's"
    assert submit.resumed([*CAPTION[1:], "--retry-errors"]) == [*CAPTION[1:], "--retry-errors"]
    assert submit.resumed(["rematch", "s3://plvm/captions"]) == ["rematch", "s3://plvm/captions"]
    assert [submit.attempt_id("plvm-x", k) for k in range(3)] == ["plvm-x", "plvm-x-retry1", "plvm-x-retry2"]
