"""``plvm people``: the faces of a user's face index that nobody named, clustered into suggested people, and the
owner's corrections (merge two clusters or a cluster into a person, reject a person's faces).

``suggest`` names every current face of the user's index against the user's newest bank (as a rematch would, the
rejections included), keeps the unnamed faces that are large and sharp enough (``people.min_face_px``,
``people.min_score``), and clusters them (``plvm_model.faces.clustering``): incrementally by default (clusters keep
their ids, new faces join them or form new ones), or all again with ``full`` (a new cluster takes the id of the
earlier cluster that held most of its faces). The clusters are committed as the next version of the user's people
table (``plvm_model.store.people``). Every command here that changes the people table or the bank holds the
user's bank lease.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from operators.cohort import IndexCohort, cohort_scales
from operators.match import MatchFaces
from operators.rows import as_row_faces
from pipelines.config import Config
from plvm_model.faces import clustering, embedder_class
from plvm_model.store import storage
from plvm_model.store.banks import Bank, BankSource, BankStore
from plvm_model.store.errors import BankError, InputError
from plvm_model.store.face_index import FaceIndex, IndexSource
from plvm_model.store.ids import new_run_id, validate_user_id
from plvm_model.store.people import UNCLUSTERED, Cluster, FaceKey, People, PeopleStore

COMMIT_ATTEMPTS = 5


@dataclass
class IndexedFaces:
    """The current faces of a user's face index, one entry per face with a descriptor, column by column."""

    keys: list[FaceKey]
    vectors: np.ndarray
    """(faces, dim) float32."""
    paths: list[str]
    boxes: np.ndarray
    """(faces, 4) in the photo's pixels."""
    scores: np.ndarray
    concepts: list[str | None]
    """The concept id the user's bank names each face, or None."""
    rows: pa.Table
    """The index's current rows."""

    def at(self) -> dict[FaceKey, int]:
        return {key: i for i, key in enumerate(self.keys)}


def user_of(user: str) -> str:
    try:
        return validate_user_id(user)
    except ValueError as error:
        raise InputError(str(error)) from None


def indexed_faces(config: Config, output_uri: str, user: str, bank_version: int | None = None,
                  unnamed: set[FaceKey] | frozenset = frozenset()) -> IndexedFaces:  # fmt: skip
    """The user's indexed faces, each named (its concept id) against the bank (newest, or ``bank_version``) with
    the cohort scales over the whole index, as a rematch names them, but the photos whose faces are all in
    ``unnamed`` (known to be nobody's at this bank version); forgotten faces (an empty descriptor) left out."""
    space = embedder_class(config.embed.kind).space
    index = FaceIndex(config.index.root(output_uri), config.storage)
    rows = index.read(user, space)
    faces = as_row_faces(rows.column("faces"))
    banks = BankSource(config.bank, config.storage, {} if bank_version is None else {user: bank_version})
    bank = BankStore(config.bank, config.storage).load(user, bank_version)
    listed = faces.to_pylist()
    hashes = rows.column("content_hash").to_pylist()
    todo = [i for i, (digest, photo) in enumerate(zip(hashes, listed))
            if any((digest, n) not in unnamed for n in range(len(photo or [])))]  # fmt: skip
    if bank is not None and bank.concepts and todo:
        scales = None
        if config.match.normalization == "cohort":
            source = IndexSource(index.uri, config.storage, space, {user: tuple(index.parts(user))})
            scales = cohort_scales(IndexCohort(source, (user,)).faces(), config.match, banks, space)
        at = pa.array(todo, pa.int64())
        nulls = pa.nulls(len(todo), pa.string())
        table = pa.table({"path": rows.column("path").take(at), "user_id": pa.array([user] * len(todo), pa.string()),
                          "faces": faces.take(at), "error": nulls, "error_kind": nulls})  # fmt: skip
        for i, photo in zip(todo, MatchFaces(config.match, banks, space, scales)(table).column("faces").to_pylist()):
            listed[i] = photo
    keys, vectors, paths, boxes, scores, concepts = [], [], [], [], [], []
    for digest, path, photo in zip(hashes, rows.column("path").to_pylist(), listed):
        for number, face in enumerate(photo or []):
            if not face["embedding"]:
                continue
            keys.append((digest, number))
            vectors.append(face["embedding"])
            paths.append(path)
            boxes.append(face["box"])
            scores.append(face["score"])
            concepts.append(face.get("concept_id"))
    dim = embedder_class(config.embed.kind).dim
    vectors_, boxes_ = np.asarray(vectors, np.float32).reshape(-1, dim), np.asarray(boxes, np.float32).reshape(-1, 4)
    return IndexedFaces(keys, vectors_, paths, boxes_, np.asarray(scores, np.float32), concepts, rows)


@dataclass
class SuggestSummary:
    run_id: str
    user_id: str
    faces: int
    """Current faces of the user's index with a descriptor."""
    named: int
    """Of those, named by the bank."""
    small: int
    """Unnamed faces left out for their size or score."""
    clustered: int
    unclustered: int
    new_faces: int
    """Faces this run looked at for the first time (all of them with ``full``)."""
    full: bool
    version: int
    clusters: list[dict] = field(default_factory=list)
    """The open clusters, largest first: ``id``, ``size``, ``quality``, ``representative`` (path and face)."""

    def lines(self) -> list[str]:
        how = "full recluster" if self.full else f"incremental: {self.new_faces} new faces"
        lines = [f"people {self.run_id} of user {self.user_id} ({how}): {self.faces} faces, {self.named} named, "
                 f"{self.small} too small or unsharp, {self.clustered} in {len(self.clusters)} clusters, "
                 f"{self.unclustered} unclustered (people table version {self.version})"]  # fmt: skip
        for c in self.clusters:
            lines.append(f"cluster {c['id']}: {c['size']} faces, quality {c['quality']:.2f}, best face {c['face']} "
                         f"of {c['path']}")  # fmt: skip
        return lines


def candidates(config: Config, faces: IndexedFaces) -> np.ndarray:
    """The unnamed faces large and sharp enough to cluster."""
    sides = np.minimum(faces.boxes[:, 2] - faces.boxes[:, 0], faces.boxes[:, 3] - faces.boxes[:, 1])
    unnamed = np.array([c is None for c in faces.concepts], bool)
    good = (sides >= config.people.min_face_px) & (faces.scores >= config.people.min_score)
    return np.flatnonzero(unnamed & good)


def quality(config: Config, faces: IndexedFaces, members: list[int]) -> list[float]:
    return [clustering.face_quality(faces.boxes[i], faces.scores[i], config.people.good_face_px) for i in members]


def settle(config: Config, faces: IndexedFaces, cluster: Cluster, at: dict[FaceKey, int]) -> None:
    """The cluster's face qualities, representative and score from its faces."""
    members = [at[key] for key in cluster.faces]
    cluster.quality = quality(config, faces, members)
    cluster.representative = clustering.representative(faces.vectors[members], np.asarray(cluster.quality))
    cluster.score = float(np.median(cluster.quality)) if members else 0.0
    cluster.updated_at = datetime.now(UTC)


def recluster(config: Config, people: People, faces: IndexedFaces, full: bool) -> int:
    """``people`` brought up to date with ``faces``; how many faces were looked at for the first time."""
    settings, at = config.people, faces.at()
    pool = set(candidates(config, faces).tolist())
    poolkeys = {faces.keys[i] for i in pool}
    for cluster in list(people.clusters.values()):
        if cluster.status not in ("open", "unclustered"):
            continue
        gone = [key for key in cluster.faces if key not in poolkeys]
        named = Counter(faces.concepts[at[key]] for key in gone if key in at and faces.concepts[at[key]])
        cluster.faces = [key for key in cluster.faces if key in poolkeys]
        if cluster.status == "open" and not cluster.faces:
            if named:  # its faces are a person's now
                cluster.status, cluster.concept_id = "named", named.most_common(1)[0][0]
            else:  # its photos left the archive
                del people.clusters[cluster.cluster_id]
    noise = people.clusters.setdefault(UNCLUSTERED, Cluster(UNCLUSTERED, "unclustered"))
    if full:
        fresh = sorted(pool)
        before = {key: c.cluster_id for c in people.clusters.values() if c.status == "open" for key in c.faces}
        for c in [c for c in people.clusters.values() if c.status == "open"]:
            c.faces = []
        labels = clustering.whispers(faces.vectors[fresh], settings.threshold, settings.min_size)
        taken: set[int] = set()
        found = sorted(set(labels.tolist()) - {-1}, key=lambda label: -int((labels == label).sum()))
        for label in found:
            members = [fresh[i] for i in np.flatnonzero(labels == label)]
            votes = Counter(before.get(faces.keys[i]) for i in members)
            old = next((cid for cid, n in votes.most_common() if cid is not None and cid not in taken
                        and n * 2 > len(members)), None)  # fmt: skip
            cluster = people.clusters[old] if old is not None else people.new_cluster()
            taken.add(cluster.cluster_id)
            cluster.faces = [faces.keys[i] for i in members]
        for c in [c for c in people.clusters.values() if c.status == "open" and not c.faces]:
            del people.clusters[c.cluster_id]
        noise.faces = [faces.keys[fresh[i]] for i in np.flatnonzero(labels == -1)]
        new_faces = len(fresh)
    else:
        known = set(people.members())
        new = [i for i in sorted(pool) if faces.keys[i] not in known]
        open_ = [c for c in people.clusters.values() if c.status == "open"]
        clustered = [at[key] for c in open_ for key in c.faces]
        labels = np.asarray([c.cluster_id for c in open_ for _ in c.faces], np.int64)
        earlier = [at[key] for key in noise.faces]
        grown = clustering.grow(faces.vectors[clustered].reshape(-1, faces.vectors.shape[1]), labels,
                                faces.vectors[earlier].reshape(-1, faces.vectors.shape[1]),
                                faces.vectors[new].reshape(-1, faces.vectors.shape[1]), settings.threshold,
                                settings.join_threshold, settings.min_size)  # fmt: skip
        for i, label in enumerate(grown.joined.tolist()):
            if label >= 0:
                people.clusters[label].faces.append(faces.keys[new[i]])
        moved: set[FaceKey] = set()
        for i, label in grown.adopted:
            people.clusters[label].faces.append(noise.faces[i])
            moved.add(noise.faces[i])
        for new_members, old_members in grown.formed:
            cluster = people.new_cluster()
            cluster.faces = [faces.keys[new[i]] for i in new_members] + [noise.faces[i] for i in old_members]
            moved |= {noise.faces[i] for i in old_members}
        noise.faces = [key for key in noise.faces if key not in moved] + [faces.keys[new[i]]
                                                                          for i in grown.unclustered]  # fmt: skip
        new_faces = len(new)
    for cluster in people.clusters.values():
        if cluster.status in ("open", "unclustered"):
            settle(config, faces, cluster, at)
    return new_faces


def suggest(config: Config, output_uri: str, user: str, full: bool = False) -> SuggestSummary:
    """Cluster the unnamed faces of ``user``'s face index (see the module), under the user's bank lease."""
    user = user_of(user)
    index = FaceIndex(config.index.root(output_uri), config.storage)
    if not index.parts(user):
        raise InputError(f"{index.uri} holds no faces of user {user!r}: run plvm caption into {output_uri} first")
    run_id = new_run_id()
    banks = BankStore(config.bank, config.storage)
    store = PeopleStore(config.people.root(output_uri), config.storage)
    space = embedder_class(config.embed.kind).space
    with banks.lease(user, run_id, "people suggest", config.output.lease_expiry_s):
        bank = banks.load(user)
        version = bank.version if bank is not None else 0
        people = store.load(user, space)
        # at the bank version of the last run, the faces it took as nobody's are nobody's still: not named again
        same = not full and people.version and people.bank_version == version
        nobodys = frozenset(f for c in people.clusters.values() if c.status in ("open", "unclustered") for f in c.faces)
        faces = indexed_faces(config, output_uri, user, version, nobodys if same else frozenset())
        for _ in range(COMMIT_ATTEMPTS):
            people = store.load(user, space)
            new_faces = recluster(config, people, faces, full)
            people.bank_version = version
            if store.commit(people):
                break
        else:
            raise BankError(f"the people table {store.location(user)} kept changing; nothing was written: run again")
    at = faces.at()
    clusters = []
    for c in people.suggestions():
        best = c.best
        clusters.append({"id": c.cluster_id, "size": c.size, "quality": round(c.score, 3),
                         "path": faces.paths[at[best]] if best else None,
                         "face": best[1] if best else None})  # fmt: skip
    pool = len(candidates(config, faces))
    named = sum(c is not None for c in faces.concepts)
    return SuggestSummary(run_id, user, len(faces.keys), named, len(faces.keys) - named - pool,
                          sum(c["size"] for c in clusters), len(people.clusters[UNCLUSTERED].faces), new_faces, full,
                          people.version, clusters)  # fmt: skip


def change_people(config: Config, output_uri: str, user: str, change) -> People:
    """Apply ``change`` (People -> None, raising :class:`InputError` to refuse) to the user's newest people table and
    commit it (compare-and-swap: applied again to a newer version if one came meanwhile)."""
    store = PeopleStore(config.people.root(output_uri), config.storage)
    space = embedder_class(config.embed.kind).space
    for _ in range(COMMIT_ATTEMPTS):
        people = store.load(user, space)
        if not people.version:
            raise InputError(f"{output_uri} has no suggested people of user {user!r}: run plvm people suggest first")
        change(people)
        if store.commit(people):
            return people
    raise BankError(f"the people table {store.location(user)} kept changing; nothing was written: run again")


def cluster_vectors(config: Config, output_uri: str, user: str, cluster: Cluster) -> tuple[np.ndarray, list[int]]:
    """The descriptors of ``cluster``'s faces and the positions of its match keys (``people.keys``, best first)."""
    faces = indexed_faces(config, output_uri, user, bank_version=0)
    at = faces.at()
    members = [at[key] for key in cluster.faces if key in at]
    if not members:
        raise InputError(f"the faces of cluster {cluster.cluster_id} are no longer in the face index: run plvm "
                         "people suggest again")  # fmt: skip
    vectors = faces.vectors[members]
    q = np.asarray(quality(config, faces, members))
    best = clustering.representative(vectors, q)
    return vectors, clustering.keys(vectors, q, best, config.people.keys)


def paths_of(config: Config, output_uri: str, user: str, keys: list[FaceKey]) -> list[str]:
    """The photo path of each face."""
    faces = indexed_faces(config, output_uri, user, bank_version=0)
    at = faces.at()
    return [faces.paths[at[key]] for key in keys]


def merge(config: Config, output_uri: str, user: str, cluster_id: int, into: int | None = None,
          name: str | None = None) -> str:  # fmt: skip
    """Merge cluster ``cluster_id`` into cluster ``into``, or into the enrolled person ``name`` (whose match keys
    gain the cluster's ``people.keys`` best faces, as a new version of the bank), under the user's bank lease. What
    was done, as a line."""
    user = user_of(user)
    if (into is None) == (name is None):
        raise InputError("give the cluster to merge into, or --name of an enrolled person (one of them)")
    run_id = new_run_id()
    banks = BankStore(config.bank, config.storage)
    where = PeopleStore(config.people.root(output_uri), config.storage).location(user)
    with banks.lease(user, run_id, "people merge", config.output.lease_expiry_s):
        if into is not None:
            if into == cluster_id:
                raise InputError(f"cannot merge cluster {cluster_id} into itself")

            def join(people: People) -> None:
                source, target = people.open_cluster(cluster_id, where), people.open_cluster(into, where)
                target.faces += source.faces
                source.faces, source.status, source.merged_into = [], "merged", into
                faces = indexed_faces(config, output_uri, user, bank_version=0)
                settle(config, faces, target, faces.at())

            people = change_people(config, output_uri, user, join)
            return f"merged cluster {cluster_id} into cluster {into}: {people.clusters[into].size} faces"
        people = PeopleStore(config.people.root(output_uri), config.storage).load(user, "")
        cluster = people.open_cluster(cluster_id, where)
        bank = banks.load(user)
        concept = bank.find(name) if bank is not None else None
        if concept is None:
            raise InputError(f"user {user!r} has no person named {name!r} in {banks.location(user)}: enroll them, "
                             "or use plvm enroll --from-cluster")  # fmt: skip
        vectors, chosen = cluster_vectors(config, output_uri, user, cluster)
        paths = paths_of(config, output_uri, user, [cluster.faces[i] for i in chosen])
        commit_bank(banks, bank, name, lambda c: add_keys(c, vectors[chosen], paths))

        def absorbed(people: People) -> None:
            mine = people.open_cluster(cluster_id, where)
            mine.status, mine.concept_id = "merged", concept.concept_id

        change_people(config, output_uri, user, absorbed)
        return f"merged cluster {cluster_id} into {name!r}: {len(chosen)} of its faces added as match keys (run plvm " \
               f"rematch {output_uri})"


def add_keys(concept, vectors: np.ndarray, paths: list[str]) -> None:
    concept.face_descriptors = np.concatenate([concept.face_descriptors, vectors])
    concept.references = [*concept.references, *paths]
    concept.updated_at = datetime.now(UTC)


def commit_bank(banks: BankStore, bank: Bank, name: str, change) -> Bank:
    """Apply ``change`` to the concept ``name`` of ``bank`` and commit the next version (again on the newest if
    another writer committed first)."""
    for _ in range(COMMIT_ATTEMPTS):
        concept = bank.find(name)
        if concept is None:
            raise InputError(f"user {bank.user_id!r} has no person named {name!r} in {banks.location(bank.user_id)}")
        change(concept)
        if banks.commit(bank):
            return bank
        bank = banks.load(bank.user_id)
    raise BankError(f"the concept bank {banks.location(bank.user_id)} kept changing; nothing was written")


def reject(config: Config, output_uri: str, user: str, name: str, photo: str | None = None, face: int | None = None,
           cluster_id: int | None = None) -> str:  # fmt: skip
    """Remember that faces are not ``name``: the faces of ``photo`` the bank names ``name`` (or its face ``face``),
    or every face of the cluster ``cluster_id``. Their descriptors become the concept's rejected faces, which no
    later naming gives ``name`` (a match key among them is dropped), as a new version of the bank, under the user's
    bank lease. What was done, as a line."""
    user = user_of(user)
    if (photo is None) == (cluster_id is None):
        raise InputError("give --photo PATH (with --face N, or the faces named NAME) or --cluster ID (one of them)")
    banks = BankStore(config.bank, config.storage)
    with banks.lease(user, new_run_id(), "people reject", config.output.lease_expiry_s):
        bank = banks.load(user)
        concept = bank.find(name) if bank is not None else None
        if concept is None:
            raise InputError(f"user {user!r} has no person named {name!r} in {banks.location(user)}")
        faces = indexed_faces(config, output_uri, user)
        if cluster_id is not None:
            people = PeopleStore(config.people.root(output_uri), config.storage).load(user, "")
            cluster = people.clusters.get(cluster_id)
            if cluster is None or cluster_id == UNCLUSTERED:
                raise InputError(f"{output_uri} has no cluster {cluster_id} of user {user!r}")
            at = faces.at()
            chosen = [at[key] for key in cluster.faces if key in at]
            what = f"the {len(chosen)} faces of cluster {cluster_id}"
        else:
            path = storage.normalize(photo)
            mine = [i for i, p in enumerate(faces.paths) if p == path]
            if not mine:
                raise InputError(f"{photo} is not a photo of user {user!r} in the face index of {output_uri}")
            if face is not None:
                chosen = [i for i in mine if faces.keys[i][1] == face]
                if not chosen:
                    raise InputError(f"{photo} has no face {face} (it has faces "
                                     f"{', '.join(str(faces.keys[i][1]) for i in mine)})")  # fmt: skip
            else:
                chosen = [i for i in mine if faces.concepts[i] == concept.concept_id]
                if not chosen:
                    raise InputError(f"no face of {photo} is named {name!r}: give --face N")
            what = f"{len(chosen)} face(s) of {photo}"
        vectors = faces.vectors[chosen]
        radius = config.match.rejected_radius

        def add(concept) -> None:
            from plvm_model.faces.matching import distance_matrix

            concept.rejected = np.concatenate([concept.rejections, vectors])
            kept = distance_matrix(concept.face_descriptors, [concept.rejected])[:, 0] > radius
            if not kept.any():
                raise InputError(f"every match key of {name!r} is among the rejected faces: plvm forget {name!r} "
                                 "instead, or enroll them again")  # fmt: skip
            concept.face_descriptors = concept.face_descriptors[kept]
            concept.references = [r for r, k in zip(concept.references, kept) if k] or concept.references[:1]
            concept.updated_at = datetime.now(UTC)

        bank = commit_bank(banks, bank, name, add)
    return f"{what} rejected for {name!r} (bank version {bank.version}); plvm rematch {output_uri} names them again"
