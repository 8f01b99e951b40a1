"""The caption pipeline: photos in, one Parquet row per photo out.

The pipeline is the list in :func:`caption_stages`, applied by one loop
(``pipelines.stages.apply``). The model-free stages run as tasks; detect, embed and
generate run in actor pools, each actor loading its model once. Each photo is read once;
a photo whose bytes the user's face index holds takes its faces from there (no decode,
detection or embedding), the others are decoded, detected and aligned in one call of the
detect actor (their pixels never enter the object store: the embed actors get each face's
chips), embedded, and their faces committed to the index. With cohort-normalised matching
(the default) the cohort barrier waits for every face of the run before any is matched, and
measures the scales over the user's whole index; the photos' bytes cross it and are decoded
for the LLM after matching (a photo that was detected is decoded twice, see the README). The
evaluation, VQA and benchmark paths take named prefixes of the same list (:func:`face_stages`,
:func:`naming_stages`), without the index.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from operators import align, decode, detect, embed, generate, index_lookup, indexing, match, prompt, read, write
from operators.banks import BankSource, BankVersions
from plvm_model.store.ids import new_run_id
from plvm_model.store.output_table import OutputTable, Staged, keys
from operators.read import list_inputs
from plvm_model.store.output_schema import RETRYABLE, output_schema
from pipelines import cohort, preflight
from pipelines.archive import Archive, compact_grown, open_archive
from pipelines.config import Config, ModelPaths, RayConfig
from pipelines.runtime import init_ray
from pipelines.stages import StageFailed, Step, apply, cause_of, joined
from plvm_model.store.banks import BankStore
from plvm_model.concept_token import check_servable
from plvm_model.store.errors import BankError, ConfigError, OutputExists, RowCountMismatch, RunFailed
from plvm_model.faces import embedder_class
from plvm_model.store.lease import Lease

log = logging.getLogger(__name__)


def face_stages(config: Config) -> list[Step]:
    """read -> decode -> detect -> align -> embed: every face of every photo, with its descriptor."""
    tasks = config.tasks
    return [
        read.stage(config.read, config.storage, tasks),
        *joined(decode.stage(config.decode, tasks), detect.stage(config.detect), align.stage(config.embed, tasks)),
        embed.stage(config.embed),
    ]


def naming_stages(config: Config, banks: BankVersions | None = None) -> list[Step]:
    """The face stages, the cohort barrier (with cohort normalization) and the match stage: faces named
    (against the users' banks at the versions ``banks`` pins, the newest for other users)."""
    space = embedder_class(config.embed.kind).space
    source = BankSource(config.bank, config.storage, banks or {})
    barrier = [cohort.barrier(config.match, source, space)]
    return [
        *face_stages(config),
        *(barrier if config.match.normalization == "cohort" else []),
        match.stage(config.match, source, space, config.tasks),
    ]


def caption_stages(
    config: Config, models: ModelPaths, run_id: str, parts: int, archive: Archive, banks: BankVersions | None = None
) -> list[Step]:
    """The whole caption pipeline, in order; ``parts`` is how many output files the run writes, ``archive`` the
    face index it looks photos up in and adds to, ``banks`` the versions of the users' banks it reads."""
    tasks = config.tasks
    space = embedder_class(config.embed.kind).space
    source = BankSource(config.bank, config.storage, banks or {})
    barrier = [cohort.barrier(config.match, source, space, archive.cohort)]
    return [
        read.stage(config.read, config.storage, tasks),
        index_lookup.stage(archive.source, tasks),
        *joined(
            decode.stage(config.decode, tasks, for_faces=True),
            detect.stage(config.detect),
            align.stage(config.embed, tasks),
        ),
        embed.stage(config.embed),
        indexing.stage(archive.source, config.output.uri, run_id, tasks),
        *(barrier if config.match.normalization == "cohort" else []),
        match.stage(config.match, source, space, tasks),
        *answering_stages(config, models, run_id, parts, source),
    ]


def answering_stages(config: Config, models: ModelPaths, run_id: str, parts: int, banks: BankSource) -> list[Step]:
    """After the faces are named: prompt -> decode -> generate -> write (the caption run's last stages, and
    what a rematch sends the photos whose names changed through)."""
    tasks = config.tasks
    return [
        prompt.stage(config.prompt, banks, models.aligner_identity, tasks),
        decode.stage(config.decode, tasks),  # the photos the barrier (or the index) left without pixels
        generate.stage(config.generate, models.llava),
        write.stage(config.output, run_id, config.storage, tasks, parts),
    ]


def dataset(config: Config, listing: pa.Table, stages: Callable[[Config], list[Step]]):
    """The Ray dataset of ``listing``'s photos through ``stages(config)`` (Ray started or joined first)."""
    import ray.data

    init_ray(config.ray)
    size = config.tasks.batch_size
    blocks = [listing.slice(i, size) for i in range(0, max(listing.num_rows, 1), size)]
    # no more tasks at once than blocks: a small run starts no idle workers (and Ray does not warn)
    tasks = config.tasks.model_copy(update={"concurrency": min(config.tasks.concurrency, len(blocks))})
    config = config.model_copy(update={"tasks": tasks})
    steps = stages(config)
    preflight.check_resources(steps)
    # from_blocks: the metadata is computed here, with no Ray task (from_arrow runs one per block, and Ray then
    # warns that no CPU is free before it counts them free again)
    return apply(ray.data.from_blocks(blocks), steps, config.run.max_failed_fraction > 0, config.run.retries)


@dataclass
class RunSummary:
    run_id: str
    photos: int
    """Photos processed by this run."""
    rows: int
    """Rows this run wrote."""
    skipped: int = 0
    """Listed photos already written by earlier runs (``--resume``)."""
    retried: int = 0
    """Rows of earlier runs removed to be written again (``--retry-errors``)."""
    missing: int = 0
    duplicates: int = 0
    indexed: int = 0
    """Photos this run added to the face index: detected and embedded (or known bytes seen under a new path)."""
    deleted: int = 0
    """Indexed photos deleted from the archive since (not listed, no longer there): not missing output."""
    deleted_paths: list[str] = field(default_factory=list)
    """The first of them."""
    index_dropped: list[str] = field(default_factory=list)
    """Damaged face index parts removed by ``--rebuild-index`` (their photos detected again)."""
    index_compacted: dict[str, list[int]] = field(default_factory=dict)
    """Users whose index parts the run compacted at its end (``index.compact_parts``): [parts before, after]."""
    faces: int = 0
    matched: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    """Rows whose error is a failure of the system (retryable), counted against ``run.max_failed_fraction``."""
    wall_s: float = 0.0
    photos_per_s: float = 0.0
    output: list[str] = field(default_factory=list)
    banks: BankVersions = field(default_factory=dict)
    """The version of each user's bank the run read, pinned at its start (0: the user had none)."""
    status: str = "ok"
    """``ok``, or ``failed`` with the reason in ``failure``."""
    failure: str | None = None

    def lines(self) -> list[str]:
        """The summary as printed at the end of a run."""
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"
        skipped = f" ({self.skipped} written before, skipped)" if self.skipped else ""
        retried = f" ({self.retried} retried)" if self.retried else ""
        return [
            f"run {self.run_id}: {self.photos} photos -> {self.rows} rows{skipped}{retried}",
            f"faces {self.faces}, named {self.matched}, errors {sum(self.errors.values())} ({errors})",
            f"face index: {self.indexed} photos added, the others' faces reused; {self.deleted} indexed photos "
            f"deleted from the archive"
            + (f" ({', '.join(self.deleted_paths)}{', ...' if self.deleted > 5 else ''})" if self.deleted else ""),
            *(f"face index: dropped damaged part {part}" for part in self.index_dropped),
            *(
                f"face index: compacted user {user}'s {n} parts into {m}"
                for user, (n, m) in self.index_compacted.items()
            ),
            f"wall {self.wall_s:.1f} s, {self.photos_per_s:.2f} photos/s",
        ]


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


def check_banks(users: list[str], config: Config) -> BankVersions:
    """The newest version of each of ``users``' banks, pinned for the run (0: no bank); refuse to start
    (:class:`BankError` naming the file, and the concept) if one cannot be read, has descriptors of another
    length than the run's face embedder makes, holds a PLVM concept the configured concept style cannot serve, or
    a MyVLM concept trained for another LLaVA than the run's engine serves."""
    store, embedder = BankStore(config.bank, config.storage), embedder_class(config.embed.kind)
    pinned = {}
    llava: str | None = None
    for user in sorted(set(users)):
        bank = store.load(user)
        if bank is not None and bank.embedder == embedder.space:  # a bank of another space is each row's error
            bank.check_descriptor_size(embedder.dim, embedder.space)
        if bank is not None and any(c.method == "myvlm" for c in bank.concepts):
            if llava is None:
                from plvm_model.myvlm import llava_identity

                llava = llava_identity(config.model_paths().llava)
            bank.check_servable(llava)
        if bank is not None and config.generate.concept_style == "plvm":
            for concept in (c for c in bank.concepts if c.method == "plvm"):  # MyVLM's is served in either style
                try:
                    check_servable(concept.tokens(), concept.soft_tokens.shape[-1])
                except ValueError as error:
                    raise BankError(f"user {user!r}, {bank.location}: {error}") from None
        pinned[user] = bank.version if bank is not None else 0
    return pinned


def run_failure(error: BaseException) -> RunFailed | None:
    """The run's failure behind an exception that Ray raised in the driver, as a :class:`RunFailed`."""
    import ray.exceptions

    found = cause_of(error, StageFailed, RunFailed)
    if isinstance(found, StageFailed):
        retried = f"{found}\n(failed after its retries; fix the cause, then run again with --resume)"
        found = found.fatal or RunFailed(retried)
    if found is not None:
        return found
    died = cause_of(error, ray.exceptions.RayActorError)
    if died is not None:
        actor = re.search(r"MapBatches\((\w+)\)", str(died))
        who = f"the {actor[1]} actor" if actor else "an actor of the run"
        return RunFailed(f"{who} died and is not restarted, so the run stops: {died}\n(run again with --resume)")
    return None


def _over_budget(summary: RunSummary, table: pa.Table, budget: float) -> RunFailed | None:
    """A :class:`RunFailed` when this run's system failures are more than ``budget`` of its photos."""
    if summary.failed <= budget * summary.photos:
        return None
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(summary.errors.items()) if k in RETRYABLE)
    first = next(e for e, k in zip(table.column("error").to_pylist(), table.column("error_kind").to_pylist())
                 if k in RETRYABLE)  # fmt: skip
    return RunFailed(
        f"run {summary.run_id} failed: {summary.failed} of {summary.photos} photos failed in the system ({kinds}), "
        f"over run.max_failed_fraction={budget}; the first: {first}\n(the rows are written with their errors: "
        "fix the cause, then run again with --retry-errors)"
    )


def caption(
    config: Config,
    resume: bool = False,
    overwrite: bool = False,
    retry_errors: bool = False,
    stages: Callable[..., list[Step]] = caption_stages,
    rebuild_index: bool = False,
) -> RunSummary:
    """Run the caption pipeline of ``config``; the summary is also written beside the output.

    With ``resume``, photos that earlier runs into the same output already wrote are skipped;
    with ``retry_errors``, so are they, but the rows whose error is retryable are written
    again; with ``overwrite``, earlier runs' output is removed first. Without any, an output
    that already holds rows is refused, so that no photo is ever written twice. A failure of
    the system past ``run.max_failed_fraction`` raises :class:`RunFailed` (after recording
    the run). ``stages`` builds the pipeline (the arguments of :func:`caption_stages`). A damaged part
    of the face index stops the run before any work (:class:`IndexCorrupt`) unless ``rebuild_index``
    drops it (its photos are detected again).

    The run holds the output's lease from before it looks at the output to its end, so a
    second run into the same output is refused (:class:`OutputLocked`) instead of writing
    every photo again beside this one; a run whose lease another process took over stops
    (:class:`LeaseLost`).
    """
    if not config.output.uri:
        raise ConfigError("no output given: set output.uri in the config or pass --output")
    preflight.check_output(config.output.uri, config.storage)
    run_id = new_run_id()
    output = OutputTable(config.output.uri, config.storage)
    with output.lease(run_id, "caption", config.output.lease_expiry_s) as lease:
        return _caption(config, output, run_id, lease, resume, overwrite, retry_errors, stages, rebuild_index)


def _caption(config: Config, output: OutputTable, run_id: str, lease: Lease, resume: bool, overwrite: bool,
             retry_errors: bool, stages: Callable[..., list[Step]], rebuild_index: bool) -> RunSummary:  # fmt: skip
    """:func:`caption`, with the output's lease held."""
    started = time.monotonic()
    listing = list_inputs(config.input, config.storage, output=config.output.uri)
    listing = listing.append_column("index", pa.array(range(listing.num_rows), pa.int64()))
    users = listing.filter(listing.column("error").is_null()).column("user_id").to_pylist()
    archive = open_archive(config, listing, users, rebuild_index)  # a damaged part stops the run here, before all
    written = output.read(["path", "user_id", "error_kind"])
    done = Counter() if overwrite else keys(written)
    if done and not (resume or retry_errors):
        raise OutputExists(
            f"{config.output.uri} already holds {sum(done.values())} rows from earlier runs: pass --resume to "
            "write only the photos not written yet, --retry-errors to also write again the rows that failed in "
            "the system, or --overwrite to start again"
        )
    if retry_errors:
        done -= keys(written.filter(pc.is_in(written.column("error_kind"), value_set=pa.array(RETRYABLE))))
    todo = remaining(listing, done)
    valid = todo.filter(todo.column("error").is_null())
    banks = check_banks(valid.column("user_id").to_pylist(), config)
    # the output changes only from here, once the run is known to start
    for stale in output.discard_staging():
        log.warning("removed %s, left by a run that did not finish", stale)
    output.open(output_schema(config.output.face_embeddings), overwrite=overwrite)
    for stale in output.vacuum():
        log.warning("removed %s, a part that a run which did not finish never committed", stale)
    retried = output.drop_retryable(run_id) if retry_errors else 0
    models = config.model_paths()
    committed: list[str] = []
    failure: RunFailed | None = None
    if todo.num_rows:
        progress = Progress(todo.num_rows, config.ray)
        n_parts = max(1, -(-todo.num_rows // config.output.rows_per_file))
        pipeline = partial(stages, models=models, run_id=run_id, parts=n_parts, archive=archive, banks=banks)
        try:
            for part in dataset(config, todo, pipeline).iter_rows():
                lease.check()
                committed.extend(output.commit([Staged(**part)], run_id))
                progress.update(part["rows"])
        except Exception as error:
            failure = run_failure(error)
            if failure is None:
                raise
    table = output.read(["faces", "concepts", "error", "error_kind"], run_id=run_id)
    counts = summarize(table)
    wall = time.monotonic() - started
    listed, written = keys(listing), keys(output.read(["path", "user_id"]))
    errors = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("error:")}
    summary = RunSummary(
        run_id=run_id,
        photos=todo.num_rows,
        rows=counts["rows"],
        skipped=listing.num_rows - todo.num_rows,
        retried=retried,
        missing=sum((listed - written).values()),
        duplicates=sum(max(0, written[k] - n) for k, n in listed.items()),
        indexed=sum(archive.source.open().rows_of_run(user, run_id) for user in archive.source.pinned),
        deleted=len(archive.deleted),
        deleted_paths=archive.deleted[:5],
        index_dropped=archive.dropped,
        faces=counts["faces"],
        matched=counts["matched"],
        errors=errors,
        failed=sum(n for k, n in errors.items() if k in RETRYABLE),
        wall_s=wall,
        photos_per_s=todo.num_rows / wall if wall else 0.0,
        output=sorted(committed),
        banks=banks,
    )
    lease.check()
    failure = failure or _over_budget(summary, table, config.run.max_failed_fraction)
    if failure is not None:
        summary.status, summary.failure = "failed", str(failure)
    else:
        done = [c for c in compact_grown(archive, config.index.compact_parts) if c.parts_before != c.parts_after]
        summary.index_compacted = {c.user_id: [c.parts_before, c.parts_after] for c in done}
    output.record(run_id, asdict(summary))
    if failure is not None:
        raise failure
    if summary.rows != summary.photos or summary.missing or summary.duplicates:
        raise RowCountMismatch(
            f"run {run_id} wrote {summary.rows} rows for {summary.photos} photos; the output holds "
            f"{summary.missing} fewer and {summary.duplicates} more rows than the {listing.num_rows} listed photos"
            + (f" (plvm repair {config.output.uri} keeps one row per photo)" if summary.duplicates else "")
        )
    return summary
