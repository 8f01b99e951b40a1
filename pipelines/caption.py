"""``plvm caption``: photos in, one row per photo out, in the output's Delta table, exactly once.

The pipeline is ``pipelines.stage_lists.caption_stages``, applied by the runner. A run holds the
output's lease from before it looks at the output to its end, so a second run into the same
output is refused (:class:`OutputLocked`) instead of writing every photo again beside this one,
and a run whose lease another process took over stops (:class:`LeaseLost`). It lists its photos,
leaves out those the output holds already (``--resume``; ``--retry-errors`` first removes the rows
whose error is retryable; ``--overwrite`` starts a new version without rows), pins the users' banks
and face index, and commits each part of rows as it arrives. Its summary adds up the counters
that came with the parts it committed (``operators.rows.STATS``), and it ends by checking that the
output holds each listed photo exactly once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from operators.base import Step
from operators.read import list_inputs
from pipelines import stage_lists
from pipelines.config import Config
from pipelines.pinned import PinnedIndex, pin_banks, pin_index
from pipelines.runner import metrics, preflight
from pipelines.runner.counters import by_stage, stage_lines, totals
from pipelines.runner.execute import execute
from pipelines.runner.failures import results
from pipelines.runner.progress import Progress
from plvm_model.random_weights import mode_line
from plvm_model.store import storage
from plvm_model.store.banks import BankVersions
from plvm_model.store.errors import ConfigError, OutputExists, RowCountMismatch, RunFailed
from plvm_model.store.ids import new_run_id
from plvm_model.store.lease import Lease
from plvm_model.store.output_schema import RETRYABLE, output_schema
from plvm_model.store.output_table import OutputTable, Staged, keys

log = logging.getLogger(__name__)


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
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each stage's counters over the rows the run committed: ``rows``, ``seconds`` (in its workers), ``errors.<kind>``
    (the row errors it gave) and its own (``detect``: ``faces``; ``index_lookup``: ``known``; ``match``: ``named``...)."""
    status: str = "ok"
    """``ok``, or ``failed`` with the reason in ``failure``."""
    failure: str | None = None
    started: str = ""
    """When the run started and ended (UTC, ISO 8601)."""
    ended: str = ""
    random_weights: bool = False
    """The run's models had random weights (``models.random_weights``): its captions are noise."""

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
            *stage_lines(self.stages),
            f"wall {self.wall_s:.1f} s, {self.photos_per_s:.2f} photos/s",
            mode_line(self.random_weights),
        ]


def remaining(listing: pa.Table, done: Counter) -> pa.Table:
    """The listing without the photos already written (each occurrence of a listed photo once)."""
    left = Counter(done)
    keep = []
    for key in zip(listing.column("path").to_pylist(), listing.column("user_id").to_pylist()):
        keep.append(left[key] <= 0)
        left[key] -= 1
    return listing.filter(pa.array(keep, pa.bool_()))


def caption(
    config: Config,
    resume: bool = False,
    overwrite: bool = False,
    retry_errors: bool = False,
    stages: Callable[..., list[Step]] = stage_lists.caption_stages,
    rebuild_index: bool = False,
) -> RunSummary:
    """Run the caption pipeline of ``config``; the summary is also written beside the output.

    With ``resume``, photos that earlier runs into the same output already wrote are skipped;
    with ``retry_errors``, so are they, but the rows whose error is retryable are written
    again; with ``overwrite``, earlier runs' output is removed first. Without any, an output
    that already holds rows is refused, so that no photo is ever written twice. A failure of
    the system past ``run.max_failed_fraction`` raises :class:`RunFailed` (after recording
    the run). ``stages`` builds the pipeline (the arguments of ``caption_stages``). A damaged part
    of the face index stops the run before any work (:class:`IndexCorrupt`) unless ``rebuild_index``
    drops it (its photos are detected again).
    """
    if not config.output.uri:
        raise ConfigError("no output given: set output.uri in the config or pass --output")
    preflight.check_output(config.output.uri, config.storage)
    run = CaptionRun(config, new_run_id(), OutputTable(config.output.uri, config.storage), stages)
    with run.output.lease(run.run_id, "caption", config.output.lease_expiry_s) as lease:
        return run.start(lease, resume, overwrite, retry_errors, rebuild_index)


@dataclass
class CaptionRun:
    """One caption run, with the output's lease held: what it lists, skips, pins, writes and reports."""

    config: Config
    run_id: str
    output: OutputTable
    stages: Callable[..., list[Step]]

    def start(self, lease: Lease, resume: bool, overwrite: bool, retry_errors: bool, rebuild: bool) -> RunSummary:
        started, started_at = time.monotonic(), metrics.utc_now()
        config = self.config
        listing = list_inputs(config.input, config.storage, output=config.output.uri)
        listing = listing.append_column("index", pa.array(range(listing.num_rows), pa.int64()))
        users = listing.filter(listing.column("error").is_null()).column("user_id").to_pylist()
        pinned = pin_index(config, listing, users, rebuild)  # a damaged part stops the run here, before all
        todo = remaining(listing, self.done(overwrite, resume, retry_errors))
        banks = pin_banks(todo.filter(todo.column("error").is_null()).column("user_id").to_pylist(), config)
        # the output changes only from here, once the run is known to start
        self.output.prepare(output_schema(config.output.face_embeddings), overwrite, config.models.random_weights)
        retried = self.output.drop_retryable(self.run_id) if retry_errors else 0
        parts, failure = self.write(todo, lease, pinned, banks)
        summary = self.summarize(listing, todo, parts, pinned, banks, time.monotonic() - started)
        summary.output = sorted(storage.join(config.output.uri, part.name) for part in parts)
        summary.retried = retried
        lease.check()
        failure = failure or self.over_budget(summary)
        if failure is not None:
            summary.status, summary.failure = "failed", str(failure)
        else:
            compacted = [c for c in pinned.compact_grown(config.index.compact_parts, new_run_id())
                         if c.parts_before != c.parts_after]  # fmt: skip
            summary.index_compacted = {c.user_id: [c.parts_before, c.parts_after] for c in compacted}
        summary.started, summary.ended = started_at, metrics.utc_now()
        metrics.record(self.output, "caption", asdict(summary), config.run.metrics_push)
        if failure is not None:
            raise failure
        if summary.rows != summary.photos or summary.missing or summary.duplicates:
            raise RowCountMismatch(
                f"run {self.run_id} wrote {summary.rows} rows for {summary.photos} photos; the output holds "
                f"{summary.missing} fewer and {summary.duplicates} more rows than the {listing.num_rows} listed "
                "photos" + (f" (plvm repair {config.output.uri} keeps one row per photo)" if summary.duplicates else "")
            )
        return summary

    def done(self, overwrite: bool, resume: bool, retry_errors: bool) -> Counter:
        """The photos the output holds that this run leaves out (each photo's rows counted)."""
        if overwrite:
            return Counter()
        written = self.output.read(["path", "user_id", "error_kind"])
        done = keys(written)
        if done and not (resume or retry_errors):
            raise OutputExists(
                f"{self.config.output.uri} already holds {sum(done.values())} rows from earlier runs: pass --resume "
                "to write only the photos not written yet, --retry-errors to also write again the rows that failed "
                "in the system, or --overwrite to start again"
            )
        if retry_errors:
            done -= keys(written.filter(pc.is_in(written.column("error_kind"), value_set=pa.array(RETRYABLE))))
        return done

    def write(
        self, todo: pa.Table, lease: Lease, pinned: PinnedIndex, banks: BankVersions
    ) -> tuple[list[Staged], RunFailed | None]:
        """Run the pipeline over ``todo``, committing each part as it arrives; the parts committed, and the run's
        failure if it failed (what it committed stays: ``--resume`` goes on)."""
        config, committed = self.config, []
        if not todo.num_rows:
            return committed, None
        progress = Progress(todo.num_rows, config.ray)
        steps = self.stages(config, models=config.model_paths(), run_id=self.run_id,
                            parts=config.output.parts(todo.num_rows), pinned=pinned, banks=banks)  # fmt: skip
        try:
            for row in results(execute(todo, steps, config.ray, config.run, config.tasks.batch_size)):
                lease.check()
                part = Staged(**row)
                self.output.commit([part], self.run_id)
                committed.append(part)
                progress.update(part.rows)
        except RunFailed as failure:
            return committed, failure
        return committed, None

    def summarize(self, listing: pa.Table, todo: pa.Table, parts: list[Staged], pinned: PinnedIndex,
                  banks: BankVersions, wall: float) -> RunSummary:  # fmt: skip
        """The run's summary: its counts from the counters of the parts it committed, and the output's rows per
        listed photo (none missing, none twice)."""
        counts = totals(parts)
        errors = {k.removeprefix("write.error_kind."): int(n) for k, n in sorted(counts.items())
                  if k.startswith("write.error_kind.")}  # fmt: skip
        listed, written = keys(listing), keys(self.output.read(["path", "user_id"]))
        return RunSummary(
            run_id=self.run_id,
            photos=todo.num_rows,
            rows=sum(part.rows for part in parts),
            skipped=listing.num_rows - todo.num_rows,
            missing=sum((listed - written).values()),
            duplicates=sum(max(0, written[k] - n) for k, n in listed.items()),
            indexed=int(counts["index.indexed"]),
            deleted=len(pinned.deleted),
            deleted_paths=pinned.deleted[:5],
            index_dropped=pinned.dropped,
            faces=int(counts["write.faces"]),
            matched=int(counts["write.named"]),
            errors=errors,
            failed=sum(n for k, n in errors.items() if k in RETRYABLE),
            wall_s=wall,
            photos_per_s=todo.num_rows / wall if wall else 0.0,
            banks=banks,
            stages={stage: c for stage, c in by_stage(counts).items() if stage != "write" or c},
            random_weights=self.config.models.random_weights,
        )

    def over_budget(self, summary: RunSummary) -> RunFailed | None:
        """A :class:`RunFailed` when this run's system failures are more than ``run.max_failed_fraction`` of its
        photos, naming the first."""
        budget = self.config.run.max_failed_fraction
        if summary.failed <= budget * summary.photos:
            return None
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(summary.errors.items()) if k in RETRYABLE)
        table = self.output.read(["error", "error_kind"], run_id=self.run_id)
        failed = table.filter(pc.is_in(table.column("error_kind"), value_set=pa.array(RETRYABLE)))
        return RunFailed(
            f"run {summary.run_id} failed: {summary.failed} of {summary.photos} photos failed in the system ({kinds}), "
            f"over run.max_failed_fraction={budget}; the first: {failed.column('error')[0]}\n(the rows are written "
            "with their errors: fix the cause, then run again with --retry-errors)"
        )
