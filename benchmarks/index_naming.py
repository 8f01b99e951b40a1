"""Naming from the face index at archive scale: what a caption run's start and a rematch cost in the driver.

    .venv/bin/python benchmarks/index_naming.py [--photos N ...] [--data PEOPLE_DIR] [--config configs/local.yaml]

For each N (default 20000 and 100000) it writes a synthetic face index of N photos of one user
(two faces each, 128-d descriptors: three in ten near one of the sample people's reference
descriptors, the others random), in parts of 20000 rows, with the sample people (or those of
PEOPLE_DIR, each one's ``ref_img.jpg``) enrolled as the user's bank. Then, each step in a
fresh child process (its peak RSS is its own), it times:

- **lookup**: what each index-lookup worker of a caption run holds, the user's current rows
  with each content hash's row (``operators.index_lookup``);
- **cohort**: the cohort scales over the user's whole index (``operators.cohort``), what every
  caption run with cohort normalization computes in the driver before matching;
- **rematch naming**: ``pipelines.rematch.rename`` over an output of the N photos, the part of
  ``plvm rematch`` before the LLM (the cohort included).

It prints seconds, the peak RSS of the step's process (and, as the first row, that of a process
that only imported the same modules) and what the step found.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import Recorder, add_results_option, header, peak_rss  # noqa: E402
from plvm_model.store.banks import BankSource  # noqa: E402
from operators.index_lookup import known_rows  # noqa: E402
from operators.cohort import IndexCohort, cohort_scales  # noqa: E402
from pipelines.config import Config, load_config  # noqa: E402
from pipelines.rematch import rename  # noqa: E402
from plvm_model.store.banks import BankStore  # noqa: E402
from plvm_model.store.face_index import SCHEMA, FaceIndex, IndexSource  # noqa: E402
from plvm_model.faces import embedder_class  # noqa: E402

USER = "bench"
STEPS = ("imports", "lookup", "cohort", "rematch naming")


def build_index(config: Config, n: int) -> None:
    """The synthetic index of ``n`` photos of :data:`USER` (see the module)."""
    refs = np.concatenate([c.face_descriptors for c in BankStore(config.bank).load(USER).concepts])
    rng = np.random.default_rng(0)
    index, space = FaceIndex(config.index.root(config.output.uri)), embedder_class(config.embed.kind).space
    for start in range(0, n, 20000):
        count = min(n, start + 20000) - start
        near = refs[rng.integers(len(refs), size=(count, 2))] + rng.normal(0, 0.05, (count, 2, refs.shape[1]))
        far = rng.normal(0, 0.1, (count, 2, refs.shape[1]))
        vectors = np.where(rng.random((count, 2, 1)) < 0.3, near, far).astype(np.float32)
        face = {"box": [0.0, 0.0, 10.0, 10.0], "score": 0.99, "landmarks": [[1.0, 1.0]] * 5}
        rows = [{"content_hash": f"{i:064x}", "path": f"/archive/{i}.jpg", "width": 100, "height": 100,
                 "faces": [{**face, "descriptor": v} for v in vectors[i - start]], "indexed_at": datetime.now(UTC),
                 "run_id": "synthetic"} for i in range(start, start + count)]  # fmt: skip
        index.write(USER, f"synthetic-{start}", pa.Table.from_pylist(rows, SCHEMA), space)


def run_step(step: str, config: Config, n: int) -> str:
    """One step, in this (fresh) process; returns what it found."""
    space = embedder_class(config.embed.kind).space
    index = FaceIndex(config.index.root(config.output.uri))
    source = IndexSource(index.uri, None, space, {USER: tuple(index.parts(USER))})
    if step == "lookup":
        return f"{len(known_rows(source, USER).at)} photos"
    if step == "cohort":
        scales = cohort_scales(IndexCohort(source, (USER,)).faces(), config.match, BankSource(config.bank), space)
        return f"{len(scales)} scales"
    if step == "rematch naming":
        rows = pa.table({"path": [f"/archive/{i}.jpg" for i in range(n)], "user_id": [USER] * n,
                         "concepts": pa.array([[]] * n, pa.list_(pa.string())), "error": pa.nulls(n, pa.string()),
                         "error_kind": pa.nulls(n, pa.string())})  # fmt: skip
        changed, missing = rename(config, rows, [USER], {})
        return f"{changed.num_rows} photos named otherwise, {missing} not indexed"
    return "-"  # imports only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "yollava-humans"))
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    add_results_option(parser)
    args = parser.parse_args()
    if args.step:
        work = Path(args.work)
        config = load_config(args.config, bank=str(work / "banks"), output__uri=str(work / "out"))
        started = time.perf_counter()
        found = run_step(args.step, config, args.photos[0])
        print(f"{time.perf_counter() - started:.2f} {peak_rss() // 1024} {found}")
        return

    from pipelines.enroll import Enroller  # torch, which the steps do not need

    refs = sorted(Path(args.data).glob("*/ref_img.jpg"))
    record = Recorder(__file__, args.results)
    print(header("Naming from the face index at archive scale (`benchmarks/index_naming.py`)"))
    print("\n| photos | step | seconds | peak RSS, MiB | found |\n|---|---|---|---|---|")
    for n in args.photos:
        with tempfile.TemporaryDirectory() as work:
            config = load_config(args.config, bank=str(Path(work) / "banks"), output__uri=str(Path(work) / "out"))
            enroller = Enroller(config)
            for ref in refs:
                enroller.enroll(USER, ref.parent.name, [str(ref)])
            del enroller
            build_index(config, n)
            for step in STEPS:
                command = [sys.executable, __file__, "--step", step, "--work", work, "--photos", str(n),
                           "--config", args.config]  # fmt: skip
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                seconds, peak, found = out.split(maxsplit=2)
                print(f"| {n} | {step} | {float(seconds):.1f} | {int(peak) / 1024:.0f} | {found.strip()} |", flush=True)

    record.write()

if __name__ == "__main__":
    main()
