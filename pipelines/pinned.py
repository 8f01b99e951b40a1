"""What a run pins at its start, so that every stage reads the same state however long the run takes: the
version of each user's bank, and the parts of each user's face index (with the photos deleted from the archive
since they were indexed, and, with ``--rebuild-index``, the damaged parts dropped first).

Both refuse to start a run, before any work, on what would fail late: a bank that cannot serve the run
(:class:`BankError`), a damaged index part (:class:`IndexCorrupt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from operators.cohort import IndexCohort
from pipelines.config import Config
from plvm_model.concept_token import check_servable
from plvm_model.faces import embedder_class
from plvm_model.store import storage
from plvm_model.store.banks import BankStore, BankVersions
from plvm_model.store.errors import BankError
from plvm_model.store.face_index import Compacted, FaceIndex, IndexSource


def pin_banks(users: list[str], config: Config) -> BankVersions:
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

                models = config.model_paths()
                llava = llava_identity(models.llava, models.random_weights)
            bank.check_servable(llava)
        if bank is not None and config.generate.concept_style == "plvm":
            for concept in (c for c in bank.concepts if c.method == "plvm"):  # MyVLM's is served in either style
                try:
                    check_servable(concept.tokens(), concept.soft_tokens.shape[-1])
                except ValueError as error:
                    raise BankError(f"user {user!r}, {bank.location}: {error}") from None
        pinned[user] = bank.version if bank is not None else 0
    return pinned


@dataclass(frozen=True)
class PinnedIndex:
    """A run's view of its users' face index, pinned at its start."""

    source: IndexSource
    cohort: IndexCohort
    deleted: list[str] = field(default_factory=list)
    """Indexed photos that the listing does not name and that no longer exist (their faces leave the cohort)."""
    dropped: list[str] = field(default_factory=list)
    """Damaged parts that ``--rebuild-index`` removed."""

    def compact_grown(self, limit: int | None, run_id: str) -> list[Compacted]:
        """Compact each of the run's users whose index has more than ``limit`` parts (none if ``limit`` is None),
        as ``run_id``; the caller holds the output's lease."""
        if limit is None:
            return []
        index = self.source.open()
        return [index.compact(user, run_id) for user in self.source.pinned if len(index.parts(user)) > limit]


def pin_index(config: Config, listing: pa.Table, users: list[str], rebuild: bool = False) -> PinnedIndex:
    """Pin ``users``' face index for a run over ``listing``: every part is read once here, so a damaged one
    stops the run before any work (:class:`IndexCorrupt` naming it) unless ``rebuild`` drops it first."""
    index = FaceIndex(config.index.root(config.output.uri), config.storage)
    dropped = index.check() if rebuild else []
    index.drop(dropped)
    space = embedder_class(config.embed.kind).space
    listed = set(listing.column("path").to_pylist())
    pinned: dict[str, tuple[str, ...]] = {}
    deleted: dict[str, str] = {}  # path -> content hash
    for user in sorted(set(users)):
        pinned[user] = tuple(index.parts(user))
        rows = index.read(user, space, parts=list(pinned[user]))
        indexed = zip(rows.column("path").to_pylist(), rows.column("content_hash").to_pylist())
        unlisted = {path: digest for path, digest in indexed if path not in listed}
        deleted |= {path: unlisted[path] for path in storage.gone(list(unlisted), config.storage)}
    source = IndexSource(index.uri, config.storage, space, pinned)
    cohort = IndexCohort(source, tuple(pinned), frozenset(deleted.values()))
    return PinnedIndex(source, cohort, sorted(deleted), [part.uri for part in dropped])
