"""A two-node Ray cluster on 127.0.0.1 with an S3 endpoint, and scheduled caption jobs submitted to it.

    python tests/cluster_scenario.py RESULT.json

Run by ``test_cluster.py`` inside a private network namespace. Everything goes through the
product's front doors: ``plvm enroll`` into a bank on S3, ``ray start`` twice (head and a
second node, token authentication on), ``python submit.py`` with the photos and the output on
S3 and the endpoint and credentials given as environment variables. One cluster, the scenarios
of a scheduler:

- tick 1 submitted twice at once (``--wait --retries 2 --logs s3://logs/nightly``, the same moment
  spelled two ways): one job. Its driver is killed (SIGKILL) once a part is committed: the run is
  submitted again with ``--resume``; that retry's engine actor is killed, so it ends with exit code
  3 and is submitted again, and the third attempt ends with every photo once. Each run that ends
  pushes its metrics to a Pushgateway (a small server here that keeps them);
- tick 2, submitted while tick 1's run holds the output's lease: ends with exit code 2, not retried;
- tick 1 submitted again once all is done, without retries: follows the first job (exit code 137);
  without --wait: reports each attempt's status and exit code.

The result (exit codes and output of each submission, the cluster's jobs with their drivers'
exit codes and logs, the kept logs, the run records and metrics, the pushes, the nodes and the
output rows) goes to RESULT.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import psutil
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

from conftest import DATA, pushgateway  # noqa: E402
from s3_endpoint import CREDENTIALS, free_port, moto_endpoint  # noqa: E402

from pipelines.runner.ray_processes import session_processes, stop  # noqa: E402

BIN = Path(sys.executable).parent


def run(*command: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def cluster_processes(temp_dir: Path) -> list[psutil.Process]:
    """This scenario's cluster: the processes of the Ray sessions under ``temp_dir`` (both nodes and the jobs' drivers
    write there), and any whose command line names ``temp_dir`` (the GCS, the raylets)."""
    found = {proc.pid: proc for session, procs in session_processes().items() if session.parent == temp_dir
             for proc in procs}  # fmt: skip
    for proc in psutil.process_iter(["cmdline"]):
        if str(temp_dir) in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
            found[proc.pid] = proc
    return list(found.values())


def stop_cluster(temp_dir: Path) -> dict[str, list[str]]:
    """Stop this scenario's cluster and nothing else (not ``ray stop``, which stops every Ray on the machine); the
    names of its processes stopped and still running."""
    cluster = cluster_processes(temp_dir)
    names = [proc.name() for proc in cluster]
    stop(cluster)
    return {"stopped": names, "running": [proc.name() for proc in cluster_processes(temp_dir)]}


def wait_for(what: str, ready, running: list[subprocess.Popen], timeout: float = 600) -> None:
    """Wait until ``ready()``; fail naming ``what`` if the submissions ``running`` all end first, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not ready():
        if all(p.poll() is not None for p in running) or time.monotonic() > deadline:
            raise RuntimeError(f"the scenario never saw {what}")
        time.sleep(0.1)


def engines(temp_dir: Path) -> set[int]:
    """The pids of the live engine actors (the generate stage's) of the runs on this cluster."""
    found = set()
    for proc in cluster_processes(temp_dir):
        with contextlib.suppress(psutil.Error):  # ended meanwhile
            if "MapBatches(Generate)" in " ".join(proc.cmdline()):
                found.add(proc.pid)
    return found


def main(result_file: Path) -> None:
    os.environ.update(CREDENTIALS)
    env = {
        **os.environ,
        **CREDENTIALS,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the cluster's python: this environment's
    }
    result: dict = {}
    with moto_endpoint() as endpoint, pushgateway() as (gateway, pushes):
        env["S3_ENDPOINT"] = endpoint
        fs = fsspec.filesystem("s3", endpoint_url=endpoint)
        fs.mkdir("photos"), fs.mkdir("banks"), fs.mkdir("results"), fs.mkdir("logs")
        rows = []
        for user, people in (("ana", ("thao", "viruss")), ("ben", ("viruss", "willinvietnam"))):
            for person in people:
                for i in range(3):
                    key = f"photos/{user}/{person}-{i}.jpg"
                    fs.put(str(DATA / person / f"{i}.jpg"), key)
                    rows.append((f"s3://{key}", user, person))
        fs.pipe("photos/ana/empty.jpg", b"")
        rows.append(("s3://photos/ana/empty.jpg", "ana", None))
        fs.pipe("photos/manifest.csv", ("path,user_id\n" + "".join(f"{p},{u}\n" for p, u, _ in rows)).encode())
        result["expected"] = rows

        config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
        config["storage"] = {"s3": {"endpoint_url": "${S3_ENDPOINT}"}}  # credentials from the environment
        config["bank"] = "s3://banks/cluster"
        for stage in ("detect", "embed", "generate"):
            config[stage]["resources"] = {"concurrency": 1, "num_cpus": 0.25, "threads": 1, "batch_size": 4}
        # one photo a batch, a part each two photos: the parts are committed over seconds, so the run is killed
        # part-way
        config["generate"]["resources"]["batch_size"] = 1
        config["ray"] = {"no_progress_timeout_s": 300, "progress": "lines"}
        config["output"] = {"rows_per_file": 2}
        config_file = Path(tempfile.mkdtemp()) / "cluster.yaml"
        config_file.write_text(yaml.safe_dump(config))

        for user, name, person in (("ana", "Thao", "thao"), ("ben", "Will", "willinvietnam")):
            fs.put(str(DATA / person / "ref_img.jpg"), f"photos/refs/{person}.jpg")
            done = run(str(BIN / "plvm"), "enroll", "--config", str(config_file), "--user", user, "--name", name,
                       f"s3://photos/refs/{person}.jpg", env=env)  # fmt: skip
            result.setdefault("enroll", []).append([done.returncode, done.stderr[-2000:]])

        port, dashboard = free_port(), free_port()
        temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
        head = run(str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                   "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir}", env=env)  # fmt: skip
        result["head"] = [head.returncode, head.stderr[-2000:]]
        address = f"http://127.0.0.1:{dashboard}"
        try:
            worker = run(str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                         "--num-cpus=1", env=env)  # fmt: skip
            result["worker"] = [worker.returncode, worker.stderr[-2000:]]
            nodes = run(sys.executable, "-c", f"import ray, json; ray.init(address='127.0.0.1:{port}', logging_level='ERROR');"
                        "print(json.dumps([n['Alive'] for n in ray.nodes()]))", env=env)  # fmt: skip
            result["nodes"] = json.loads(nodes.stdout.strip().splitlines()[-1]) if nodes.returncode == 0 else nodes.stderr
            result.update(scheduled_runs(address, endpoint, gateway, config_file, temp_dir, fs, env))
        finally:
            result["cluster"] = stop_cluster(temp_dir)
            shutil.rmtree(config_file.parent, ignore_errors=True)
            shutil.rmtree(temp_dir, ignore_errors=True)
        result["pushes"] = pushes
        result["records"] = {path.rsplit("/", 1)[-1]: fs.cat_file(path).decode() for path in fs.ls("results/cluster/_runs")}
        result["kept"] = {path.rsplit("/", 1)[-1]: fs.cat_file(path).decode() for path in fs.ls("logs/nightly")}
        sys.path.insert(0, str(REPO))
        from plvm_model.store.output_table import read_output

        table = read_output("s3://results/cluster", {"s3": {"endpoint_url": endpoint}})
        result["rows"] = table.select(["path", "user_id", "concepts", "error_kind", "caption", "engine"]).to_pylist()
    result_file.write_text(json.dumps(result))


def scheduled_runs(address: str, endpoint: str, gateway: str, config_file: Path, temp_dir: Path, fs,
                   env: dict) -> dict:  # fmt: skip
    """The submissions of a scheduler (see the module's docstring), and what the cluster says of their jobs."""
    submitter = {**env, "AWS_ENDPOINT_URL": endpoint}  # --logs s3://...: the submitting machine's own credentials
    submit = [sys.executable, str(REPO / "submit.py"), "--address", address, "--config", str(config_file),
              "--env", f"S3_ENDPOINT={endpoint}", *(f"--env={k}={v}" for k, v in CREDENTIALS.items()),
              "--env", f"PLVM_CACHE={os.environ['PLVM_CACHE']}"]  # fmt: skip
    caption = ["--", "caption", "--input", "s3://photos/manifest.csv", "--output", "s3://results/cluster",
               "--metrics-push", gateway]  # fmt: skip
    nightly = ["--wait", "--retries", "2", "--logs", "s3://logs/nightly"]
    outputs = Path(tempfile.mkdtemp())
    fired = []
    for i, tick in enumerate(("2026-08-20T02:00:00+02:00", "2026-08-20T00:00Z")):  # one moment, two spellings
        with (outputs / f"{i}.out").open("w") as out, (outputs / f"{i}.err").open("w") as err:
            fired.append(subprocess.Popen([*submit, "--tick", tick, *nightly, *caption], env=submitter, cwd=REPO,
                                          stdout=out, stderr=err))  # fmt: skip

    def lease_of_a_live_run() -> bool:
        fs.invalidate_cache()
        try:
            return psutil.pid_exists(json.loads(fs.cat_file("results/cluster/_lease.json"))["pid"])
        except FileNotFoundError:
            return False

    def committed() -> bool:
        fs.invalidate_cache()
        return fs.exists(f"results/cluster/_delta_log/{1:020d}.json")

    wait_for("the first run holding the output's lease", lease_of_a_live_run, fired)
    overlapping = run(*submit, "--tick", "2026-08-21T02:00Z", *nightly, *caption, env=submitter)
    wait_for("the first part committed", committed, fired)
    driver = psutil.Process(json.loads(fs.cat_file("results/cluster/_lease.json"))["pid"])  # the lease names it
    before = engines(temp_dir)
    driver.kill()  # the run killed mid-way: the first retry goes on with --resume
    wait_for("the first retry's engine", lambda: engines(temp_dir) - before, fired)
    engine = (engines(temp_dir) - before).pop()
    psutil.Process(engine).kill()  # the first retry fails in the system (3): the second finishes the run
    codes = [p.wait(timeout=900) for p in fired]
    again = run(*submit, "--tick", "2026-08-20T00:00:00Z", "--wait", *caption, env=submitter)
    reported = run(*submit, "--tick", "2026-08-20T00:00:00Z", *caption, env=submitter)
    first = (outputs / "0.out").read_text().splitlines()[0]
    retried = run(*submit, "--job-id", f"{first}-retry1", "--wait", *caption, env=submitter)

    listing = run(sys.executable, "-c", f"""
import json
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient({address!r})
print(json.dumps({{job.submission_id: {{"status": job.status.value, "driver_exit_code": job.driver_exit_code,
                   "entrypoint": job.entrypoint, "log": client.get_job_logs(job.submission_id)}}
                   for job in client.list_jobs() if job.submission_id}}))
""", env=env)  # fmt: skip
    jobs = json.loads(listing.stdout.strip().splitlines()[-1]) if listing.returncode == 0 else listing.stderr
    both = [[code, (outputs / f"{i}.out").read_text(), (outputs / f"{i}.err").read_text()]
            for i, code in enumerate(codes)]  # fmt: skip
    shutil.rmtree(outputs, ignore_errors=True)
    return {"killed": [driver.pid, engine], "twice": both, "jobs": jobs,
            "overlapping": [overlapping.returncode, overlapping.stdout, overlapping.stderr[-6000:]],
            "again": [again.returncode, again.stdout, again.stderr[-6000:]],
            "reported": [reported.returncode, reported.stdout, reported.stderr[-6000:]],
            "retried": [retried.returncode, retried.stdout, retried.stderr[-6000:]]}  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
