"""``plvm rematch``: name every indexed face of an output again after a bank changed, and replace only the rows
whose names changed, in one commit.

The faces come from the users' face index (``plvm_model.store.face_index``), never from the photos:
each current row of the output is looked up by its path, its faces are matched against the
user's newest bank with the cohort scales measured over the index's faces of the output's
photos (as one caption run over the whole output would), and a photo is written again only
when its *set* of names changed, or when its row has an error of the user's bank (no bank
yet, an empty one) that the bank no longer gives. Only those photos are read again, and only
for the LLM (read -> decode -> prompt -> generate -> write). Their new parts are staged, and with the
rewritten parts that held their old rows, swapped into the output's Delta table by one commit
(:meth:`plvm_model.store.output_table.OutputTable.replace`): a rematch that is killed leaves the
previous version current and whole. The rematch holds the output's lease throughout.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from operators.cohort import IndexCohort, cohort_scales
from operators.match import MatchFaces
from operators.rows import as_row_faces, to_table
from pipelines.config import Config
from pipelines.pinned import pin_banks
from pipelines.runner import metrics
from pipelines.runner.counters import by_stage, stage_lines, totals
from pipelines.runner.execute import execute
from pipelines.runner.failures import results
from pipelines.stage_lists import llm_stages
from plvm_model.faces import embedder_class
from plvm_model.random_weights import mode_line
from plvm_model.store.banks import BankSource, BankVersions
from plvm_model.store.errors import InputNotFound, RowCountMismatch
from plvm_model.store.face_index import FaceIndex, IndexSource
from plvm_model.store.ids import new_run_id
from plvm_model.store.lease import Lease
from plvm_model.store.output_schema import BANK_ERRORS, output_schema
from plvm_model.store.output_table import OutputTable, Staged, keys


@dataclass
class RematchSummary:
    run_id: str
    photos: int
    """Current rows of the output's users that were looked at: rows without an error, and rows whose error came
    from the user's bank (``plvm_model.store.output_schema.BANK_ERRORS``: no bank, an empty one, one of another embedder)."""
    not_indexed: int = 0
    """Rows looked at whose path the face index does not hold: left as they are."""
    changed: int = 0
    """Photos whose set of names changed, or whose bank error the bank no longer gives: read again, sent to the
    LLM, and replaced."""
    rows: int = 0
    """Rows written (one per changed photo)."""
    naming_s: float = 0.0
    """Seconds spent naming the faces again (reading the index, the cohort scales, matching)."""
    wall_s: float = 0.0
    banks: BankVersions = field(default_factory=dict)
    version: int | None = None
    """The output table's version that the rematch committed (None: nothing changed, no commit)."""
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each stage's counters over the rows written (as a caption run's summary has them)."""
    status: str = "ok"
    """``ok``: a rematch that fails raises, and records nothing."""
    started: str = ""
    """When the rematch started and ended (UTC, ISO 8601)."""
    ended: str = ""
    random_weights: bool = False
    """The models had random weights (``models.random_weights``): the captions written are noise."""

    def lines(self) -> list[str]:
        """The summary as printed at the end of a rematch."""
        committed = f" (version {self.version})" if self.version else ""
        first = (f"rematch {self.run_id}: {self.photos} photos named again from the face index, {self.changed} "
                 f"with other names -> {self.rows} rows replaced{committed}")  # fmt: skip
        lines = [first]
        if self.not_indexed:
            lines.append(f"{self.not_indexed} photos are not in the face index and keep their rows "
                         "(plvm caption --overwrite indexes them)")  # fmt: skip
        wall = f"wall {self.wall_s:.1f} s (naming the faces {self.naming_s:.1f} s)"
        return [*lines, *stage_lines(self.stages), wall, mode_line(self.random_weights)]


NAMING_ROWS = 4096
"""Rows named at once by a rematch (the naming holds only their faces as Python objects)."""


def rename(config: Config, rows: pa.Table, users: list[str], banks: BankVersions,
           forced: frozenset[tuple[str, str]] = frozenset()) -> tuple[pa.Table, int]:  # fmt: skip
    """``rows`` (current output rows without an error, or with a bank error) named again from the face index: the
    rows whose set of names changed or whose bank error is gone, and the ``forced`` photos (path, user_id) whatever
    their names, with their indexed faces matched and their size, and how many rows the index lacks. The index is
    joined to the rows column by column, and the faces are named :data:`NAMING_ROWS` rows at a time."""
    space = embedder_class(config.embed.kind).space
    index = FaceIndex(config.index.root(config.output.uri), config.storage)
    source = IndexSource(index.uri, config.storage, space, {u: tuple(index.parts(u)) for u in users})
    bank_source = BankSource(config.bank, config.storage, banks)
    listed, exclude = [], set()
    for user in users:
        indexed = index.read(user, space, parts=list(source.pinned[user]))
        mine = rows.filter(pc.equal(rows.column("user_id"), user))
        outside = pc.invert(pc.is_in(indexed.column("path"), value_set=mine.column("path")))
        exclude |= set(indexed.filter(outside).column("content_hash").to_pylist())  # not a photo of the output
        at = pc.index_in(mine.column("path"), value_set=indexed.column("path"))
        found = pc.is_valid(at)
        mine, hit = mine.filter(found), indexed.take(at.filter(found))
        # a row with a bank error has no names: None, which no set of names equals
        names = [None if error is not None else sorted(concepts or []) for concepts, error in
                 zip(mine.column("concepts").to_pylist(), mine.column("error").to_pylist())]  # fmt: skip
        nulls = pa.nulls(mine.num_rows, pa.string())
        listed.append((pa.table({"path": mine.column("path"), "user_id": mine.column("user_id"),
                                 "width": hit.column("width"), "height": hit.column("height"),
                                 "faces": as_row_faces(hit.column("faces")), "error": nulls, "error_kind": nulls}),
                       names))  # fmt: skip
    missing = rows.num_rows - sum(table.num_rows for table, _ in listed)
    scales = None
    if config.match.normalization == "cohort":
        cohort = IndexCohort(source, tuple(users), frozenset(exclude))
        scales = cohort_scales(cohort.faces(), config.match, bank_source, space)
    matcher = MatchFaces(config.match, bank_source, space, scales)
    changed = [matcher(to_table([], ["path", "user_id", "width", "height", "faces", "error", "error_kind"]))]
    for table, before in listed:
        for start in range(0, table.num_rows, NAMING_ROWS):
            named = matcher(table.slice(start, NAMING_ROWS))
            photos = zip(named.column("path").to_pylist(), named.column("user_id").to_pylist())
            after = zip(before[start:], named.column("concepts").to_pylist(), named.column("error").to_pylist(), photos)
            # a forced photo is written again even with an error of the bank (the last person forgotten: empty)
            keep = [photo in forced or (error is None and sorted(new) != old) for old, new, error, photo in after]
            changed.append(named.filter(pa.array(keep, pa.bool_())))
    return pa.concat_tables(changed), missing


def rematch(config: Config, output_uri: str, user: str | None = None) -> RematchSummary:
    """Name the faces of ``output_uri``'s photos (of ``user`` only, if given) again and replace the rows whose
    names changed, in one commit, under the output's lease."""
    output = OutputTable(output_uri, config.storage)
    if not output.fs.exists(output.root) or not output.part_files():
        raise InputNotFound(f"{output_uri} holds no rows: nothing to rematch (give a caption run's output folder)")
    run_id = new_run_id()
    with output.lease(run_id, "rematch", config.output.lease_expiry_s) as lease:
        return rematch_held(config, output, lease, run_id, user)


def rematch_held(
    config: Config,
    output: OutputTable,
    lease: Lease,
    run_id: str,
    user: str | None = None,
    forced: frozenset[tuple[str, str]] = frozenset(),
    operation: str = "rematch",
) -> RematchSummary:
    """:func:`rematch` with the output's ``lease`` held by the caller; the ``forced`` photos (path, user_id) are
    written again whatever their names and errors (``plvm forget``)."""
    config = config.model_copy(update={"output": config.output.model_copy(update={"uri": output.uri})})
    started, started_at = time.monotonic(), metrics.utc_now()
    random_weights = config.models.random_weights
    output.prepare(output_schema(config.output.face_embeddings), random_weights=random_weights)
    current = output.read(["path", "user_id", "concepts", "error", "error_kind"])
    bank_error = pc.is_in(current.column("error_kind"), value_set=pa.array(BANK_ERRORS))
    keep = pc.or_kleene(pc.is_null(current.column("error")), bank_error)
    if forced:
        photos = zip(current.column("path").to_pylist(), current.column("user_id").to_pylist())
        keep = pc.or_kleene(keep, pa.array([photo in forced for photo in photos], pa.bool_()))
    current = current.filter(keep)
    if user is not None:
        current = current.filter(pc.equal(current.column("user_id"), user))
    users = sorted(set(current.column("user_id").to_pylist()))
    banks = pin_banks(users, config)
    naming = time.monotonic()
    todo, missing = rename(config, current, users, banks, forced)
    summary = RematchSummary(run_id, current.num_rows, missing, todo.num_rows, banks=banks,
                             naming_s=time.monotonic() - naming, random_weights=random_weights)  # fmt: skip
    if todo.num_rows:
        changed = set(keys(todo))
        todo = todo.append_column("index", pa.array(range(todo.num_rows), pa.int64()))
        parts = config.output.parts(todo.num_rows)
        steps = llm_stages(config, config.model_paths(), run_id, parts, banks)
        staged: list[Staged] = []
        for part in results(execute(todo, steps, config.ray, config.run, config.tasks.batch_size)):
            lease.check()
            staged.append(Staged(**part))
        summary.rows = sum(p.rows for p in staged)
        summary.stages = by_stage(totals(staged))
        if summary.rows != todo.num_rows:
            raise RowCountMismatch(f"rematch {run_id} wrote {summary.rows} rows for {todo.num_rows} photos; "
                                   "nothing was committed")  # fmt: skip
        drop = {}
        for part in output.part_files():
            photos = output.read_part(part, ["path", "user_id"])
            drop[part] = pa.array([p in changed for p in zip(*(c.to_pylist() for c in photos.columns))])
        lease.check()
        summary.version = output.replace(drop, staged, run_id, operation)
    summary.wall_s = time.monotonic() - started
    summary.started, summary.ended = started_at, metrics.utc_now()
    metrics.record(output, operation, asdict(summary), config.run.metrics_push)
    return summary
