"""The embedded Ray of a real ``plvm caption``: it listens on loopback only, and what a killed run leaves is stopped."""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from conftest import make_config, photo
from test_resilience import caption_command, photos

from pipelines.enroll import enroll
from pipelines.runner.ray_processes import OWNER_FILE, owner_mark, stop, stop_leftovers


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def family(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants: a driver, the Ray it started and that Ray's workers."""
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def listening(procs: list[psutil.Process]) -> set[tuple[str, str, int]]:
    """The TCP sockets in LISTEN and the unconnected UDP sockets of ``procs``: (process name, address, port)."""
    names = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            names[proc.pid] = proc.name()
    return {
        (names[s.pid], s.laddr.ip, s.laddr.port)
        for s in psutil.net_connections(kind="inet")
        if s.pid in names and (s.status == psutil.CONN_LISTEN or (s.status == psutil.CONN_NONE and not s.raddr))
    }


def running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def enrolled(tmp_path: Path):
    """A config whose bank knows user ``kim``."""
    config = make_config(tmp_path, ray={"num_cpus": 2, "progress": "off"})
    enroll(config, "kim", "Viruss", [photo("viruss", "ref_img.jpg")])
    return config


@contextlib.contextmanager
def caption_process(tmp_path: Path, config, n_each: int, name: str, *args: str) -> Iterator[subprocess.Popen]:
    """A ``plvm caption`` subprocess over ``2 * n_each`` photos of ``kim``, its stderr in ``NAME.err``.

    Interrupted (Ctrl-C) if still running at the end of the block, and whatever it started stopped.
    """
    command, env = caption_command(tmp_path, config, photos(n_each), "kim")
    stderr = (tmp_path / f"{name}.err").open("w")
    run = subprocess.Popen([*command, *args], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        yield run
    finally:
        started = family(run.pid)
        run.send_signal(signal.SIGINT)
        run.wait(timeout=120)
        stop([p for p in started if running(p)])


def wait_for(what, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while not (found := what()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


STAGES = ("DetectFaces", "EmbedFaces", "Generate")
"""The stages whose actors (Ray Data's map workers) a caption run starts, Generate last (after the cohort barrier)."""


def stages_up(pid: int) -> set[str]:
    """The stages of the run ``pid`` whose actor is up."""
    names = [p.name() for p in family(pid) if running(p)]
    return {stage for stage in STAGES for name in names if "MapWorker" in name and stage in name}


def test_the_embedded_ray_listens_on_loopback_only(tmp_path, yollava, tiny_models):
    with caption_process(tmp_path, enrolled(tmp_path), 1, "run") as run:
        sockets: set[tuple[str, str, int]] = set()
        until = time.monotonic() + 300
        # Ray's processes start one after another: look until every stage's actor is up, and a second more
        while time.monotonic() < until and run.poll() is None:
            sockets |= listening(family(run.pid))
            if len(stages_up(run.pid)) == len(STAGES):
                until = min(until, time.monotonic() + 1)
            time.sleep(0.5)
    exposed = sorted(socket for socket in sockets if not loopback(socket[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, sockets
    assert {stage for stage in STAGES for name in names if stage in name} == set(STAGES), f"the actors too: {sockets}"


def test_the_next_run_stops_what_a_killed_run_left_and_nothing_else(tmp_path, yollava, tiny_models, ray_local):
    other = [p for p in family(psutil.Process().pid) if p.name() in ("gcs_server", "raylet")]  # ray_local's
    assert other, "the session's Ray: a live run's"
    config = enrolled(tmp_path)
    with caption_process(tmp_path, config, 2, "first") as first:
        assert wait_for(lambda: stages_up(first.pid)), "the stages run"
        left = family(first.pid)[1:]
        first.kill()  # the driver only
        first.wait()
        assert any(running(p) for p in left), "a killed driver's Ray lingers"

    with caption_process(tmp_path, config, 2, "second", "--resume") as second:
        assert wait_for(lambda: stages_up(second.pid)), "the next run's stages run"
        assert not [p for p in left if running(p)], "the next run stopped what the killed one left, before starting"
    assert "Ray processes left by earlier runs that were killed" in (tmp_path / "second.err").read_text()
    assert all(running(p) for p in other) and ray_local.get(ray_local.put(7)) == 7, "a live run's Ray is untouched"


def test_only_processes_of_sessions_whose_claiming_run_is_dead_are_stopped(tmp_path):
    me = psutil.Process()
    claims = {
        "dead": f"{me.pid}:{me.create_time() + 1}",  # this pid, but another process: a pid reused since
        "live": owner_mark(),
        "unclaimed": None,
    }
    writers = {}
    for name, mark in claims.items():
        logs = tmp_path / f"session_{name}" / "logs"
        logs.mkdir(parents=True)
        if mark:
            (logs.parent / OWNER_FILE).write_text(mark)
        with (logs / "worker.out").open("w") as out:
            writers[name] = psutil.Popen(["sleep", "60"], stdout=out)
    try:
        assert stop_leftovers() >= 1
        assert [name for name, proc in writers.items() if running(proc)] == ["live", "unclaimed"]
    finally:
        stop(list(writers.values()))
