"""The processes of a Ray on this machine, found by its session folder, and the leftovers of killed runs stopped.

Every process a Ray starts (GCS, raylet, agents, dashboard, monitors, workers, actors, and
what they start in turn) holds a file in ``logs/`` of the Ray's session folder open for
writing (its log, or its standard output inherited). That finds them all, whatever their
title (Ray rewrites the command lines, and with them the environment that ``/proc`` shows).
The embedded Ray of a run is claimed with the run's mark (pid and start time) in
``plvm_owner`` in its session folder; a Ray whose owner has died is a leftover. Rays without
that file (another user's, one from ``ray start``, a cluster's) and those of live runs are
never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

OWNER_FILE = "plvm_owner"
"""In a Ray's session folder: the mark (``<pid>:<start time>``) of the run that started that Ray."""


def owner_mark() -> str:
    """This process's mark: its pid and start time (a pid alone may be reused once it has died)."""
    return f"{os.getpid()}:{psutil.Process().create_time()}"


def claim(session_dir: str | Path) -> None:
    """Mark the Ray of ``session_dir`` as this process's, to be stopped by a later run if this one is killed."""
    (Path(session_dir) / OWNER_FILE).write_text(owner_mark())


def owner_alive(mark: str) -> bool:
    """Whether the process that ``mark`` names still runs (the same process: same pid and start time)."""
    pid, started = mark.split(":", 1)
    try:
        proc = psutil.Process(int(pid))
        return proc.status() != psutil.STATUS_ZOMBIE and str(proc.create_time()) == started
    except psutil.NoSuchProcess:
        return False


def _session_of(proc: psutil.Process) -> Path | None:
    """The Ray session folder in whose ``logs/`` ``proc`` writes (holds a file open for writing)."""
    for file in proc.open_files():
        path = Path(file.path)
        if file.mode != "r" and path.parent.name == "logs" and path.parent.parent.name.startswith("session_"):
            return path.parent.parent
    return None


def session_processes() -> dict[Path, list[psutil.Process]]:
    """This user's live processes of each Ray session on this machine, by session folder."""
    found: dict[Path, list[psutil.Process]] = {}
    uid = os.getuid()
    for proc in psutil.process_iter(["uids", "status"]):
        if proc.info["uids"] is None or proc.info["uids"].real != uid or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(psutil.Error):
            if session := _session_of(proc):
                found.setdefault(session, []).append(proc)
    return found


def stop(processes: list[psutil.Process], grace_s: float = 5.0) -> None:
    """SIGTERM ``processes``, and SIGKILL those still running after ``grace_s``."""
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, running = psutil.wait_procs(processes, timeout=grace_s)
    for proc in running:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(running, timeout=grace_s)


def stop_leftovers() -> int:
    """Stop the processes of this user's claimed Rays whose run has died (killed by SIGKILL); their count.

    A killed driver takes its GCS and raylet with it (Ray sets them to die with their parent),
    but the raylet's agents and the workers, and the models they hold, linger for minutes.
    """
    left: dict[Path, list[psutil.Process]] = {}
    for session, procs in session_processes().items():
        with contextlib.suppress(FileNotFoundError):
            if not owner_alive((session / OWNER_FILE).read_text()):
                left[session] = procs
    stopped = [proc for procs in left.values() for proc in procs]
    if stopped:
        log.warning("stopping %d Ray processes left by earlier runs that were killed (%s)",
                    len(stopped), ", ".join(str(session) for session in left))  # fmt: skip
        stop(stopped)
    return len(stopped)
