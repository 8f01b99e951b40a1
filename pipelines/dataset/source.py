"""What a dataset build reads, pinned at its start: the output's current parts, the runs that wrote them and the
bank versions those runs read, the users' face index, and their banks at those versions.

Everything here is about the output's parts and runs, never its rows: a build of a million photos lists their
parts (with their rows from the table's log) and slices them, and the rows themselves are read by the tasks.
Refused before anything is written (exit code 2): an output without rows, a chosen user without rows in it, a
part whose run left no record (its bank version is unknown), a user without a face index, a bank version that is
gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from operators.items import Roster
from operators.output_rows import slice_key
from pipelines.config import Config
from plvm_model.faces import embedder_class
from plvm_model.store import storage
from plvm_model.store.banks import Bank, BankStore
from plvm_model.store.errors import InputError, InputNotFound
from plvm_model.store.face_index import FaceIndex, IndexSource
from plvm_model.store.output_table import OutputTable, run_of


@dataclass(frozen=True)
class Source:
    """A caption run's output as a dataset build reads it."""

    uri: str
    version: int | None
    """The output table's version (None: a folder of parts without a log)."""
    parts: list[tuple[str, int]]
    """Each current part (a URI) with its rows."""
    runs: dict[str, dict[str, int]]
    """The run that wrote each part -> each user's bank version it read."""
    users: tuple[str, ...]
    index: IndexSource
    banks: dict[tuple[str, int], Bank]
    """Each (user, version) the chosen users' rows were named with (version 0, no bank, is left out)."""

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.parts)

    def roster(self) -> Roster:
        """The people of each bank version: what the items stage names and asks about."""
        return Roster({key: {c.name: c.concept_id for c in bank.concepts} for key, bank in self.banks.items()})

    def slices(self, rows: int, plan: str) -> pa.Table:
        """The listing of a build: each part cut into slices of at most ``rows`` rows (``index`` their order, ``path``
        the part, ``part_start`` and ``part_rows``), with each slice's key (``shard``)."""
        listing: dict[str, list] = {"index": [], "path": [], "part_start": [], "part_rows": [], "shard": []}
        for part, count in self.parts:
            for start in range(0, count, rows):
                listing["index"].append(len(listing["index"]))
                listing["path"].append(part)
                listing["part_start"].append(start)
                listing["part_rows"].append(min(rows, count - start))
                listing["shard"].append(slice_key(part, start, plan))
        return pa.table(listing, schema=pa.schema([("index", pa.int64()), ("path", pa.string()),
                                                   ("part_start", pa.int64()), ("part_rows", pa.int64()),
                                                   ("shard", pa.string())]))  # fmt: skip


def pin_source(config: Config, output_uri: str, users: list[str] | None = None) -> Source:
    """The output at ``output_uri`` as it is now, for ``users`` (default: every user its runs named)."""
    output = OutputTable(output_uri, config.storage)
    parts = output.part_rows() if output.fs.exists(output.root) else []
    if not sum(rows for _, rows in parts):
        raise InputError(f"{output_uri} holds no rows: nothing to build a dataset from (give a caption run's output)")
    runs: dict[str, dict[str, int]] = {}
    for part, _ in parts:
        run = run_of(part)
        if run not in runs:
            record = output.run_record(run)
            if record is None:
                raise InputError(f"part {storage.unstrip(output_uri, part)} was written by run {run}, which left no "
                                 f"record in {output_uri}/_runs/: the bank versions that named its rows are unknown")  # fmt: skip
            runs[run] = {user: int(v) for user, v in (record.get("banks") or {}).items()}
    named = sorted({user for versions in runs.values() for user in versions})
    for user in users or []:
        if user not in named:
            raise InputError(f"{output_uri} holds no rows of user {user!r} (its users: {', '.join(named) or 'none'})")
    chosen = tuple(sorted(users or named))
    index = FaceIndex(config.index.root(output_uri), config.storage)
    space = embedder_class(config.embed.kind).space
    pinned = {}
    for user in chosen:
        pinned[user] = tuple(index.parts(user))
        if not pinned[user]:
            raise InputNotFound(f"the face index {index.uri} holds nothing of user {user!r}: a dataset needs the "
                                "index the caption runs wrote beside the output (index.uri, else OUTPUT/_faces)")  # fmt: skip
    store = BankStore(config.bank, config.storage)
    versions = sorted({(user, v) for per_run in runs.values() for user, v in per_run.items() if user in chosen and v})
    banks = {(user, v): store.load(user, v) for user, v in versions}
    parts = [(storage.unstrip(output_uri, part), rows) for part, rows in parts]
    return Source(output_uri, output.version(), parts, runs, chosen, IndexSource(index.uri, config.storage, space,
                  pinned), banks)  # fmt: skip
