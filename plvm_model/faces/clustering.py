"""Clustering the faces nobody named into suggested people, as photo managers do (Immich, PhotoPrism).

Faces are dlib descriptors (Euclidean distance; one person's faces lie mostly within 0.45 of
each other, different persons' 0.45-0.8 apart). The clustering is dlib's Chinese whispers
(``dlib.chinese_whispers``, as dlib's own face clustering example) over the graph whose edges
join the faces at most ``threshold`` apart: each face takes the label most of its neighbours
hold, round after round, so a cluster is a densely joined group, and a chain of single edges
(what merges two people in DBSCAN, a single-linkage method) does not hold two groups together.
Groups smaller than ``min_size`` stay unclustered.

Incremental (:func:`grow`): clusters keep their ids and faces; a new face joins the open
cluster of its nearest clustered face when that face is within ``join_threshold``. The new
faces left are clustered by Chinese whispers with the faces near them: earlier unclustered
faces within ``threshold`` (and their own neighbours) and every face of the clusters that a
face of theirs is within ``threshold`` of. A group that holds clustered faces joins their
cluster (the one most of them are in), with the earlier unclustered faces in it; a group
without, of at least ``min_size`` faces, is a new cluster. The work grows with the new faces, not with the archive.
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


def edges(vectors: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """The pairs of faces at most ``threshold`` apart (i < j), and each face with itself."""
    out = [(i, i) for i in range(len(vectors))]
    for start in range(0, len(vectors), CHUNK):
        block = distances(vectors[start : start + CHUNK], vectors)
        rows, cols = np.nonzero(block <= threshold)
        out.extend((int(start + r), int(c)) for r, c in zip(rows, cols) if start + r < c)
    return out


def whispers(vectors: np.ndarray, threshold: float, min_size: int) -> np.ndarray:
    """dlib's Chinese whispers over the graph of faces at most ``threshold`` apart: labels from 0, -1 for the faces
    of groups smaller than ``min_size``."""
    if len(vectors) == 0:
        return np.zeros(0, np.int64)
    import dlib

    found = np.asarray(dlib.chinese_whispers(edges(np.asarray(vectors, np.float32), threshold)), np.int64)
    labels, sizes = np.unique(found, return_counts=True)
    big = {int(label): n for n, label in enumerate(labels[sizes >= min_size])}
    return np.asarray([big.get(int(label), -1) for label in found], np.int64)


@dataclass(frozen=True)
class Grown:
    """What :func:`grow` made of the new faces."""

    joined: np.ndarray
    """For each new face, the label of the cluster it joined (-1: none)."""
    adopted: list[tuple[int, int]]
    """Earlier unclustered faces that joined a cluster with new faces: (index, label)."""
    formed: list[tuple[np.ndarray, np.ndarray]]
    """Each new cluster: its new faces' indices and its earlier unclustered faces' indices."""
    unclustered: np.ndarray
    """The new faces left unclustered."""


def grow(
    clustered: np.ndarray,
    labels: np.ndarray,
    unclustered: np.ndarray,
    new: np.ndarray,
    threshold: float,
    join_threshold: float,
    min_size: int,
) -> Grown:
    """The incremental pass: ``new`` faces against the ``clustered`` faces (their clusters' ``labels``) and the
    earlier ``unclustered`` ones (see the module)."""
    distance, at = nearest(new, clustered)
    joins = distance <= join_threshold
    joined = np.where(joins, labels[np.maximum(at, 0)] if len(labels) else -1, -1)
    rest = np.flatnonzero(~joins)
    formed: list[tuple[np.ndarray, np.ndarray]] = []
    adopted: list[tuple[int, int]] = []
    if not len(rest):
        return Grown(joined, adopted, formed, rest)
    near = within(new[rest], unclustered, threshold)  # earlier faces a new face joins
    reach = within(unclustered[near], unclustered, threshold) if len(near) else near  # and their neighbours
    old = np.union1d(near, reach)
    touching = within(np.concatenate([new[rest], unclustered[old]]), clustered, threshold)
    anchors = np.flatnonzero(np.isin(labels, labels[touching]))  # every face of the clusters they touch
    pool = np.concatenate([new[rest], unclustered[old], clustered[anchors]])
    found = whispers(pool, threshold, 1)
    edge = len(rest) + len(old)
    for label in sorted(set(found.tolist())):
        members = np.flatnonzero(found == label)
        fresh = rest[members[members < len(rest)]]
        earlier = old[members[(members >= len(rest)) & (members < edge)] - len(rest)]
        touched = labels[anchors[members[members >= edge] - edge]]
        if not len(fresh):  # earlier faces only: as they were
            continue
        if len(touched):  # the group holds faces of a cluster: the new and earlier faces join it
            target = int(np.bincount(touched).argmax())
            joined[fresh] = target
            adopted.extend((int(i), target) for i in earlier)
        elif len(fresh) + len(earlier) >= min_size:
            formed.append((fresh, earlier))
    left = np.setdiff1d(rest, np.flatnonzero(joined >= 0))
    taken = np.concatenate([f[0] for f in formed]) if formed else np.zeros(0, np.int64)
    return Grown(joined, adopted, formed, np.setdiff1d(left, taken))


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
