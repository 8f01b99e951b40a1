"""What a benchmark's figures depend on: the machine, the date, the commit, and the load beside it.

Every table a benchmark prints is headed by :func:`header`, and its timed part runs inside
a :class:`Meter`, which also measures how much CPU *other* processes used meanwhile: on a
shared 2-core machine that load moves throughput figures by a large factor, so a figure
is only comparable with one taken under a similar load.
"""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
"""The one file of measured figures: each benchmark's newest ones, in a section it writes."""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    """The checkout's commit, marked when it has uncommitted changes to tracked files."""
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{sha} (with uncommitted changes)" if dirty else sha


def header(title: str) -> str:
    """Markdown lines naming the benchmark, the machine, the date, the commit and the load before the run."""
    memory = psutil.virtual_memory().total / 2**30
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return "\n".join([
        f"### {title}",
        "",
        (f"- machine: {cpu_model()}, {psutil.cpu_count(logical=True)} CPUs ({psutil.cpu_count(logical=False)} cores), "
         f"{memory:.1f} GiB memory, {platform.system()} {platform.machine()}, Python {platform.python_version()}"),
        *([f"- GPU: {gpu}"] if (gpu := gpu_names()) else []),
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; commit {commit()}",
        f"- load average before the run (1, 5, 15 min): {load}",
    ])  # fmt: skip


def nvidia_smi(query: str, format: str = "csv,noheader") -> list[str] | None:
    """What ``nvidia-smi --query-gpu=QUERY`` prints, a line for each GPU (None without it)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", f"--format={format}"], capture_output=True,
                             text=True, check=True, timeout=10).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpu_names() -> str | None:
    """The machine's GPUs and their memory, from ``nvidia-smi`` (None without it)."""
    return "; ".join(nvidia_smi("name,memory.total") or []) or None


def add_results_option(parser) -> None:
    """``--results FILE``: where the benchmark writes its section of figures (``-``: nowhere)."""
    parser.add_argument("--results", default=str(RESULTS),
                        help=f"the results file this benchmark writes its section into (default {RESULTS.name}; -: none)")  # fmt: skip


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


class Recorder:
    """From its start, what the benchmark prints is printed and kept; :meth:`write` writes it as the section of
    ``script`` (``benchmarks/NAME.py``) in the results file ``results`` (None or ``-``: nowhere), in place of that
    section's older figures; the other benchmarks' sections stay as they are. A benchmark that fails before
    :meth:`write` writes nothing."""

    def __init__(self, script: str, results: str | None) -> None:
        self.name, self.results = f"benchmarks/{Path(script).name}", results
        self.captured = io.StringIO()
        sys.stdout = _Tee(sys.__stdout__, self.captured)

    def write(self) -> None:
        sys.stdout = sys.__stdout__
        if self.results not in (None, "-"):
            write_section(Path(self.results), self.name, self.captured.getvalue())


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or add) the section ``## name`` of the Markdown file ``path`` with ``body``."""
    heading = f"## {name}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"{heading}\n<!-- written by {name} -->\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    path.write_text(text)


def process_tree() -> list[psutil.Process]:
    """This process and its descendants: with an embedded Ray, every Ray process of this run
    (and none of another run's on the same machine)."""
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def peak_rss() -> int:
    """This process's peak resident memory in bytes: the kernel's high-water mark of its address space
    (``VmHWM``; ``getrusage``'s ``ru_maxrss`` would also count the parent's pages that the fork copied, as it
    survives ``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def tree_of(child: subprocess.Popen) -> Callable[[], list[psutil.Process]]:
    """The processes of a child process's tree (it and its descendants), as :class:`Meter` measures them."""
    tree = psutil.Process(child.pid)

    def processes() -> list[psutil.Process]:
        try:
            return [tree, *tree.children(recursive=True)]
        except psutil.Error:
            return []

    return processes


def process_kind(process: psutil.Process, known: str = "?") -> str:
    """What a process of a run is: a Ray Data stage's actor (by its class), Ray's task workers, one of Ray's own
    actors or daemons (by name), or the driver; ``known`` when the process is gone."""
    try:
        title = " ".join(process.cmdline())
    except psutil.Error:
        return known
    if title.startswith("ray::MapWorker("):
        return "actor " + title.removeprefix("ray::MapWorker(").split(")")[0].removeprefix("MapBatches(")
    if title.startswith(("ray::_", "ray::ActorLocationTracker", "ray::DashboardAgent")):
        return "Ray's own actors and agents"
    if title.startswith("ray::"):
        return "Ray task workers"
    if "/ray/" in title:
        return "Ray's daemons"
    return "driver"


def gpu_memory_used() -> int | None:
    """Bytes of GPU memory in use on the machine (all its GPUs, every process), from ``nvidia-smi``; None without
    it."""
    used = nvidia_smi("memory.used", "csv,noheader,nounits")
    return None if used is None else sum(map(int, used)) * 2**20


def _busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class Meter:
    """Wall time, CPU seconds and peak memory of a set of processes, sampled every 0.2 s, and the CPU
    that every other process on the machine used over the same time.

    Memory is the peak of the sum of the processes' resident sets (:attr:`peak`), and with
    ``proportional`` also of their proportional sets (:attr:`peak_pss`, read from smaps every
    second, which costs the sampling process some CPU: measure other processes then). A page
    that several processes map (a shared library, Ray's object store in /dev/shm) counts once
    in each resident set, and is split between them in the proportional sets, so for a set of
    processes the sum of PSS is the memory they take from the machine.
    """

    def __init__(
        self,
        processes: Callable[[], Iterable[psutil.Process]] = process_tree,
        proportional: bool = False,
        gpu: bool = False,
    ) -> None:
        self.processes = processes
        self.proportional = proportional
        self.gpu = gpu
        self.peak = 0
        self.peak_pss = 0
        self.peak_by_kind: dict[str, int] = {}
        """The peak of each kind of process's summed RSS (:func:`process_kind`)."""
        self.peak_gpu: int | None = None
        """With ``gpu``: the peak of the GPU memory in use on the machine, in bytes (:func:`gpu_memory_used`)."""
        self.at_peak: dict[str, tuple[int, int, int]] = {}
        self._samples = 0
        self._cpu0: dict[int, float] = {}
        self._cpu: dict[int, float] = {}
        self._kind: dict[int, str] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        proportional = self.proportional and self._samples % 5 == 0
        self._samples += 1
        by_kind: dict[str, tuple[int, int, int]] = {}
        for p in self.processes():
            try:
                times, rss = p.cpu_times(), p.memory_info().rss
                pss = p.memory_full_info().pss if proportional else 0
            except psutil.Error:
                continue
            self._cpu0.setdefault(p.pid, times.user + times.system)
            self._cpu[p.pid] = times.user + times.system
            kind = self._kind.get(p.pid, "?")
            if not kind.startswith("actor "):  # a worker takes its title once it has a role
                self._kind[p.pid] = kind = process_kind(p, kind)
            kind_rss, kind_pss, count = by_kind.get(kind, (0, 0, 0))
            by_kind[kind] = (kind_rss + rss, kind_pss + pss, count + 1)
        rss, pss = sum(m[0] for m in by_kind.values()), sum(m[1] for m in by_kind.values())
        self.peak = max(self.peak, rss)
        for kind, (kind_rss, _, _) in by_kind.items():
            self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0), kind_rss)
        if self.gpu and self._samples % 5 == 1:
            used = gpu_memory_used()
            if used is not None:
                self.peak_gpu = max(self.peak_gpu or 0, used)
        if pss > self.peak_pss:
            self.peak_pss, self.at_peak = pss, by_kind

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __enter__(self) -> Self:
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._busy0 = _busy_seconds()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.started
        self._busy = _busy_seconds() - self._busy0
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu(self) -> float:
        """CPU seconds of the measured processes."""
        return sum(self._cpu[pid] - self._cpu0.get(pid, self._cpu[pid]) for pid in self._cpu)

    def cpu_by_kind(self) -> dict[str, float]:
        """CPU seconds of the measured processes by kind (:func:`process_kind`), the largest first."""
        kinds: dict[str, float] = {}
        for pid, cpu in self._cpu.items():
            kind = self._kind.get(pid, "?")
            kinds[kind] = kinds.get(kind, 0.0) + cpu - self._cpu0.get(pid, cpu)
        return dict(sorted(kinds.items(), key=lambda item: -item[1]))

    def breakdown(self) -> str:
        """:meth:`cpu_by_kind` as one line."""
        return ", ".join(f"{kind} {cpu:.1f}" for kind, cpu in self.cpu_by_kind().items() if cpu >= 0.05)

    def memory_breakdown(self) -> str:
        """PSS (RSS) in MiB and the number of processes by kind of process (:func:`process_kind`), at the sample
        with the peak sum of PSS (with ``proportional``), as one line, the largest first."""
        kinds = sorted(self.at_peak.items(), key=lambda item: -item[1][1])
        return ", ".join(f"{kind} ×{n} {pss / 2**20:.0f} ({rss / 2**20:.0f})" for kind, (rss, pss, n) in kinds)

    @property
    def others(self) -> float:
        """CPUs kept busy on average by processes outside the measured ones (0: a quiet machine)."""
        return max(0.0, self._busy - self.cpu) / self.wall if self.wall else 0.0
