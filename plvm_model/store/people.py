"""The people table: each user's suggested people (clusters of the faces nobody named), as immutable versions.

``PEOPLE/<user_id>/people.v000007.parquet`` is version 7, one row per cluster::

    cluster_id      int32     stable: a cluster keeps its id across nightly runs; 0 holds the faces left unclustered
    status          string    open | merged | enrolled | named | unclustered (see :data:`STATUSES`)
    faces           list<struct<content_hash string, face int32, quality float32>>
                              its faces: the photo's bytes (the face index's key) and the face's number in it
    representative  int32     the position in ``faces`` of the cluster's best face (-1: none)
    quality         float32   the cluster's quality score (the median of its faces' quality)
    merged_into     int32     a merged cluster: the cluster it was merged into (null: a person, or none)
    concept_id      string    enrolled, merged into or named as this person of the user's bank (null: none)
    created_at, updated_at    timestamp[us, UTC]

and, in the file's metadata, ``plvm.people_schema_version``, ``plvm.user_id``, ``plvm.version``,
``plvm.embedder`` (the descriptor space of the faces), ``plvm.next_id`` and ``plvm.bank_version`` (the bank
version the faces were named against). The table holds no
names and no vectors: the faces are references into the face index, a person a concept id of
the bank. A commit writes the next version with :func:`storage.create_exclusive` (compare-and-swap, as
the banks do); the versions older than the one before it are then removed (readers take the newest).
"""

from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from plvm_model.store import storage
from plvm_model.store.errors import InputError
from plvm_model.store.ids import validate_user_id

SCHEMA_VERSION = 1
STATUSES = ("open", "merged", "enrolled", "named", "unclustered")
"""open: a suggestion; merged: its faces went to another cluster or to a person; enrolled: a person was enrolled
from it; named: the bank names its faces now; unclustered: the faces no cluster took (cluster 0)."""
UNCLUSTERED = 0
KEPT_VERSIONS = 2
"""Versions kept after a commit: the new one and the one before (a reader that listed just before the commit)."""
_FILE = re.compile(r"people\.v(\d+)\.parquet")
FACE_REF = pa.struct([("content_hash", pa.string()), ("face", pa.int32()), ("quality", pa.float32())])
SCHEMA = pa.schema(
    [
        pa.field("cluster_id", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("faces", pa.list_(FACE_REF), nullable=False),
        pa.field("representative", pa.int32(), nullable=False),
        pa.field("quality", pa.float32(), nullable=False),
        pa.field("merged_into", pa.int32()),
        pa.field("concept_id", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("updated_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

FaceKey = tuple[str, int]
"""A face in the face index: its photo's content hash and its number among the photo's faces."""


def version_file(version: int) -> str:
    return f"people.v{version:06d}.parquet"


@dataclass
class Cluster:
    cluster_id: int
    status: str = "open"
    faces: list[FaceKey] = field(default_factory=list)
    quality: list[float] = field(default_factory=list)
    """Each face's quality score, in the order of ``faces``."""
    representative: int = -1
    score: float = 0.0
    """The cluster's quality score."""
    merged_into: int | None = None
    concept_id: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def size(self) -> int:
        return len(self.faces)

    @property
    def best(self) -> FaceKey | None:
        """The representative face."""
        return self.faces[self.representative] if 0 <= self.representative < len(self.faces) else None


@dataclass
class People:
    """One version of a user's people table."""

    user_id: str
    embedder: str
    clusters: dict[int, Cluster] = field(default_factory=dict)
    next_id: int = 1
    version: int = 0
    """0: not written yet."""
    bank_version: int = -1
    """The version of the user's bank the faces were named against (-1: unknown)."""

    def suggestions(self) -> list[Cluster]:
        """The open clusters, largest first (then by id)."""
        return sorted((c for c in self.clusters.values() if c.status == "open"), key=lambda c: (-c.size, c.cluster_id))

    def members(self) -> dict[FaceKey, int]:
        """Each face of a cluster (open, enrolled or named; the unclustered ones under 0) -> its cluster id."""
        return {face: c.cluster_id for c in self.clusters.values() for face in c.faces}

    def new_cluster(self) -> Cluster:
        cluster = Cluster(self.next_id)
        self.clusters[cluster.cluster_id] = cluster
        self.next_id += 1
        return cluster

    def open_cluster(self, cluster_id: int, where: str) -> Cluster:
        """The open cluster ``cluster_id``, or :class:`InputError` saying why it cannot be used."""
        cluster = self.clusters.get(cluster_id)
        if cluster is None or cluster_id == UNCLUSTERED:
            known = ", ".join(str(c.cluster_id) for c in self.suggestions()[:10]) or "none"
            raise InputError(f"{where} has no cluster {cluster_id} (open clusters, largest first: {known})")
        if cluster.status == "merged":
            into = f"cluster {cluster.merged_into}" if cluster.merged_into is not None else "an enrolled person"
            raise InputError(f"cluster {cluster_id} of {where} was merged into {into}: use that instead")
        if cluster.status != "open":
            raise InputError(f"cluster {cluster_id} of {where} is {cluster.status} (concept {cluster.concept_id}): "
                             "only an open cluster can be enrolled or merged")  # fmt: skip
        return cluster


class PeopleStore:
    """All users' people tables under one root URI (``people.uri``, by default ``OUTPUT/_people``)."""

    def __init__(self, uri: str, storage_options: storage.StorageOptions | None = None) -> None:
        self.uri = uri
        self.fs, self.root = storage.filesystem(uri, storage_options)

    def folder(self, user_id: str) -> str:
        return f"{self.root.rstrip('/')}/{validate_user_id(user_id)}"

    def location(self, user_id: str) -> str:
        return storage.join(self.uri, validate_user_id(user_id))

    def versions(self, user_id: str) -> dict[int, str]:
        folder = self.folder(user_id)
        self.fs.invalidate_cache(folder)
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return {}
        found = {}
        for path in names:
            match = _FILE.fullmatch(posixpath.basename(path.rstrip("/")))
            if match is not None:
                found[int(match[1])] = path
        return found

    def load(self, user_id: str, embedder: str) -> People:
        """The user's newest version (an empty one, version 0, if none)."""
        files = self.versions(user_id)
        if not files:
            return People(user_id, embedder)
        version = max(files)
        return decode(self.fs.cat_file(files[version]), user_id, version)

    def commit(self, people: People) -> bool:
        """Write ``people`` as version ``people.version + 1`` unless another writer has: True (and the version
        advanced) if this call wrote it; then the versions before the previous one are removed."""
        version = people.version + 1
        path = f"{self.folder(people.user_id)}/{version_file(version)}"
        if not storage.create_exclusive(self.fs, path, encode(replace(people, version=version))):
            return False
        people.version = version
        for old, file in self.versions(people.user_id).items():
            if old <= version - KEPT_VERSIONS:
                self.fs.rm(file)
        return True

    def rewrite(self, people: People) -> None:
        """Replace every version of the user's table by ``people`` as the next version (``plvm forget``: what the
        older versions held is gone); the caller holds the user's bank lease."""
        older = self.versions(people.user_id)
        people.version = max(older, default=0)
        storage.write_atomic(self.fs, f"{self.folder(people.user_id)}/{version_file(people.version + 1)}",
                             encode(replace(people, version=people.version + 1)))  # fmt: skip
        people.version += 1
        for file in older.values():
            self.fs.rm(file)


def encode(people: People) -> bytes:
    clusters = sorted(people.clusters.values(), key=lambda c: c.cluster_id)
    rows = {
        "cluster_id": [c.cluster_id for c in clusters],
        "status": [c.status for c in clusters],
        "faces": [[{"content_hash": h, "face": n, "quality": q} for (h, n), q in zip(c.faces, c.quality)]
                  for c in clusters],  # fmt: skip
        "representative": [c.representative for c in clusters],
        "quality": [c.score for c in clusters],
        "merged_into": [c.merged_into for c in clusters],
        "concept_id": [c.concept_id for c in clusters],
        "created_at": [c.created_at for c in clusters],
        "updated_at": [c.updated_at for c in clusters],
    }
    metadata = {"plvm.people_schema_version": str(SCHEMA_VERSION), "plvm.user_id": people.user_id,
                "plvm.version": str(people.version), "plvm.embedder": people.embedder,
                "plvm.next_id": str(people.next_id), "plvm.bank_version": str(people.bank_version)}  # fmt: skip
    sink = io.BytesIO()
    pq.write_table(pa.table(rows, schema=SCHEMA.with_metadata(metadata)), sink)
    return sink.getvalue()


def decode(data: bytes, user_id: str, version: int) -> People:
    table = pq.read_table(io.BytesIO(data))
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("plvm.people_schema_version") != str(SCHEMA_VERSION) or meta.get("plvm.user_id") != user_id:
        raise InputError(f"version {version} of user {user_id!r}'s people table is not one this program wrote")
    people = People(user_id, meta.get("plvm.embedder", ""), {}, int(meta["plvm.next_id"]), version,
                    int(meta.get("plvm.bank_version", "-1")))
    for row in table.to_pylist():
        cluster = Cluster(
            row["cluster_id"], row["status"], [(f["content_hash"], f["face"]) for f in row["faces"]],
            [f["quality"] for f in row["faces"]], row["representative"], row["quality"], row["merged_into"],
            row["concept_id"], row["created_at"], row["updated_at"],
        )  # fmt: skip
        people.clusters[cluster.cluster_id] = cluster
    return people
