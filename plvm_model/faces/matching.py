"""Matching the faces of one photo against the concepts of one bank.

Each face goes to at most one concept and each concept to at most one face: a photo shows
a person once. The assignment minimises the total distance over the pairs under the
threshold (Hungarian algorithm), so two similar faces cannot both take the same name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class Match:
    concept: int | None
    """Index of the concept assigned to the face, or None."""
    distance: float | None
    """Distance to the assigned concept, or to the nearest one when none was assigned."""


def distance_matrix(faces: np.ndarray, concepts: list[np.ndarray]) -> np.ndarray:
    """(faces, concepts) Euclidean distance from each face to each concept's nearest reference."""
    out = np.full((len(faces), len(concepts)), np.inf, np.float32)
    if len(faces) == 0:
        return out
    for j, refs in enumerate(concepts):
        if len(refs):
            diff = faces[:, None, :].astype(np.float32) - refs[None, :, :].astype(np.float32)
            out[:, j] = np.sqrt((diff**2).sum(-1)).min(1)
    return out


def assign(distances: np.ndarray, threshold: float) -> list[Match]:
    """One :class:`Match` per face (row) for a face x concept distance matrix."""
    n_faces, n_concepts = distances.shape
    if n_concepts == 0:
        return [Match(None, None) for _ in range(n_faces)]
    nearest = distances.min(1)
    allowed = distances <= threshold
    matches = [Match(None, float(d) if np.isfinite(d) else None) for d in nearest]
    if not allowed.any():
        return matches
    cost = np.where(allowed, distances, threshold * 4 + 1e3)
    rows, cols = linear_sum_assignment(cost)
    for r, c in zip(rows, cols):
        if allowed[r, c]:
            matches[r] = Match(int(c), float(distances[r, c]))
    return matches
