"""The caption pipeline: photos in, one Parquet row per photo out.

read -> decode -> detect -> embed -> match -> prompt -> generate -> write, as Ray Data
stages. The model-free stages run as tasks; detect, embed and generate run in actor
pools, each actor loading its model once. With cohort-normalised matching (the default)
the faces of the whole run are embedded first, the users' concept scales measured on
them, and the photos decoded again for the LLM after matching.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Literal

import pyarrow as pa

from operators.base import Resources
from operators.decode import Decode
from operators.detect import DetectFaces
from operators.embed import EmbedFaces
from operators.generate import Generate
from operators.match import MatchFaces, check_banks, cohort_scales
from operators.prompt import ChooseConcepts
from operators.read import ReadBytes, list_inputs
from operators.write import OutputExists, OutputFolder, WriteParts, keys
from pipelines.config import Config, ModelPaths, RayConfig
from pipelines.runtime import init_ray
from plvm_model.faces import embedder_class

log = logging.getLogger(__name__)

Stop = Literal["embed", "match", "write"]


class RowCountMismatch(RuntimeError):
    pass


@dataclass
class RunSummary:
    run_id: str
    photos: int
    """Photos processed by this run."""
    rows: int
    """Rows this run wrote."""
    skipped: int = 0
    """Listed photos already written by earlier runs (``--resume``)."""
    missing: int = 0
    duplicates: int = 0
    faces: int = 0
    matched: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    photos_per_s: float = 0.0
    output: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The summary as printed at the end of a run."""
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"
        skipped = f" ({self.skipped} written before, skipped)" if self.skipped else ""
        return [
            f"run {self.run_id}: {self.photos} photos -> {self.rows} rows{skipped}",
            f"faces {self.faces}, named {self.matched}, errors {sum(self.errors.values())} ({errors})",
            f"wall {self.wall_s:.1f} s, {self.photos_per_s:.2f} photos/s",
        ]


def _blocks(listing: pa.Table, size: int) -> list[pa.Table]:
    return [listing.slice(i, size) for i in range(0, max(listing.num_rows, 1), size)]


def _tasks(ds, fn, resources: Resources):
    """A model-free stage: at most ``resources.concurrency`` tasks at once (each worker started costs seconds of CPU)."""
    import ray.data

    return ds.map_batches(
        fn,
        compute=ray.data.TaskPoolStrategy(size=resources.concurrency),
        batch_format="pyarrow",
        batch_size=resources.batch_size,
        num_cpus=resources.num_cpus,
        udf_modifying_row_count=False,
    )


def _actors(ds, cls, args: tuple, resources: Resources, **ray_args):
    import ray.data

    return ds.map_batches(
        cls,
        fn_constructor_args=args,
        compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
        batch_format="pyarrow",
        batch_size=resources.batch_size,
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus or None,
        udf_modifying_row_count=False,
        **ray_args,
    )


def build(config: Config, listing: pa.Table, models: ModelPaths | None, stop: Stop = "write", run_id: str = ""):
    """The Ray dataset of ``listing``'s photos through the stages up to ``stop`` (inclusive).

    Through ``write`` the dataset's rows are the committed parts (file, rows), and
    ``listing`` needs its ``index`` column (the photos' positions in the whole input).
    """
    import ray.data

    storage_options = config.storage
    embedder_space = embedder_class(config.embed.kind).space
    blocks = _blocks(listing, config.tasks.batch_size)
    # no more tasks at once than blocks: a small run starts no idle workers (and Ray does not warn)
    tasks = config.tasks.model_copy(update={"concurrency": min(config.tasks.concurrency, len(blocks))})
    ds = ray.data.from_arrow(blocks)
    ds = _tasks(ds, ReadBytes(config.read, storage_options), tasks)
    ds = _tasks(ds, Decode(config.decode), tasks)
    ds = _actors(ds, DetectFaces, (config.detect,), config.detect.resources)
    ds = _actors(ds, EmbedFaces, (config.embed,), config.embed.resources)
    if stop == "embed":
        return ds
    cohort = config.match.normalization == "cohort"
    scales = None
    if cohort:
        # The barrier: every face of a user is embedded before any is matched. The pixels are
        # dropped here (the faces are kept, small) and decoded again for the LLM below.
        ds = ds.drop_columns(["pixels"]).materialize()
        scales = cohort_scales(ds, config.match, config.bank, storage_options, embedder_space)
    ds = _tasks(ds, MatchFaces(config.match, config.bank, storage_options, embedder_space, scales), tasks)
    if stop == "match":
        return ds
    assert models is not None
    ds = _tasks(ds, ChooseConcepts(config.prompt, config.bank, storage_options, models.aligner_identity), tasks)
    if cohort:
        ds = _tasks(ds, ReadBytes(config.read, storage_options), tasks)
        ds = _tasks(ds, Decode(config.decode), tasks)
    runtime_env = config.generate.runtime_env()
    ds = _actors(
        ds, Generate, (config.generate, models.llava), config.generate.resources,
        **({"runtime_env": runtime_env} if runtime_env else {}),
    )  # fmt: skip
    write = WriteParts(config.output.uri, run_id, storage_options, config.output.face_embeddings)
    parts = max(1, -(-listing.num_rows // config.output.rows_per_file))
    return ds.map_batches(  # one row per part written: not a _tasks stage, which keeps row counts
        write,
        compute=ray.data.TaskPoolStrategy(size=min(tasks.concurrency, parts)),
        batch_format="pyarrow",
        batch_size=config.output.rows_per_file,
        num_cpus=tasks.num_cpus,
    )


class Progress:
    """Periodic progress lines on stderr (photos written, rate, time left) for non-interactive runs."""

    def __init__(self, total: int, config: RayConfig) -> None:
        interactive = sys.stderr.isatty()
        self.enabled = config.progress == "lines" or (config.progress == "auto" and not interactive)
        self.total, self.interval = total, config.progress_interval_s
        self.done = 0
        self.started = self.last = time.monotonic()

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            left = (self.total - self.done) / rate if rate else float("inf")
            print(f"progress: {self.done}/{self.total} photos written ({100 * self.done / max(self.total, 1):.0f}%), "
                  f"{rate:.2f} photos/s, about {left:.0f} s left", file=sys.stderr, flush=True)  # fmt: skip


def summarize(table: pa.Table) -> Counter:
    """Rows, faces, named faces and errors by kind of a table of output rows."""
    counts: Counter = Counter(rows=table.num_rows)
    for faces, concepts, kind in zip(*(table.column(c).to_pylist() for c in ("faces", "concepts", "error_kind"))):
        counts["faces"] += len(faces or [])
        counts["matched"] += len(concepts or [])
        if kind:
            counts[f"error:{kind}"] += 1
    return counts


def remaining(listing: pa.Table, done: Counter) -> pa.Table:
    """The listing without the photos already written (each occurrence of a listed photo once)."""
    left = Counter(done)
    keep = []
    for key in zip(listing.column("path").to_pylist(), listing.column("user_id").to_pylist()):
        keep.append(left[key] <= 0)
        left[key] -= 1
    return listing.filter(pa.array(keep, pa.bool_()))


def caption(config: Config, resume: bool = False, overwrite: bool = False) -> RunSummary:
    """Run the caption pipeline of ``config``; the summary is also written beside the output.

    With ``resume``, photos that earlier runs into the same output already wrote are skipped;
    with ``overwrite``, earlier runs' output is removed first. Without either, an output
    that already holds rows is refused, so that no photo is ever written twice.
    """
    if not config.output.uri:
        raise ValueError("no output given: set output.uri in the config or pass --output")
    started = time.monotonic()
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    output = OutputFolder(config.output.uri, config.storage)
    listing = list_inputs(config.input, config.storage)
    listing = listing.append_column("index", pa.array(range(listing.num_rows), pa.int64()))
    done = keys(output.read(["path", "user_id"]))
    if overwrite:
        output.clear()
        done = Counter()
    elif done and not resume:
        raise OutputExists(
            f"{config.output.uri} already holds {sum(done.values())} rows from earlier runs: pass --resume to "
            "write only the photos not written yet, or --overwrite to start again"
        )
    for stale in output.discard_staging():
        log.warning("removed %s, left by a run that did not finish", stale)
    todo = remaining(listing, done)
    valid = todo.filter(todo.column("error").is_null())
    check_banks(valid.column("user_id").to_pylist(), config.bank, config.storage)
    models = config.model_paths()
    parts: list[dict] = []
    if todo.num_rows:
        init_ray(config.ray)
        progress = Progress(todo.num_rows, config.ray)
        for part in build(config, todo, models, run_id=run_id).iter_rows():
            parts.append(part)
            progress.update(part["rows"])
    counts = summarize(output.read(["faces", "concepts", "error_kind"], run_id=run_id))
    wall = time.monotonic() - started
    listed, written = keys(listing), keys(output.read(["path", "user_id"]))
    summary = RunSummary(
        run_id=run_id,
        photos=todo.num_rows,
        rows=counts["rows"],
        skipped=listing.num_rows - todo.num_rows,
        missing=sum((listed - written).values()),
        duplicates=sum(max(0, written[k] - n) for k, n in listed.items()),
        faces=counts["faces"],
        matched=counts["matched"],
        errors={k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("error:")},
        wall_s=wall,
        photos_per_s=todo.num_rows / wall if wall else 0.0,
        output=sorted(p["file"] for p in parts),
    )
    output.record(run_id, asdict(summary))
    if summary.rows != summary.photos or summary.missing or summary.duplicates:
        raise RowCountMismatch(
            f"run {run_id} wrote {summary.rows} rows for {summary.photos} photos; the output holds "
            f"{summary.missing} fewer and {summary.duplicates} more rows than the {listing.num_rows} listed photos"
        )
    return summary
