"""Face stages (decode, detect, align, embed, match): the Ray pipeline against a plain single-process loop.

    .venv/bin/python benchmarks/face_stages.py [PHOTOS_DIR] [--repeat N] [--rounds R] [--config configs/local.yaml]

Both run in one invocation on the same photos (every image file under PHOTOS_DIR, default
the sample set, repeated N times) with the same models and settings; both times include
loading the models (the pipeline's actors start within the run). Each side runs in a fresh
child process, measured from this one with all its descendants (the embedded Ray's every
process), so neither carries the other's leftovers and the sampling costs neither. It
prints, for each, photos/s (wall), CPU seconds per photo (all processes involved, sampled
with psutil) and peak memory (the sums of the resident and of the proportional sets), then
the ratios pipeline/loop, and the pipeline's CPU by kind of process. With ``--rounds R`` both
sides run R times, in turn, and the median of each ratio is printed too: on a shared virtual
machine one run's CPU seconds vary by 10% and more. Ray's own cost (its scheduler, system
actors, worker start-up) goes with wall time and start-up rather than with photos, so short
runs show a higher ratio: the default, 200 photos, is the figure in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import Meter, Recorder, add_results_option, header, tree_of  # noqa: E402
from operators.decode import decode_image  # noqa: E402
from operators.read import IMAGE_EXTENSIONS  # noqa: E402
from operators.rows import to_table  # noqa: E402
from pipelines.runner.execute import execute  # noqa: E402
from pipelines.stage_lists import naming_stages  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.runner.runtime import init_ray  # noqa: E402
from plvm_model.store.banks import BankStore  # noqa: E402


def loop(config, paths: list[str], refs: list[np.ndarray]) -> int:
    """The same work as the pipeline's face stages, one photo after the other, in this process."""
    import torch

    from plvm_model.faces import MTCNNDetector, make_embedder

    torch.set_num_threads(os.cpu_count() or 1)
    detector = MTCNNDetector(config.detect.long_side, config.detect.min_face_size, config.detect.score_threshold,
                             device=config.detect.device)  # fmt: skip
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
    steps = naming_stages(config)
    ds = execute(listing, steps, config.ray, config.run, config.tasks.batch_size).select_columns(["concepts"])
    return sum(len(c or []) for batch in ds.iter_batches(batch_format="pyarrow") for c in batch["concepts"].to_pylist())


def run_side(side: str, photos_file: str, config_path: str, banks: str) -> None:
    """One side of the comparison, in this (fresh) process; prints the named faces as its last line."""
    config = load_config(config_path, bank=banks)
    photos = Path(photos_file).read_text().splitlines()
    if side == "loop":
        descriptors = [c.face_descriptors for c in BankStore(banks).load("bench").concepts]
        named = loop(config, photos, descriptors)
    else:
        init_ray(config.ray)
        named = pipeline(config, photos)
    print(named, flush=True)


def measure(side: str, photos_file: str, config_path: str, banks: str) -> tuple[Meter, int]:
    """Run ``side`` in a child process, measured (with all its descendants: the embedded Ray) from here."""
    command = [sys.executable, __file__, "--side", side, "--photos-file", photos_file, "--config", config_path,
               "--banks", banks]  # fmt: skip
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(command, stdout=out, env={**os.environ, "PYTHONPATH": str(REPO)})
        with Meter(tree_of(child), proportional=True) as meter:
            if child.wait() != 0:
                raise SystemExit(f"the {side} side failed (exit {child.returncode})")
        out.seek(0)
        return meter, int(out.read().split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="?", default=str(REPO.parent / "shared" / "data" / "yollava-humans"))
    parser.add_argument("--repeat", type=int, default=4,
                        help="times the photos are repeated (default 4: 200 sample photos)")  # fmt: skip
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    parser.add_argument("--rounds", type=int, default=1,
                        help="times both sides run, in turn (more than 1: also the median of each ratio)")  # fmt: skip
    parser.add_argument("--side", choices=("loop", "pipeline"), help=argparse.SUPPRESS)
    parser.add_argument("--photos-file", help=argparse.SUPPRESS)
    parser.add_argument("--banks", help=argparse.SUPPRESS)
    add_results_option(parser)
    args = parser.parse_args()
    if args.side:
        return run_side(args.side, args.photos_file, args.config, args.banks)
    files = sorted(str(p) for p in Path(args.photos).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    refs = [f for f in files if Path(f).stem == "ref_img"]
    photos = [f for f in files if Path(f).stem != "ref_img"] * args.repeat
    if not photos:
        raise SystemExit(f"no photos under {args.photos}")

    # imported here, not at the top: the pipeline's child process (whose driver is measured) imports this module,
    # and enrollment imports torch, which `plvm caption`'s driver never does
    from pipelines.enroll import Enroller

    with tempfile.TemporaryDirectory() as work:
        banks = str(Path(work) / "banks")
        enroller = Enroller(load_config(args.config, bank=banks))
        for ref in refs:
            enroller.enroll("bench", Path(ref).parent.name, [ref])
        del enroller
        photos_file = Path(work) / "photos.txt"
        photos_file.write_text("\n".join(photos))

        record = Recorder(__file__, args.results)
        print(header("Face stages: the Ray pipeline against a single-process loop (`benchmarks/face_stages.py`)"))
        print(f"- command: `{' '.join(['benchmarks/face_stages.py', *sys.argv[1:]])}`")
        print(f"- {len(photos)} photos ({len(photos) // args.repeat} repeated {args.repeat} times), {len(refs)} people "
              "enrolled; each side in a fresh process, measured from outside; CPU: every process of the side, Ray's "
              "own included; memory: the peak of the sum of their resident sets (RSS) and of their proportional "
              "sets (PSS, shared pages split between the processes that map them)\n", flush=True)  # fmt: skip
        rounds = [(measure("loop", str(photos_file), args.config, banks),
                   measure("pipeline", str(photos_file), args.config, banks)) for _ in range(args.rounds)]  # fmt: skip

    n = len(photos)
    print("| round | photos | loop photos/s | pipeline photos/s | CPU s per photo (loop, pipeline) "
          "| CPU per photo, pipeline / loop | peak PSS, pipeline / loop | peak RSS, pipeline / loop "
          "| other processes' CPUs (loop, pipeline) | named faces (loop, pipeline) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, ((single, named_loop), (ray_run, named_ray)) in enumerate(rounds, 1):
        print(f"| {i} | {n} | {n / single.wall:.2f} | {n / ray_run.wall:.2f} | {single.cpu / n:.3f}, "
              f"{ray_run.cpu / n:.3f} | **{ray_run.cpu / single.cpu:.2f}x** | "
              f"**{ray_run.peak_pss / single.peak_pss:.1f}x** ({ray_run.peak_pss / 2**20:.0f} / "
              f"{single.peak_pss / 2**20:.0f} MiB) | {ray_run.peak / single.peak:.1f}x ({ray_run.peak / 2**20:.0f} / "
              f"{single.peak / 2**20:.0f} MiB) | {single.others:.1f}, {ray_run.others:.1f} | {named_loop}, "
              f"{named_ray} |")  # fmt: skip
    print()
    for i, ((single, _), (ray_run, _)) in enumerate(rounds, 1):
        print(f"- round {i}, the pipeline's CPU seconds by process: {ray_run.breakdown()}; "
              f"the loop's: {single.cpu:.1f}")
        print(f"- round {i}, the pipeline's memory at its peak PSS, MiB of PSS (RSS) by process: "
              f"{ray_run.memory_breakdown()}")
    if len(rounds) > 1:
        def median(ratio) -> float:
            return statistics.median(ratio(single, ray_run) for (single, _), (ray_run, _) in rounds)

        cpu, pss = median(lambda a, b: b.cpu / a.cpu), median(lambda a, b: b.peak_pss / a.peak_pss)
        print(f"- median of the {len(rounds)} rounds, pipeline / loop: CPU per photo **{cpu:.2f}x**, peak PSS "
              f"**{pss:.1f}x**, peak RSS {median(lambda a, b: b.peak / a.peak):.1f}x")
    record.write()

if __name__ == "__main__":
    main()
