"""Submit a plvm command line to a Ray cluster through the Ray Jobs API, as a person or a scheduler does.

    python submit.py --address http://HEAD:8265 [--tick TICK] [--wait] [--retries N] [--logs DIR|URI]
                     [--config FILE] -- caption --input s3://... --output s3://...

Everything after ``--`` is the ``plvm`` command line (checked here with plvm's own parser), run on
the cluster by the cluster's ``python``, in this project's code (shipped as the job's working
directory unless ``--no-working-dir``); a local ``--config`` file travels with the job. The job's
submission id is the first line printed.

- ``--tick`` (an ISO time, or a cron schedule standing for its latest tick) makes the submission id
  ``plvm-COMMAND-TICK-HASH`` (HASH: of the command line): a second submission of the same tick is
  not a new job; it reports that job, and with ``--wait`` follows it.
- ``--wait`` streams the job's log as it comes and exits with the plvm command's own exit code
  (the job's driver's); see :func:`exit_code` for jobs whose driver did not end by itself.
- ``--retries N`` (with ``--wait``) submits a run that ended with a retryable exit code (3, or its
  driver killed by a signal) again, as the next attempt of the same submission (``ID-retryK``),
  with ``--resume``; never one that ended with a usage, input or locked-output error (2), a bug
  (1), an output that does not hold each photo once (4) or a stop (130).
- ``--logs DIR|URI`` keeps each attempt's whole log at ``DIR/ID.log`` (any fsspec URI).

Ray's token authentication is used as configured in the environment (``RAY_AUTH_MODE``,
``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import shlex
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from plvm_model.store.errors import INTERRUPTED, PlvmError, RunFailed

HERE = Path(__file__).resolve().parent
CONFIG_VARIABLE = "PLVM_CONFIG_YAML"
EXCLUDES = [".venv", ".venv-vllm", ".git", ".cache", "demo", "output", "banks", "__pycache__", "*.parquet"]
USAGE = PlvmError.exit_code
"""The exit code of a command line this program or plvm refuses (argparse's, plvm's)."""
LOST = RunFailed.exit_code
"""The exit code of a job whose driver never ran or was lost with its node (a failure of the system)."""
POLL_S = 2.0


class Refused(Exception):
    """A command line that cannot be submitted: the message says why (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True, help="the cluster's dashboard/jobs address, e.g. http://127.0.0.1:8265")
    p.add_argument("--config", help="config file (local; its text travels with the job), or a URI the cluster reads")
    p.add_argument("--wait", action="store_true", help="follow the job and its log; exit with its exit code")
    ids = p.add_mutually_exclusive_group()
    ids.add_argument("--tick", help="the scheduled time this submission is for: an ISO time, or a cron schedule "
                     "for its latest tick; the same tick submitted again is the same job")  # fmt: skip
    ids.add_argument("--job-id", help="submission id (default: chosen by Ray, or made from --tick)")
    p.add_argument("--retries", type=int, default=0, metavar="N",
                   help="with --wait: submit a run that failed in the system again, with --resume, up to N times")  # fmt: skip
    p.add_argument("--logs", metavar="DIR|URI", help="keep each job's whole log at DIR/ID.log (any fsspec URI)")
    p.add_argument("--pip", action="append", default=[], help="pip requirement to install for the job (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job")
    p.add_argument("--num-cpus", type=float, help="CPUs reserved for the job's driver")
    p.add_argument("--num-gpus", type=float, help="GPUs reserved for the job's driver")
    p.add_argument("--no-working-dir", action="store_true", help="do not ship this project; the cluster has it")
    p.add_argument("plvm_args", nargs=argparse.REMAINDER, help="-- then the plvm command line")
    return p


def plvm_command(args: argparse.Namespace) -> list[str]:
    """The plvm command line after ``--``, as plvm's own parser accepts it (:class:`Refused` otherwise)."""
    from pipelines.cli import parser

    plvm = list(args.plvm_args)
    if plvm and plvm[0] == "--":
        plvm = plvm[1:]
    if not plvm:
        raise Refused("give the plvm command after --, e.g. -- caption --input ... --output ...")
    try:
        parser().parse_args(plvm)
    except SystemExit as refused:  # argparse printed why
        raise Refused(f"plvm does not accept {shlex.join(plvm)}") from refused
    return plvm


def resumed(plvm: list[str]) -> list[str]:
    """The command line of a run's next attempt: a caption run goes on with ``--resume`` (in place of ``--overwrite``,
    which would remove what the attempts before wrote); other commands run again as they are."""
    if plvm[0] != "caption" or {"--resume", "--retry-errors"} & set(plvm):
        return plvm
    return [*(a for a in plvm if a != "--overwrite"), "--resume"]


def tick_of(tick: str, now: datetime | None = None) -> str:
    """``tick`` as a submission id names it, in UTC (``20260820T020000Z``): an ISO time (without a zone: this
    machine's), or a cron schedule's latest tick at or before ``now``, in this machine's time zone as cron reads it."""
    from croniter import croniter

    try:
        moment = datetime.fromisoformat(tick)
    except ValueError:
        if not croniter.is_valid(tick):
            raise Refused(f"--tick {tick!r} is neither an ISO time (2026-08-20T02:00Z) nor a cron schedule "
                          "('0 2 * * *')") from None  # fmt: skip
        moment = croniter(tick, now or datetime.now().astimezone()).get_prev(datetime)
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def submission_id(args: argparse.Namespace, plvm: list[str]) -> str | None:
    """The job's submission id: ``--job-id``, or one made from ``--tick`` and the command line, or None (Ray's)."""
    if not args.tick:
        return args.job_id
    digest = hashlib.sha256(json.dumps([args.config, plvm]).encode()).hexdigest()[:10]
    return f"plvm-{plvm[0]}-{tick_of(args.tick)}-{digest}"


def entrypoint(args: argparse.Namespace, plvm: list[str]) -> str:
    plvm = list(plvm)
    if args.config:
        plvm[1:1] = ["--config", args.config if "://" in args.config else f"env:{CONFIG_VARIABLE}"]
    return shlex.join(["python", "-m", "pipelines.cli", *plvm])


def runtime_env(args: argparse.Namespace) -> dict:
    env: dict = {}
    if not args.no_working_dir:
        env["working_dir"] = str(HERE)
        env["excludes"] = EXCLUDES
    if args.pip:
        env["pip"] = args.pip
    variables = dict(item.split("=", 1) for item in args.env)
    if args.config and "://" not in args.config:
        variables[CONFIG_VARIABLE] = Path(args.config).read_text()
    if variables:
        env["env_vars"] = variables
    return env


def submit(client, job_id: str | None, args: argparse.Namespace, plvm: list[str]) -> tuple[str, bool]:
    """Submit the job unless one with ``job_id`` exists: its id, and whether it is new. Of several submitters of one
    id at once, Ray lets exactly one create the job; the others find it."""
    try:
        new = client.submit_job(entrypoint=entrypoint(args, plvm), runtime_env=runtime_env(args),
                                submission_id=job_id, entrypoint_num_cpus=args.num_cpus,
                                entrypoint_num_gpus=args.num_gpus)  # fmt: skip
        return new, True
    except RuntimeError:
        if job_id is None or job_info(client, job_id) is None:
            raise
        print(f"submit.py: {job_id} was submitted before" + ("; following it" if args.wait else ""), file=sys.stderr)
        return job_id, False


def job_info(client, job_id: str):
    """The job's ``JobInfo``, or None if the cluster has no job of that id."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError:  # the Jobs API answers 404 for an unknown id
        return None


def exit_code(info) -> int:
    """The exit code a job ended with: its driver's (a driver killed by signal N: 128 + N, as a shell reports it);
    a job stopped through the Jobs API (``ray job stop``): 130, as Ctrl-C; a failed job whose driver did not end by
    itself (it never started: the runtime environment failed; its node was lost): 3, a failure of the system."""
    from ray.job_submission import JobStatus

    if info.driver_exit_code is not None:
        code = info.driver_exit_code
        return 128 - code if code < 0 else code
    if info.status == JobStatus.SUCCEEDED:
        return 0
    if info.status == JobStatus.STOPPED:
        return INTERRUPTED
    return LOST


def retryable(code: int) -> bool:
    """Whether a run that ended with ``code`` may succeed when run again with ``--resume``: one that failed in the
    system (3), or whose driver was killed by a signal other than Ctrl-C (the out-of-memory killer, a node drained)."""
    return code == RunFailed.exit_code or (128 < code < 128 + signal.NSIG and code != INTERRUPTED)


def follow(client, job_id: str, keep: str | None) -> int:
    """Stream the job's log to stdout as it comes (``tail_job_logs``) until the job ends, keep the whole log at
    ``keep`` (a folder or URI, if given), and return the job's exit code."""
    from aiohttp import ClientError

    seen: list[str] = []

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            seen.append(chunk)
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError, ClientError) as error:  # the connection was lost: the rest comes at the end
        print(f"submit.py: following {job_id}'s log stopped ({error}); waiting for its end", file=sys.stderr)
    try:
        while not (info := client.get_job_info(job_id)).status.is_terminal():
            time.sleep(POLL_S)
        whole, streamed = client.get_job_logs(job_id), "".join(seen)
        sys.stdout.write(whole[len(streamed) :] if whole.startswith(streamed) else whole)
        seen[:] = [whole]
    finally:
        if keep:
            keep_log(keep, job_id, "".join(seen))
    code = exit_code(info)
    message = f" ({info.message.splitlines()[0]})" if info.message else ""
    print(f"\njob {job_id}: {info.status.value}, exit code {code}{message}", file=sys.stderr)
    return code


def keep_log(where: str, job_id: str, text: str) -> None:
    """Write the job's log to ``where/<job_id>.log``, whole or not at all (a local folder or any fsspec URI)."""
    from plvm_model.store import storage

    kept = storage.join(where, f"{job_id}.log")
    fs, path = storage.filesystem(kept)
    storage.write_atomic(fs, path, text.encode())
    print(f"submit.py: kept {job_id}'s log at {kept}", file=sys.stderr)


def attempt_id(job_id: str | None, attempt: int) -> str | None:
    """The submission id of a run's attempt: the first is ``job_id`` itself, the next ``job_id-retry1``, ..."""
    return job_id if job_id is None or attempt == 0 else f"{job_id}-retry{attempt}"


def report(client, job_id: str) -> None:
    """Print the status of a job found submitted before, and of each of its retries."""
    for attempt in itertools.count():
        found = attempt_id(job_id, attempt)
        if (info := job_info(client, found)) is None:
            return
        ended = f", exit code {exit_code(info)}" if info.status.is_terminal() else ""
        print(f"submit.py: {found}: {info.status.value}{ended}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Submit (or find) the job, and with ``--wait`` follow it and its retries; the exit code."""
    from ray.job_submission import JobSubmissionClient

    if args.retries and not args.wait:
        raise Refused("--retries needs --wait (a run is retried once it has ended)")
    plvm = plvm_command(args)
    base = submission_id(args, plvm)
    attempt, command = 0, plvm
    try:
        client = JobSubmissionClient(args.address)
        while True:
            job_id, new = submit(client, attempt_id(base, attempt), args, command)
            print(job_id, flush=True)
            if not args.wait:
                if not new:
                    report(client, job_id)
                return 0
            code = follow(client, job_id, args.logs)
            if not retryable(code) or attempt >= args.retries:
                return code
            attempt, command = attempt + 1, resumed(plvm)
            print(f"submit.py: {job_id} ended with exit code {code}, which is retryable: attempt {attempt} of "
                  f"{args.retries}: {shlex.join(command)}", file=sys.stderr)  # fmt: skip
    except (ConnectionError, RuntimeError) as error:  # the cluster cannot be reached, or refused the job
        print(f"submit.py: error: the cluster at {args.address}: {error}", file=sys.stderr)
        return LOST


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Refused as refused:
        print(f"submit.py: error: {refused}", file=sys.stderr)
        return USAGE


if __name__ == "__main__":
    sys.exit(main())
