"""Clustering the faces nobody named: Chinese whispers, the incremental pass, and the people table's versions."""

from __future__ import annotations

import numpy as np

from plvm_model.faces import clustering
from plvm_model.store.people import Cluster, People, PeopleStore


def people_faces(rng: np.random.Generator, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` identities of ``size`` faces each (within about 0.3 of each other, identities about 0.85 apart)."""
    centres = rng.normal(size=(count, 128))
    centres *= 0.6 / np.linalg.norm(centres, axis=1, keepdims=True)
    faces = np.concatenate([c + rng.normal(0, 0.018, (size, 128)) for c in centres]).astype(np.float32)
    return faces, np.repeat(np.arange(count), size)


def test_the_incremental_pass_finds_what_clustering_everything_finds():
    rng = np.random.default_rng(0)
    faces, truth = people_faces(rng, 12, 8)
    order = rng.permutation(len(faces))
    faces, truth = faces[order], truth[order]
    full = clustering.whispers(faces, 0.44, 3)
    assert len(set(full.tolist())) == 12 and (full >= 0).all()
    old, new = faces[:60], faces[60:]
    first = clustering.whispers(old, 0.44, 3)
    clustered, noise = np.flatnonzero(first >= 0), np.flatnonzero(first < 0)
    grown = clustering.grow(old[clustered], first[clustered], old[noise], new, 0.44, 0.42, 3)
    labels = np.full(len(faces), -1)
    labels[clustered] = first[clustered]
    labels[60:][grown.joined >= 0] = grown.joined[grown.joined >= 0]
    for i, label in grown.adopted:
        labels[noise[i]] = label
    for n, (members, earlier) in enumerate(grown.formed):
        labels[60 + members] = 100 + n
        labels[noise[earlier]] = 100 + n
    # the same partition as clustering all the faces at once, with the first run's ids kept
    pairs = lambda lab: {(i, j) for i in range(len(lab)) for j in range(i) if lab[i] == lab[j] >= 0}  # noqa: E731
    assert pairs(labels) == pairs(full) == pairs(truth)
    assert (labels[clustered] == first[clustered]).all()


def test_keys_start_with_the_best_face_and_spread_over_the_cluster():
    rng = np.random.default_rng(1)
    faces, _ = people_faces(rng, 1, 20)
    quality = np.linspace(0.5, 1.0, 20)
    best = clustering.representative(faces, quality)
    keys = clustering.keys(faces, quality, best, 5)
    assert keys[0] == best and len(set(keys)) == 5


def test_a_people_table_commits_by_compare_and_swap_and_keeps_two_versions(tmp_path):
    store = PeopleStore(str(tmp_path))
    people = People("ann", "space")
    cluster = people.new_cluster()
    cluster.faces, cluster.quality, cluster.representative = [("a" * 64, 0), ("b" * 64, 1)], [0.9, 0.8], 0
    assert store.commit(people) and people.version == 1
    stale = store.load("ann", "space")
    people.clusters[cluster.cluster_id].faces.append(("c" * 64, 0))
    people.clusters[cluster.cluster_id].quality.append(0.7)
    assert store.commit(people) and store.commit(people)
    assert not store.commit(stale), "a writer of an older version loses"
    assert sorted(store.versions("ann")) == [2, 3]
    read = store.load("ann", "space")
    assert read.version == 3 and read.next_id == 2 and read.clusters[1].faces[-1] == ("c" * 64, 0)
    assert isinstance(read.clusters[1], Cluster) and read.suggestions()[0].best == ("a" * 64, 0)
