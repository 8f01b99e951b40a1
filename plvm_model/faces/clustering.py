"""Clustering the faces nobody named into suggested people, as photo managers do (Immich, PhotoPrism).

Faces are dlib descriptors (Euclidean distance; one person's faces lie within about 0.5 of
each other, different persons' 0.5-0.7 apart). The clustering is scikit-learn's DBSCAN: a
face with at least ``min_samples`` faces (itself included) within ``eps`` is a core face, and
a cluster is the core faces that reach each other through such neighbourhoods, with the
faces within ``eps`` of them. Faces no cluster takes stay unclustered.

Incremental (:func:`grow`): clusters keep their ids and faces; a new face joins the open
cluster of its nearest clustered face when that face is within ``join_eps``; the new faces
left form new clusters by DBSCAN over them and the earlier unclustered faces near them. Only
a new face can make a face a core one, so DBSCAN over the new faces, their neighbours and
those neighbours' neighbours finds every cluster the new faces make: the work grows with the
new faces, not with the archive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 4096
"""Queries compared at once (a CHUNK x points distance block in memory)."""


def distances(queries: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(queries, points) Euclidean distances, float32."""
    q, p = np.asarray(queries, np.float32), np.asarray(points, np.float32)
    squared = (q * q).sum(1)[:, None] + (p * p).sum(1)[None, :] - 2.0 * q @ p.T
    return np.sqrt(np.maximum(squared, 0.0))


def nearest(queries: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's nearest point: (distance, index); (inf, -1) when there are no points."""
    n = len(queries)
    if not len(points):
        return np.full(n, np.inf, np.float32), np.full(n, -1, np.int64)
    best, at = np.empty(n, np.float32), np.empty(n, np.int64)
    for start in range(0, n, CHUNK):
        block = distances(queries[start : start + CHUNK], points)
        at[start : start + CHUNK] = block.argmin(1)
        best[start : start + CHUNK] = block[np.arange(len(block)), at[start : start + CHUNK]]
    return best, at


def within(queries: np.ndarray, points: np.ndarray, eps: float) -> np.ndarray:
    """The indices of the points within ``eps`` of any query."""
    found = np.zeros(len(points), bool)
    if len(queries) and len(points):
        for start in range(0, len(queries), CHUNK):
            found |= (distances(queries[start : start + CHUNK], points) <= eps).any(0)
    return np.flatnonzero(found)


def dbscan(vectors: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """scikit-learn's DBSCAN labels (-1: unclustered), numbered from 0 in order of first appearance."""
    if len(vectors) == 0:
        return np.zeros(0, np.int64)
    from sklearn.cluster import DBSCAN

    return DBSCAN(eps=eps, min_samples=min_samples, metric="euclidean").fit_predict(np.asarray(vectors, np.float32))


@dataclass(frozen=True)
class Grown:
    """What :func:`grow` made of the new faces."""

    joined: np.ndarray
    """For each new face, the label of the clustered face it joined (-1: none)."""
    formed: list[tuple[np.ndarray, np.ndarray]]
    """Each new cluster: its new faces' indices and its unclustered faces' indices."""
    unclustered: np.ndarray
    """The new faces left unclustered."""


def grow(
    clustered: np.ndarray,
    labels: np.ndarray,
    unclustered: np.ndarray,
    new: np.ndarray,
    eps: float,
    join_eps: float,
    min_samples: int,
) -> Grown:
    """The incremental pass: ``new`` faces against the ``clustered`` faces (their clusters' ``labels``) and the
    earlier ``unclustered`` ones (see the module)."""
    distance, at = nearest(new, clustered)
    joins = distance <= join_eps
    joined = np.where(joins, labels[np.maximum(at, 0)] if len(labels) else -1, -1)
    rest = np.flatnonzero(~joins)
    formed: list[tuple[np.ndarray, np.ndarray]] = []
    if not len(rest):
        return Grown(joined, formed, rest)
    near = within(new[rest], unclustered, eps)  # unclustered faces a new face may make core
    border = within(unclustered[near], unclustered, eps) if len(near) else near  # and what those reach
    old = np.union1d(near, border)
    pool = np.concatenate([new[rest], unclustered[old]])
    found = dbscan(pool, eps, min_samples)
    for label in sorted(set(found.tolist()) - {-1}):
        members = np.flatnonzero(found == label)
        new_members = rest[members[members < len(rest)]]
        if len(new_members):  # a cluster of earlier faces only was one before: never here
            formed.append((new_members, old[members[members >= len(rest)] - len(rest)]))
    taken = np.concatenate([f[0] for f in formed]) if formed else np.zeros(0, np.int64)
    return Grown(joined, formed, np.setdiff1d(rest, taken))


def face_quality(box: list[float], score: float, good_px: float) -> float:
    """A face's quality in [0, 1]: its detection score times how far its shorter side reaches ``good_px``."""
    x1, y1, x2, y2 = box
    return float(score) * min(1.0, min(x2 - x1, y2 - y1) / good_px)


def representative(vectors: np.ndarray, quality: np.ndarray) -> int:
    """The cluster's best face: of the half of its faces nearest the cluster's mean, the one of best quality."""
    if len(vectors) == 0:
        return -1
    distance = np.linalg.norm(vectors - vectors.mean(0), axis=1)
    central = np.argsort(distance, kind="stable")[: max(1, (len(vectors) + 1) // 2)]
    return int(central[np.argmax(quality[central])])


def keys(vectors: np.ndarray, quality: np.ndarray, best: int, count: int) -> list[int]:
    """``count`` faces of a cluster as a person's match keys: ``best`` first, then, of the three quarters of the
    faces nearest the mean (outliers left out), each time the one farthest from the keys chosen (spread over the
    person's looks)."""
    distance = np.linalg.norm(vectors - vectors.mean(0), axis=1)
    inner = [int(i) for i in np.argsort(distance, kind="stable")[: max(1, -(-3 * len(vectors) // 4))]]
    chosen = [best]
    while len(chosen) < min(count, len(vectors)):
        left = [i for i in inner if i not in chosen] or [i for i in range(len(vectors)) if i not in chosen]
        gaps = distances(vectors[left], vectors[chosen]).min(1) * np.maximum(quality[left], 1e-3)
        chosen.append(left[int(np.argmax(gaps))])
    return chosen
