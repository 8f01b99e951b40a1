"""The caption pipeline: photos in, one Parquet row per photo out.

read -> decode -> detect -> embed -> match -> prompt -> generate -> write, as Ray Data
stages. The model-free stages run as tasks; detect, embed and generate run in actor
pools, each actor loading its model once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from operators.base import Resources
from operators.decode import Decode
from operators.detect import DetectFaces
from operators.embed import EmbedFaces
from operators.generate import Generate
from operators.match import MatchFaces, check_banks
from operators.prompt import ChooseConcepts
from operators.read import ReadBytes, list_inputs
from operators.write import OutputWriter, ToOutput
from pipelines.config import Config, ModelPaths
from pipelines.runtime import init_ray
from plvm_model.faces import make_embedder

log = logging.getLogger(__name__)

Stop = Literal["embed", "match", "write"]


class RowCountMismatch(RuntimeError):
    pass


@dataclass
class RunSummary:
    run_id: str
    photos: int
    rows: int
    faces: int = 0
    matched: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    photos_per_s: float = 0.0
    output: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"
        return [
            f"run {self.run_id}: {self.photos} photos -> {self.rows} rows",
            f"faces {self.faces}, named {self.matched}, errors {sum(self.errors.values())} ({errors})",
            f"wall {self.wall_s:.1f} s, {self.photos_per_s:.2f} photos/s",
        ]


def _blocks(listing: pa.Table, size: int) -> list[pa.Table]:
    return [listing.slice(i, size) for i in range(0, max(listing.num_rows, 1), size)]


def _tasks(ds, fn, resources: Resources):
    return ds.map_batches(
        fn,
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


def build(config: Config, listing: pa.Table, models: ModelPaths | None, stop: Stop = "write"):
    """The Ray dataset of ``listing``'s photos through the stages up to ``stop`` (inclusive)."""
    import ray.data

    storage_options = config.storage
    embedder_space = make_embedder(config.embed.kind, **config.embed.options).space
    ds = ray.data.from_arrow(_blocks(listing, config.tasks.batch_size))
    ds = _tasks(ds, ReadBytes(config.read, storage_options), config.tasks)
    ds = _tasks(ds, Decode(config.decode), config.tasks)
    ds = _actors(ds, DetectFaces, (config.detect,), config.detect.resources)
    ds = _actors(ds, EmbedFaces, (config.embed,), config.embed.resources)
    if stop == "embed":
        return ds
    ds = _tasks(ds, MatchFaces(config.match, config.bank, storage_options, embedder_space), config.tasks)
    if stop == "match":
        return ds
    assert models is not None
    ds = _tasks(ds, ChooseConcepts(config.prompt, config.bank, storage_options, models.aligner_identity), config.tasks)
    ds = _actors(ds, Generate, (config.generate, models.llava), config.generate.resources)
    return _tasks(ds, ToOutput(config.output.face_embeddings), config.tasks)


def summarize(writer: OutputWriter, files: list[str]) -> Counter:
    counts: Counter = Counter()
    for path in files:
        table = pq.read_table(writer.fs.open(path, "rb"), columns=["faces", "concepts", "error_kind"])
        counts["rows"] += table.num_rows
        for faces, concepts, kind in zip(*(table.column(c).to_pylist() for c in ("faces", "concepts", "error_kind"))):
            counts["faces"] += len(faces or [])
            counts["matched"] += len(concepts or [])
            if kind:
                counts[f"error:{kind}"] += 1
    return counts


def caption(config: Config) -> RunSummary:
    """Run the caption pipeline of ``config`` and commit its output; the summary is written beside it."""
    if not config.output.uri:
        raise ValueError("no output given: set output.uri in the config or pass --output")
    started = time.monotonic()
    listing = list_inputs(config.input, config.storage)
    valid = listing.filter(listing.column("error").is_null())
    check_banks(valid.column("user_id").to_pylist(), config.bank, config.storage)
    models = config.model_paths()
    init_ray(config.ray)
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    writer = OutputWriter(config.output.uri, run_id, config.storage)
    filesystem, staging = writer.staging_target()
    build(config, listing, models).write_parquet(
        staging, filesystem=filesystem, min_rows_per_file=config.output.min_rows_per_file
    )
    counts = summarize(writer, writer.staged_files())
    wall = time.monotonic() - started
    summary = RunSummary(
        run_id=run_id,
        photos=listing.num_rows,
        rows=counts["rows"],
        faces=counts["faces"],
        matched=counts["matched"],
        errors={k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("error:")},
        wall_s=wall,
        photos_per_s=listing.num_rows / wall if wall else 0.0,
    )
    if summary.rows != summary.photos:
        raise RowCountMismatch(
            f"run {run_id} wrote {summary.rows} rows for {summary.photos} photos; "
            f"nothing was committed (staged files left under {writer.staging})"
        )
    summary.output = writer.commit(asdict(summary)).files
    return summary
