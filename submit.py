"""Submit a plvm run (caption, enroll, eval, ...) to a Ray cluster through the Ray Jobs API.

    python submit.py --address http://HEAD:8265 [--wait] [--config configs/x.yaml] -- caption --input s3://... --output s3://...

Everything after ``--`` is the ``plvm`` command line run on the cluster by the cluster's
``python``, in this project's code (shipped as the job's working directory unless
``--no-working-dir``); a local ``--config`` file travels with the job. The job id is
printed; ``--wait`` follows the job, streams its logs, and exits non-zero if it fails.
Ray's token authentication is used as configured in the environment (``RAY_AUTH_MODE``,
``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG_VARIABLE = "PLVM_CONFIG_YAML"
EXCLUDES = [".venv", ".venv-vllm", ".git", ".cache", "demo", "output", "banks", "__pycache__", "*.parquet"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True, help="the cluster's dashboard/jobs address, e.g. http://127.0.0.1:8265")
    p.add_argument("--config", help="config file (local; its text travels with the job), or a URI the cluster reads")
    p.add_argument("--wait", action="store_true", help="follow the job and its logs; exit non-zero if it fails")
    p.add_argument("--job-id", help="submission id (default: chosen by Ray)")
    p.add_argument("--pip", action="append", default=[], help="pip requirement to install for the job (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job")
    p.add_argument("--num-cpus", type=float, help="CPUs reserved for the job's driver")
    p.add_argument("--num-gpus", type=float, help="GPUs reserved for the job's driver")
    p.add_argument("--no-working-dir", action="store_true", help="do not ship this project; the cluster has it")
    p.add_argument("plvm_args", nargs=argparse.REMAINDER, help="-- then the plvm command line")
    return p


def entrypoint(args: argparse.Namespace) -> str:
    plvm = list(args.plvm_args)
    if plvm and plvm[0] == "--":
        plvm = plvm[1:]
    if not plvm:
        raise SystemExit("submit.py: give the plvm command after --, e.g. -- caption --input ... --output ...")
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


def follow(client, job_id: str) -> int:
    from ray.job_submission import JobStatus

    offset = 0
    while True:
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[offset:])
        sys.stdout.flush()
        offset = len(logs)
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            logs = client.get_job_logs(job_id)
            sys.stdout.write(logs[offset:])
            info = client.get_job_info(job_id)
            print(f"\njob {job_id}: {status.value}" + (f" ({info.message})" if info.message else ""), file=sys.stderr)
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(
        entrypoint=entrypoint(args),
        runtime_env=runtime_env(args),
        submission_id=args.job_id,
        entrypoint_num_cpus=args.num_cpus,
        entrypoint_num_gpus=args.num_gpus,
    )
    print(job_id, flush=True)
    return follow(client, job_id) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())
