"""An archive's life: a full run, a rematch after enrolling one more person, a full run again, a nightly run.

    .venv/bin/python benchmarks/rematch.py [PHOTOS_DIR] [--photos N] [--newcomer K] [--nightly M]
        [--config configs/local.yaml]

In one invocation, on an archive of N photos (copies of the photos under PHOTOS_DIR, default
the sample set, each copy's bytes made distinct by a trailer after the image data, so that
the face index sees N photos; the pixels are the originals'), with all but the last person
of PHOTOS_DIR enrolled. K of the N photos (default N / 5) are the last person's, spread
evenly; the others are the other people's in turn. A rematch sends those K photos to the
LLM again, so with a real LLM the full run / rematch ratio can be at most N / K.

1. **full run**: ``plvm caption`` over the N photos into a new output;
2. the last person is enrolled, then **rematch**: ``plvm rematch`` of that output;
3. **full run again**: ``plvm caption`` over the same N photos into another new output, from
   scratch (its own face index), as the archive would be redone without rematch;
4. **nightly**: M new photos added to the archive (the newcomer's share of them as in the
   archive), ``plvm caption --resume`` into the first output (its face index holds the N photos).

Each step starts once the actors of the one before have exited (Ray Data stops them after
its run), so that their exit is not counted in the next step.

For each it prints the wall time, the CPU seconds of every process involved (Ray's included)
and the photos sent to the LLM, then the ratios: full run / rematch in CPU (the issue's goal:
at least 20x at N = 200), and the nightly run's CPU against M photos' share of the full run's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import Meter, Recorder, add_results_option, header, process_kind, process_tree  # noqa: E402
from operators.read import IMAGE_EXTENSIONS  # noqa: E402
from pipelines.caption import caption  # noqa: E402
from pipelines.config import Config, load_config  # noqa: E402
from pipelines.enroll import enroll  # noqa: E402
from pipelines.rematch import RematchSummary, rematch  # noqa: E402
from pipelines.runner.runtime import init_ray  # noqa: E402

USER = "bench"


def archive(people: list[list[Path]], newcomer: list[Path], n: int, k: int, count: int) -> list[Path]:
    """The sources of the archive's first ``count`` photos: ``k`` in every ``n`` are the newcomer's photos in
    turn, spread evenly; the others go through the other ``people`` in turn, each one's first photo, then each
    one's second, ..."""
    others = [photo for nth in zip(*people) for photo in nth]

    def source(i: int) -> Path:
        cycle, j = divmod(i, n)
        newcomer_before = (j * k) // n + cycle * k  # the newcomer's photos among photos 0 .. i - 1
        if (j * k) // n != ((j + 1) * k) // n:
            return newcomer[newcomer_before % len(newcomer)]
        return others[(i - newcomer_before) % len(others)]

    return [source(i) for i in range(count)]


def copy_photos(sources: list[Path], folder: Path, start: int, n: int) -> None:
    """Photos ``start`` .. ``start + n - 1`` of the archive, each with its own bytes (a trailer after the image
    data, which decoders ignore)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        source = sources[i]
        (folder / f"{i:06d}{source.suffix}").write_bytes(source.read_bytes() + f"\0copy {i}".encode())


def settle(timeout_s: float = 60.0) -> None:
    """Wait until the previous step's stage actors have exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(process_kind(p).startswith("actor ") for p in process_tree()):
        time.sleep(0.2)


def to_llm(summary) -> int:
    """Photos that a run sent to the LLM: a rematch's changed photos, a caption run's rows without an error."""
    return summary.changed if isinstance(summary, RematchSummary) else summary.rows - sum(summary.errors.values())


def timed(what: str, results: list, run):
    """``run()`` measured; its summary."""
    settle()
    with Meter() as meter:
        summary = run()
    results.append((what, meter, to_llm(summary)))
    print(f"{what}: {meter.wall:.1f} s, {meter.cpu:.1f} CPU s, {to_llm(summary)} photos to the LLM", file=sys.stderr,
          flush=True)  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="?", default=str(REPO.parent / "shared" / "data" / "yollava-humans"))
    parser.add_argument("--photos", dest="n", type=int, default=200, help="photos in the archive (default 200)")
    parser.add_argument("--newcomer", type=int, help="photos of the person enrolled afterwards (default N / 5)")
    parser.add_argument("--nightly", type=int, default=10, help="new photos of the nightly run (default 10)")
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    add_results_option(parser)
    args = parser.parse_args()
    files = sorted(p for p in Path(args.photos).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    folders = sorted({f.parent for f in files if f.stem == "ref_img"})
    people = [sorted(f for f in files if f.parent == folder and f.stem != "ref_img") for folder in folders]
    if len(folders) < 2 or not all(people):
        raise SystemExit(f"{args.photos} needs folders of at least two people, each with photos and ref_img.*")
    refs = [next(f for f in files if f.parent == folder and f.stem == "ref_img") for folder in folders]
    k = args.n // 5 if args.newcomer is None else args.newcomer
    if not 0 < k <= args.n:
        raise SystemExit(f"--newcomer must be between 1 and --photos ({args.n})")
    sources = archive(people[:-1], people[-1], args.n, k, args.n + args.nightly)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy_photos(sources, work / "archive", 0, args.n)

        def config(output: str) -> Config:
            return load_config(args.config, bank=str(work / "banks"), input__uri=str(work / "archive"),
                               input__user=USER, output__uri=str(work / output), ray__progress="off")  # fmt: skip

        first = config("out")
        for ref in refs[:-1]:
            enroll(first, USER, ref.parent.name, [str(ref)])
        newcomer = refs[-1]

        record = Recorder(__file__, args.results)
        print(header("An archive: full run, rematch, full run again, nightly run (`benchmarks/rematch.py`)"))
        print(f"- command: `{' '.join(['benchmarks/rematch.py', *sys.argv[1:]])}`")
        print(f"- {args.n} photos (copies of {sum(map(len, people))} under {args.photos}, each with its own bytes), "
              f"{len(refs) - 1} people enrolled, then {newcomer.parent.name}, who is in {k} of the {args.n}; "
              f"nightly: {args.nightly} new photos; CPU: every process of the run, Ray's own included\n",
              flush=True)  # fmt: skip
        init_ray(first.ray)  # started once, outside the timings, as a long-lived service would be
        results: list = []
        timed("full run", results, lambda: caption(first))
        enroll(first, USER, newcomer.parent.name, [str(newcomer)])
        rematched = timed("rematch", results, lambda: rematch(first, first.output.uri))
        timed("full run again", results, lambda: caption(config("out-again")))
        copy_photos(sources, work / "archive", args.n, args.nightly)
        timed("nightly", results, lambda: caption(first, resume=True))
        shutil.rmtree(work / "archive")

    print("| step | photos | wall s | CPU s | photos to the LLM | other processes' CPUs |")
    print("|---|---|---|---|---|---|")
    for (what, meter, llm), photos in zip(results, [args.n, args.n, args.n, args.nightly]):
        print(f"| {what} | {photos} | {meter.wall:.1f} | {meter.cpu:.1f} | {llm} | {meter.others:.1f} |")
    (_, full, _), (_, matched, _), (_, again, _), (_, nightly, _) = results
    share = full.cpu * args.nightly / args.n
    print(f"\n- full run / rematch, CPU: **{full.cpu / matched.cpu:.1f}x** (full run again: "
          f"{again.cpu / matched.cpu:.1f}x); wall: {full.wall / matched.wall:.1f}x; the rematch named the faces "
          f"again in {rematched.naming_s:.2f} s of its {matched.wall:.1f} s")
    for what, meter, _ in results:
        print(f"- {what}, CPU seconds by process: {meter.breakdown()}")
    print(f"- nightly run of {args.nightly} photos: {nightly.cpu:.1f} CPU s, against {share:.1f} CPU s for "
          f"{args.nightly} photos' share of the full run: **{nightly.cpu / share:.2f}x**; the difference, "
          f"{nightly.cpu - share:.1f} CPU s, is the run's fixed cost (start-up, reading the index and the output)")

    record.write()

if __name__ == "__main__":
    main()
