"""``plvm forget``: a privacy request. A person leaves the user's bank, every stored version of it, the outputs'
rows, the face index, the people table and the exports the tool made, and only an audit line without the name
stays.

Under the user's bank lease, and the lease of each output given (taken before anything changes, so a second
``forget`` or ``merge`` on the bank, or a run into an output, is refused with exit code 2):

1. The person's faces in each output's face index: the faces the bank (at the newest version that holds the
   person) names them, the faces of the rows that name them, and the faces of the clusters enrolled as them or
   merged into them. Their descriptors are emptied in the index (its parts rewritten, one per descriptor space, the
   old parts removed): a forgotten face keeps its box, is never embedded again (its photo's bytes are known), never
   named and never clustered.
2. The bank: the next version without the person (compare-and-swap); then every older version that holds them is
   rewritten without them, under its own version number (a version is immutable but for this purge: a reader
   pinned to it reads it without the forgotten person).
3. Each output: the rows that named them, mention the name anywhere, or hold one of their faces are written again
   (a rematch with those photos forced) by one commit, and the table is vacuumed at once (retention 0), which
   deletes the parts the log no longer names. Delta's vacuum deletes only data files; the log (``_delta_log/*.json``
   and checkpoints) keeps each commit's file names, row counts and the commit's metadata (``plvm.operation``,
   ``plvm.run_id``), never row values, so nothing of the person is in it (checked below).
4. The people table: the clusters enrolled as or merged into the person go, their faces leave every cluster, and
   every older version of the table is removed.
5. The exports recorded in the output (``plvm_model.store.exports``: reports, datasets) that show the user's rows
   are removed; make them again.
6. An audit record, ``BANK/<user>/_audit/<run>.json`` and ``OUTPUT/_runs/<run>.json``: a person was forgotten, when,
   by which run, with the counts; no name, no vector.
7. A byte-level search (``plvm_model.store.traces``) of every file under the user's bank folder and each output,
   its face index and people tables for the name and the person's vectors; a find fails the command (exit 3).

A forget stopped half-way is run again: it goes on as long as the name is in a bank version or an output.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import Config
from pipelines.people import indexed_faces, user_of
from pipelines.rematch import rematch_held
from plvm_model.faces import embedder_class
from plvm_model.store import exports, storage, traces
from plvm_model.store.banks import LEGACY_FILE, Bank, BankStore, Concept
from plvm_model.store.errors import BankError, InputError, InputNotFound, RunFailed
from plvm_model.store.face_index import FaceIndex
from plvm_model.store.ids import new_run_id
from plvm_model.store.output_table import OutputTable
from plvm_model.store.people import FaceKey, PeopleStore

TEXT_COLUMNS = ("concepts", "faces", "caption", "answers", "error")
"""The output columns whose text may hold a person's name."""


@dataclass
class OutputForgotten:
    output: str
    faces: int
    """The person's faces whose descriptors were emptied in the face index."""
    rows: int
    """Rows written again."""
    version: int | None
    """The output table's version committed (None: no row named the person)."""
    clusters: int
    """Clusters of the person removed from the people table."""
    exports: list[str] = field(default_factory=list)
    """Exports removed."""


@dataclass
class ForgetSummary:
    run_id: str
    user_id: str
    bank_version: int
    """The bank's version without the person (0: the newest version did not hold them)."""
    versions_purged: int
    """Older bank versions rewritten without the person."""
    outputs: list[OutputForgotten] = field(default_factory=list)
    wall_s: float = 0.0

    def lines(self) -> list[str]:
        lines = [f"forget {self.run_id}: a person of user {self.user_id} left the bank (version {self.bank_version}; "
                 f"{self.versions_purged} older versions purged)"]  # fmt: skip
        for o in self.outputs:
            version = f" (version {o.version})" if o.version else ""
            lines.append(f"{o.output}: {o.faces} faces forgotten in the face index, {o.rows} rows written again"
                         f"{version}, {o.clusters} clusters removed, {len(o.exports)} exports removed")  # fmt: skip
            lines += [f"  removed {e}" for e in o.exports]
        return [*lines, f"wall {self.wall_s:.1f} s"]

    def record(self) -> dict:
        """The audit record: no name, no vector."""
        return {"event": "forget", "at": datetime.now(UTC).isoformat(), **asdict(self)}


def mentions(table: pa.Table, name: str) -> pa.Array:
    """Which rows hold ``name`` in a text column (their names, faces, caption, answers or error)."""
    columns = [table.column(c).to_pylist() for c in TEXT_COLUMNS]
    return pa.array([name in json.dumps(values) for values in zip(*columns)], pa.bool_())


def person_vectors(concepts: list[Concept]) -> dict[str, bytes]:
    """The bytes of each vector of the person (every version's): match keys, soft tokens, head weight, vector."""
    out = {}
    for c in concepts:
        arrays = [*c.face_descriptors, *c.soft_tokens, c.head_weight, c.vector]
        for i, vector in enumerate(arrays):
            data = np.ascontiguousarray(vector, "<f4").tobytes()
            if data:
                out[f"vector {c.concept_id}/{i}"] = data
    return out


def scrub(rows: pa.Table, faces: set[FaceKey]) -> pa.Table:
    """The index rows with the descriptors of ``faces`` emptied."""
    hashes = {h for h, _ in faces}
    listed = rows.column("faces").to_pylist()
    for i, digest in enumerate(rows.column("content_hash").to_pylist()):
        if digest in hashes:
            for n, face in enumerate(listed[i] or []):
                if (digest, n) in faces:
                    face["descriptor"] = []
    column = rows.schema.get_field_index("faces")
    return rows.set_column(column, "faces", pa.array(listed, rows.schema.field("faces").type))


class Forget:
    """One ``plvm forget`` of ``name`` from ``user``'s bank and ``outputs``."""

    def __init__(self, config: Config, user: str, name: str, outputs: list[str]) -> None:
        self.config, self.user, self.name, self.outputs = config, user_of(user), name, outputs
        self.run_id = new_run_id()
        self.banks = BankStore(config.bank, config.storage)
        self.space = embedder_class(config.embed.kind).space

    def holding(self) -> dict[int, Bank]:
        """Every stored version of the bank that holds the person."""
        found = {}
        for version in sorted(self.banks.versions(self.user)):
            bank = self.banks.load(self.user, version)
            if bank is not None and bank.find(self.name) is not None:
                found[version] = bank
        legacy = self.banks.legacy(self.user)
        if legacy is not None and legacy.find(self.name) is not None:
            found[-1] = legacy
        return found

    def run(self) -> ForgetSummary:
        started = time.monotonic()
        for output in self.outputs:
            table = OutputTable(output, self.config.storage)
            if not table.fs.exists(table.root) or not table.part_files():
                raise InputNotFound(f"{output} holds no rows (give the outputs of caption runs with the user's photos)")
        with contextlib.ExitStack() as held:
            held.enter_context(self.banks.lease(self.user, self.run_id, "forget", self.config.output.lease_expiry_s))
            leases = {o: held.enter_context(OutputTable(o, self.config.storage).lease(
                self.run_id, "forget", self.config.output.lease_expiry_s)) for o in self.outputs}  # fmt: skip
            versions = self.holding()
            concepts = [b.find(self.name) for b in versions.values()]
            ids = {c.concept_id for c in concepts}
            named = {o: self.named_rows(o) for o in self.outputs}
            if not versions and not any(len(rows) for rows in named.values()):
                where = ", ".join([self.banks.location(self.user), *self.outputs])
                raise InputError(f"user {self.user!r} has no person named {self.name!r} in {where}: nothing to forget")
            newest = max((v for v in versions if v > 0), default=None)
            faces = {o: self.faces_of(o, newest, ids, named[o]) for o in self.outputs}
            for output in self.outputs:  # 1. the index first: nothing named from here on has a descriptor of theirs
                self.scrub_index(output, faces[output])
            summary = ForgetSummary(self.run_id, self.user, *self.purge_bank(versions))
            for output in self.outputs:
                summary.outputs.append(self.forget_in(output, leases[output], named[output], faces[output], ids))
            summary.wall_s = time.monotonic() - started
            record = json.dumps(summary.record(), indent=1).encode()
            storage.write_atomic(self.banks.fs, f"{self.banks.folder(self.user)}/_audit/{self.run_id}.json", record)
            for output in self.outputs:
                OutputTable(output, self.config.storage).record(self.run_id, summary.record())
            self.verify(person_vectors(concepts))
        return summary

    def named_rows(self, output: str) -> pa.Table:
        """The output's current rows of the user that mention the name."""
        table = OutputTable(output, self.config.storage)
        rows = table.read(["path", "user_id", *TEXT_COLUMNS])
        rows = rows.filter(pc.equal(rows.column("user_id"), self.user))
        return rows.filter(mentions(rows, self.name))

    def faces_of(self, output: str, version: int | None, ids: set[str], named: pa.Table) -> set[FaceKey]:
        """The person's faces in the output's face index (see the module, step 1)."""
        faces = indexed_faces(self.config, output, self.user, bank_version=version)
        found = {key for key, concept in zip(faces.keys, faces.concepts) if concept in ids}
        by_path = {}
        for key, path in zip(faces.keys, faces.paths):
            by_path.setdefault(path, key[0])
        for path, listed in zip(named.column("path").to_pylist(), named.column("faces").to_pylist()):
            for n, face in enumerate(listed or []):
                if face.get("concept") == self.name and path in by_path:
                    found.add((by_path[path], n))
        people = PeopleStore(self.config.people.root(output), self.config.storage).load(self.user, self.space)
        for cluster in people.clusters.values():
            if cluster.concept_id in ids:
                found |= set(cluster.faces)
        return found

    def scrub_index(self, output: str, faces: set[FaceKey]) -> None:
        index = FaceIndex(self.config.index.root(output), self.config.storage)
        if faces and index.parts(self.user):
            index.compact(self.user, self.run_id, lambda rows: scrub(rows, faces))

    def purge_bank(self, versions: dict[int, Bank]) -> tuple[int, int]:
        """Step 2: the newest version without the person, then the older ones purged; (the new version, how many
        older versions were rewritten)."""
        committed = 0
        for _ in range(10):
            bank = self.banks.load(self.user)
            if bank is None or bank.find(self.name) is None:
                break
            bank.concepts = [c for c in bank.concepts if c.name != self.name]
            if self.banks.commit(bank):
                committed = bank.version
                break
        else:
            raise BankError(f"the concept bank {self.banks.location(self.user)} kept changing; run plvm forget again")
        purged = 0
        for version, bank in versions.items():
            if version == committed:
                continue
            if version < 0:  # the legacy file: the versions committed beside it are read instead
                self.banks.fs.rm(f"{self.banks.folder(self.user)}/{LEGACY_FILE}")
            else:
                bank.concepts = [c for c in bank.concepts if c.name != self.name]
                self.banks.rewrite(bank)
            purged += 1
        return committed, purged

    def forget_in(self, output: str, lease, named: pa.Table, faces: set[FaceKey], ids: set[str]) -> OutputForgotten:
        """Steps 3 to 5 in one output."""
        index = FaceIndex(self.config.index.root(output), self.config.storage)
        rows = index.read(self.user, self.space)
        hashes = {h for h, _ in faces}
        photos = zip(rows.column("path").to_pylist(), rows.column("content_hash").to_pylist())
        forced = {(p, self.user) for p, h in photos if h in hashes}
        forced |= {(p, self.user) for p in named.column("path").to_pylist()}
        table = OutputTable(output, self.config.storage)
        summary = rematch_held(self.config, table, lease, self.run_id, self.user, frozenset(forced), "forget")
        store = PeopleStore(self.config.people.root(output), self.config.storage)
        people = store.load(self.user, self.space)
        removed = 0
        if people.version:
            for cluster in list(people.clusters.values()):
                if cluster.concept_id in ids:
                    del people.clusters[cluster.cluster_id]
                    removed += 1
                else:
                    cluster.faces = [f for f in cluster.faces if f not in faces]
            store.rewrite(people)
        gone = exports.remove(output, self.config.storage, self.user)
        return OutputForgotten(output, len(faces), summary.rows, summary.version, removed, gone)

    def verify(self, vectors: dict[str, bytes]) -> None:
        """Step 7: search every file of the bank folder, the outputs, their indexes and people tables."""
        needles = {"the name": self.name.encode(), **vectors}
        roots = [(self.banks.fs, self.banks.folder(self.user))]
        for output in self.outputs:
            inside = storage.join(output, "")  # the index and people table under the output are searched with it
            for uri in {output, self.config.index.root(output), self.config.people.root(output)}:
                if uri == output or not uri.startswith(inside):
                    roots.append(storage.filesystem(uri, self.config.storage))
        found = [hit for fs, root in roots for hit in traces.search(fs, [root], needles)]
        if found:
            where = "; ".join(sorted({f"{label} in {path}" for path, label in found})[:10])
            raise RunFailed(f"forget {self.run_id} finished its steps, but the person is still found: {where}")


def forget(config: Config, user: str, name: str, outputs: list[str]) -> ForgetSummary:
    """Forget ``name`` of ``user`` (see the module)."""
    return Forget(config, user, name, outputs).run()
