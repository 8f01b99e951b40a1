"""What a caption run takes from the face index before it starts: the parts it looks photos up in, the
photos deleted from the archive since they were indexed, and (``--rebuild-index``) damaged parts dropped;
and what it does to the index at its end: compact the users whose parts grew too many."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from plvm_model.store.ids import new_run_id
from pipelines.cohort import IndexCohort
from pipelines.config import Config
from plvm_model.store import storage
from plvm_model.store.face_index import Compacted, FaceIndex, IndexSource
from plvm_model.faces import embedder_class


@dataclass(frozen=True)
class Archive:
    """A run's view of its users' face index, pinned at its start."""

    source: IndexSource
    cohort: IndexCohort
    deleted: list[str] = field(default_factory=list)
    """Indexed photos that the listing does not name and that no longer exist (their faces leave the cohort)."""
    dropped: list[str] = field(default_factory=list)
    """Damaged parts that ``--rebuild-index`` removed."""


def open_archive(config: Config, listing: pa.Table, users: list[str], rebuild: bool = False) -> Archive:
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
    return Archive(source, cohort, sorted(deleted), [part.uri for part in dropped])


def compact_grown(archive: Archive, limit: int | None) -> list[Compacted]:
    """Compact each of the run's users whose index has more than ``limit`` parts (none if ``limit`` is None); the
    caller holds the output's lease."""
    if limit is None:
        return []
    index, run_id = archive.source.open(), new_run_id()
    return [index.compact(user, run_id) for user in archive.source.pinned if len(index.parts(user)) > limit]
