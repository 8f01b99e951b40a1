"""A two-node Ray cluster on 127.0.0.1 with an S3 endpoint, and a caption job submitted to it.

    python tests/cluster_scenario.py RESULT.json

Run by ``test_cluster.py`` inside a private network namespace. Everything goes through the
product's front doors: ``plvm enroll`` into a bank on S3, ``ray start`` twice (head and a
second node, token authentication on), ``python submit.py --wait`` with the photos and
the output on S3 and the endpoint and credentials given as environment variables. The
result (exit codes, the job's log tail, the nodes and the output rows) goes to RESULT.json.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import fsspec
import psutil
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

from conftest import DATA  # noqa: E402
from s3_endpoint import CREDENTIALS, free_port, moto_endpoint  # noqa: E402

from pipelines.runner.ray_processes import session_processes, stop  # noqa: E402

BIN = Path(sys.executable).parent


def run(*command: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def stop_cluster(temp_dir: Path) -> dict[str, list[str]]:
    """Stop this scenario's cluster and nothing else; the names of its processes stopped and still running.

    Not ``ray stop``, which stops every Ray on the machine. The cluster's processes are those of
    the Ray sessions under ``temp_dir`` (both nodes and the job's driver write there), and any
    whose command line names ``temp_dir`` (the GCS, the raylets).
    """

    def started() -> list[psutil.Process]:
        found = {proc.pid: proc for session, procs in session_processes().items() if session.parent == temp_dir
                 for proc in procs}  # fmt: skip
        for proc in psutil.process_iter(["cmdline"]):
            if str(temp_dir) in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
                found[proc.pid] = proc
        return list(found.values())

    cluster = started()
    names = [proc.name() for proc in cluster]
    stop(cluster)
    return {"stopped": names, "running": [proc.name() for proc in started()]}


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
    with moto_endpoint() as endpoint:
        env["S3_ENDPOINT"] = endpoint
        fs = fsspec.filesystem("s3", endpoint_url=endpoint)
        fs.mkdir("photos"), fs.mkdir("banks"), fs.mkdir("results")
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
        config["ray"] = {"no_progress_timeout_s": 300, "progress": "lines"}
        config["output"] = {"rows_per_file": 4}
        config_file = Path(tempfile.mkdtemp()) / "cluster.yaml"
        config_file.write_text(yaml.safe_dump(config))

        for user, name, person in (("ana", "Thao", "thao"), ("ben", "Will", "willinvietnam")):
            fs.put(str(DATA / person / "ref_img.jpg"), f"photos/refs/{person}.jpg")
            done = run(str(BIN / "plvm"), "enroll", "--config", str(config_file), "--user", user, "--name", name,
                       f"s3://photos/refs/{person}.jpg", env=env)  # fmt: skip
            result.setdefault("enroll", []).append([done.returncode, done.stderr[-2000:]])

        port, dashboard = free_port(), free_port()
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
        head = run(str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                   "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir}", env=env)  # fmt: skip
        result["head"] = [head.returncode, head.stderr[-2000:]]
        try:
            worker = run(str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                         "--num-cpus=1", env=env)  # fmt: skip
            result["worker"] = [worker.returncode, worker.stderr[-2000:]]
            nodes = run(sys.executable, "-c", f"import ray, json; ray.init(address='127.0.0.1:{port}', logging_level='ERROR');"
                        "print(json.dumps([n['Alive'] for n in ray.nodes()]))", env=env)  # fmt: skip
            result["nodes"] = json.loads(nodes.stdout.strip().splitlines()[-1]) if nodes.returncode == 0 else nodes.stderr
            job = run(sys.executable, str(REPO / "submit.py"), "--address", f"http://127.0.0.1:{dashboard}", "--wait",
                      "--config", str(config_file), "--env", f"S3_ENDPOINT={endpoint}",
                      *(f"--env={k}={v}" for k, v in CREDENTIALS.items()), "--env", f"PLVM_CACHE={os.environ['PLVM_CACHE']}",
                      "--", "caption", "--input", "s3://photos/manifest.csv", "--output", "s3://results/cluster",
                      env=env)  # fmt: skip
            result["submit"] = [job.returncode, job.stdout[-6000:], job.stderr[-3000:]]
        finally:
            result["cluster"] = stop_cluster(Path(temp_dir))
            shutil.rmtree(config_file.parent, ignore_errors=True)
            shutil.rmtree(temp_dir, ignore_errors=True)
        sys.path.insert(0, str(REPO))
        from plvm_model.store.output_table import read_output

        table = read_output("s3://results/cluster", {"s3": {"endpoint_url": endpoint}})
        result["rows"] = table.select(["path", "user_id", "concepts", "error_kind", "caption", "engine"]).to_pylist()
    result_file.write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
