"""Face stages (decode, detect, embed, match): the Ray pipeline against a plain single-process loop.

    .venv/bin/python benchmarks/face_stages.py [PHOTOS_DIR] [--repeat N] [--config configs/local.yaml]

Both run in one invocation on the same photos (every image file under PHOTOS_DIR, default
the sample set, repeated N times) with the same models and settings; both times include
loading the models (the pipeline's actors start within the run). It prints, for each,
photos/s (wall), CPU seconds per photo (all processes involved, sampled with psutil) and
peak memory (sum of the resident sets), then the ratios pipeline/loop. Ray's own cost (its
scheduler, system actors, worker start-up) goes with wall time and start-up rather than with
photos, so short runs show a higher ratio: the default, 200 photos, is the README's figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from operators.decode import decode_image  # noqa: E402
from operators.read import IMAGE_EXTENSIONS  # noqa: E402
from operators.rows import to_table  # noqa: E402
from pipelines.caption import dataset, naming_stages  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.enroll import Enroller  # noqa: E402
from pipelines.runtime import init_ray  # noqa: E402
from plvm_model.faces import MTCNNDetector, make_embedder  # noqa: E402


class Meter:
    """CPU seconds and peak resident memory of a set of processes, sampled every 0.2 s."""

    def __init__(self, processes) -> None:
        self.processes = processes
        self.peak = 0
        self._cpu0: dict[int, float] = {}
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        rss = 0
        for p in self.processes():
            try:
                times, mem = p.cpu_times(), p.memory_info().rss
            except psutil.Error:
                continue
            self._cpu0.setdefault(p.pid, times.user + times.system)
            self._cpu[p.pid] = times.user + times.system
            rss += mem
        self.peak = max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __enter__(self) -> Meter:
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.started
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu(self) -> float:
        return sum(self._cpu[pid] - self._cpu0.get(pid, self._cpu[pid]) for pid in self._cpu)


def ray_processes():
    me = psutil.Process()
    found = [me]
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if p.pid != me.pid and ("ray::" in line or "raylet" in line or "gcs_server" in line or "default_worker" in line):
            found.append(p)
    return found


def loop(config, paths: list[str], refs: list[np.ndarray]) -> int:
    """The same work as the pipeline's face stages, one photo after the other, in this process."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    detector = MTCNNDetector(config.detect.long_side, config.detect.min_face_size, config.detect.score_threshold)
    embedder = make_embedder(config.embed.kind, **config.embed.options)
    per_photo = []
    for path in paths:
        pixels, _, _ = decode_image(Path(path).read_bytes(), config.decode.max_side, config.decode.max_pixels)
        per_photo.append(embedder.embed(pixels, detector.detect(pixels)))
    rule = config.match.rule()
    # as the pipeline: every face of the run first, then the scales
    scales = rule.scales(refs, np.concatenate(per_photo)) if rule.cohort else None
    return sum(m.concept is not None for vectors in per_photo for m in rule.name(vectors, refs, scales)[0])


def pipeline(config, paths: list[str]) -> int:
    listing = to_table([{"path": p, "user_id": "bench"} for p in paths], ["path", "user_id"])
    ds = dataset(config, listing, naming_stages).select_columns(["concepts"])
    return sum(len(c or []) for batch in ds.iter_batches(batch_format="pyarrow") for c in batch["concepts"].to_pylist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="?", default=str(REPO.parent / "shared" / "data" / "yollava-humans"))
    parser.add_argument("--repeat", type=int, default=4, help="times the photos are repeated (default 4: 200 sample photos)")
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    args = parser.parse_args()
    files = sorted(str(p) for p in Path(args.photos).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    refs = [f for f in files if Path(f).stem == "ref_img"]
    photos = [f for f in files if Path(f).stem != "ref_img"] * args.repeat
    if not photos:
        raise SystemExit(f"no photos under {args.photos}")

    with tempfile.TemporaryDirectory() as banks:
        config = load_config(args.config, bank=banks)
        enroller = Enroller(config)
        for ref in refs:
            enroller.enroll("bench", Path(ref).parent.name, [ref])
        bank = enroller.store.load("bench")
        descriptors = [c.face_descriptors for c in bank.concepts]
        del enroller

        print(f"{len(photos)} photos, {len(refs)} enrolled people, {os.cpu_count()} CPUs")
        with Meter(lambda: [psutil.Process()]) as single:
            named_loop = loop(config, photos, descriptors)
        init_ray(config.ray)
        with Meter(ray_processes) as ray_run:
            named_ray = pipeline(config, photos)

    rows = []
    for name, meter in (("single-process loop", single), ("Ray pipeline", ray_run)):
        rows.append((name, len(photos) / meter.wall, meter.cpu / len(photos), meter.peak / 2**20))
        print(f"{name:20s} {rows[-1][1]:6.2f} photos/s  {rows[-1][2]:6.3f} CPU s/photo  peak {rows[-1][3]:7.0f} MiB")
    print(f"named faces: loop {named_loop}, pipeline {named_ray}")
    (_, loop_rate, loop_cpu, loop_mem), (_, ray_rate, ray_cpu, ray_mem) = rows
    print(f"ratio pipeline/loop: throughput {ray_rate / loop_rate:.2f}x, CPU per photo {ray_cpu / loop_cpu:.2f}x, "
          f"peak memory {ray_mem / loop_mem:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
