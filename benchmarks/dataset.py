"""A dataset build at archive scale: items per second, and the driver's peak memory as the archive grows.

    PYTHONPATH=. .venv/bin/python benchmarks/dataset.py [PHOTOS_DIR] [--photos 200 2000] [--sample K]
        [--config configs/local.yaml]

It captions the photos of PHOTOS_DIR (default the sample set; ``--sample K``: its first K) once, with all of its
people enrolled as one user's bank (one real caption run, on the config's models). Then for each N it makes an
archive of N photos: copies of the captioned photos in turn, each copy's bytes made distinct by a trailer after
the image data, whose output rows and face index rows are those of the photo it copies (its faces, names, caption
and answers) under the copy's path and content hash, written as a caption run writes them (the parts of a Delta
table, the run's record, the index's parts). ``plvm dataset`` (every format) then builds each archive in a fresh
child process with its own embedded Ray (started before the build's wall time), which reports the items it wrote,
its wall time and the peak resident memory of the driver process itself (its ``VmHWM``: its Ray workers are other
processes, not counted).

The driver holds the listing of the output's slices and the counts, never the rows: its peak should not grow with
the archive.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import Recorder, add_results_option, header, peak_rss  # noqa: E402
from operators.read import IMAGE_EXTENSIONS  # noqa: E402
from pipelines.config import Config, load_config  # noqa: E402
from plvm_model.faces import embedder_class  # noqa: E402
from plvm_model.store.face_index import FaceIndex, content_hash  # noqa: E402
from plvm_model.store.ids import new_run_id  # noqa: E402
from plvm_model.store.output_schema import output_schema  # noqa: E402
from plvm_model.store.output_table import OutputTable, part_name  # noqa: E402

USER = "bench"


def grow(config: Config, base: str, n: int, folder: Path, output: str) -> None:
    """An output of ``n`` photos, copies of ``base``'s photos in turn (see the module), with its index and record."""
    from benchmarks.rematch import copy_photos

    rows = OutputTable(base).read().sort_by("path")
    space = embedder_class(config.embed.kind).space
    index = FaceIndex(config.index.root(base)).read(USER, space)
    at = pc.index_in(rows.column("path"), value_set=index.column("path"))
    rows, indexed = rows.filter(pc.is_valid(at)), index.take(at.filter(pc.is_valid(at)))
    sources = [Path(p) for p in rows.column("path").to_pylist()]
    copy_photos([sources[i % len(sources)] for i in range(n)], folder, 0, n)
    copies = sorted(folder.iterdir())
    take = pa.array([i % len(sources) for i in range(n)], pa.int64())
    paths = pa.array([str(p) for p in copies], pa.string())
    hashes = pa.array([content_hash(p.read_bytes()) for p in copies], pa.string())
    run_id, out, faces = new_run_id(), OutputTable(output), FaceIndex(config.index.root(output))
    grown = rows.take(take).set_column(0, "path", paths)
    out.fs.makedirs(out.root, exist_ok=True)
    for start in range(0, n, config.output.rows_per_file):
        part = grown.slice(start, config.output.rows_per_file)
        pq.write_table(part.cast(output_schema()), f"{out.root}/{part_name(run_id, f'{start:08d}')}")
        index_part = indexed.take(take.slice(start, part.num_rows))
        index_part = index_part.set_column(0, "content_hash", hashes.slice(start, part.num_rows))
        index_part = index_part.set_column(1, "path", paths.slice(start, part.num_rows))
        faces.write(USER, f"{run_id}-{start:08d}", index_part, space)
    out.prepare(output_schema())
    out.record(run_id, {"run_id": run_id, "status": "ok", "banks": {USER: base_banks(base)}})


def base_banks(base: str) -> int:
    """The version of the bench user's bank that the base run read."""
    records = sorted((Path(base) / "_runs").glob("*.json"))
    return json.loads(records[-1].read_text())["banks"][USER]


def child(config_file: str, output: str, out: str) -> None:
    """Build the dataset in this process (its Ray started first, outside the build's wall time, as a service's would
    be); print its summary with the driver's peak resident memory. It imports only what ``plvm dataset`` does."""
    from dataclasses import asdict

    from pipelines.dataset import build_dataset
    from pipelines.runner.runtime import init_ray

    config = load_config(config_file)
    init_ray(config.ray)
    summary = build_dataset(config, output, out)
    print(json.dumps({**asdict(summary), "peak_rss": peak_rss()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="?", default=str(REPO.parent / "shared" / "data" / "yollava-humans"))
    parser.add_argument("--photos", dest="sizes", type=int, nargs="+", default=[200, 2000],
                        help="archive sizes (default 200 2000)")  # fmt: skip
    parser.add_argument("--sample", type=int, help="caption only the first K photos of PHOTOS_DIR")
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "OUTPUT", "OUT"), help=argparse.SUPPRESS)
    add_results_option(parser)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    from pipelines.caption import caption  # the parent's: the child, the measured driver, does without them
    from pipelines.enroll import enroll

    files = sorted(p for p in Path(args.photos).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    refs = [f for f in files if f.stem == "ref_img"]
    photos = [f for f in files if f.stem != "ref_img"][: args.sample]
    if not refs or not photos:
        raise SystemExit(f"{args.photos} needs people's folders with ref_img.* and photos")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = work / "photos.csv"
        manifest.write_text("path,user_id\n" + "".join(f"{p},{USER}\n" for p in photos))
        config = load_config(args.config, bank=str(work / "banks"), input__uri=str(manifest),
                             input__allowed=[args.photos], output__uri=str(work / "base"),
                             ray__progress="off")  # fmt: skip
        for ref in refs:
            enroll(config, USER, ref.parent.name, [str(ref)])
        caption(config)
        config_file = work / "config.yaml"
        config_file.write_text(json.dumps(config.model_dump(mode="json")))  # YAML reads JSON

        record = Recorder(__file__, args.results)
        print(header("A dataset build (`benchmarks/dataset.py`)"))
        print(f"- command: `{' '.join(['benchmarks/dataset.py', *sys.argv[1:]])}`")
        print(f"- archives of copies of {len(photos)} captioned photos under {args.photos} ({len(refs)} people "
              f"enrolled), each copy with its own bytes; every format; {datetime.now(UTC):%H:%M} UTC start\n",
              flush=True)  # fmt: skip
        results = []
        for n in args.sizes:
            grow(config, str(work / "base"), n, work / f"photos-{n}", str(work / f"out-{n}"))
            done = subprocess.run([sys.executable, __file__, "--child", str(config_file), str(work / f"out-{n}"),
                                   str(work / f"dataset-{n}")], capture_output=True, text=True, check=False)  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"the build of {n} photos failed:\n{done.stderr[-3000:]}")
            results.append((n, json.loads(done.stdout.strip().splitlines()[-1])))

    print("| photos | items | shards | wall s | items/s | driver peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for n, summary in results:
        items = sum(sum(kinds.values()) for kinds in summary["items"].values())
        print(f"| {n} | {items} | {summary['shards']} | {summary['wall_s']:.1f} | {summary['items_per_s']:.1f} | "
              f"{summary['peak_rss'] / 2**20:.0f} |")
    (small, first), (large, last) = results[0], results[-1]
    print(f"\n- driver peak RSS at {large} photos / at {small}: **{last['peak_rss'] / first['peak_rss']:.2f}x** "
          f"for {large / small:.0f}x the photos; items/s at {large} / at {small}: "
          f"{last['items_per_s'] / first['items_per_s']:.2f}x (the build's wall time: its Ray was started before)")
    record.write()


if __name__ == "__main__":
    main()
