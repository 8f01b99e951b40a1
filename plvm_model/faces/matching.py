"""Matching the faces of one photo against the concepts of one bank.

Each face goes to at most one concept and each concept to at most one face: a photo shows
a person once. The assignment minimises the total distance over the pairs under the
threshold (Hungarian algorithm), so two similar faces cannot both take the same name.

Distances can be normalised per concept by a *cohort scale*: how close other people's
faces come to that concept's reference. dlib's descriptor space is more crowded for some
faces than others (on the YoLLaVA people, different persons sit 0.51-0.55 apart, where
celebrity sets need 0.6 for profile shots), and one raw threshold cannot serve both;
``distance / scale`` against one relative threshold can.

:class:`MatchRule` is the one definition of how a face is named: the distance, the cohort
scale, the fallback for a concept without a cohort, and the threshold. The match stage, the
evaluation and the benchmarks all name faces through it.
"""

from __future__ import annotations

import math
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


def cohort_scale(references: np.ndarray, cohort: np.ndarray, min_distance: float, fraction: float) -> float | None:
    """Mean distance from a concept's references to its nearest cohort faces farther than ``min_distance``.

    The cohort is faces known or presumed to be other people (the bank's other concepts, and
    the faces of the run: those within ``min_distance`` are left out as probably the person
    herself). The nearest ``fraction`` of them (at least one) are averaged, so the scale is a
    lower-tail quantile that does not drift with the cohort's size. None without a cohort.
    """
    if len(cohort) == 0 or len(references) == 0:
        return None
    distances = distance_matrix(np.asarray(cohort, np.float32), [np.asarray(references, np.float32)])[:, 0]
    distances = np.sort(distances[distances > min_distance])
    if len(distances) == 0:
        return None
    return float(distances[: max(1, math.ceil(fraction * len(distances)))].mean())


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


@dataclass(frozen=True)
class MatchRule:
    """How faces are named: raw distance against ``threshold``, or (``cohort``) distance over the
    concept's cohort scale against ``relative_threshold``."""

    normalization: str
    """``cohort`` or ``none``."""
    threshold: float
    relative_threshold: float
    cohort_min_distance: float
    cohort_fraction: float
    rejected_radius: float
    """A face this close to one of a concept's rejected faces (``plvm people reject``) is never named it."""

    @property
    def cohort(self) -> bool:
        return self.normalization == "cohort"

    @property
    def limit(self) -> float:
        """The largest score at which a face is named."""
        return self.relative_threshold if self.cohort else self.threshold

    def scales(self, references: list[np.ndarray], run_faces: np.ndarray) -> list[float | None]:
        """Each concept's cohort scale: its cohort is the other concepts' references and ``run_faces``
        (the faces of the user's photos; those within ``cohort_min_distance`` are left out)."""
        out = []
        for j, own in enumerate(references):
            cohort = np.concatenate([*(r for i, r in enumerate(references) if i != j), run_faces])
            out.append(cohort_scale(own, cohort, self.cohort_min_distance, self.cohort_fraction))
        return out

    def scores(self, distances: np.ndarray, scales: list[float | None] | None = None) -> np.ndarray:
        """The (faces, concepts) scores compared with :attr:`limit`: raw distances, or each concept's column
        divided by its scale (a concept without one by ``threshold / relative_threshold``, so that the raw
        ``threshold`` applies to it)."""
        if not self.cohort:
            return distances
        fallback = self.threshold / self.relative_threshold
        divisor = [s or fallback for s in (scales or [None] * distances.shape[1])]
        return distances / np.asarray(divisor, np.float32).reshape(1, -1)

    def name(
        self,
        vectors: np.ndarray,
        references: list[np.ndarray],
        scales: list[float | None] | None = None,
        rejected: list[np.ndarray] | None = None,
    ) -> tuple[list[Match], np.ndarray, np.ndarray]:
        """The faces' matches (one concept per face, one face per concept), distances and scores; a face within
        :attr:`rejected_radius` of one of a concept's ``rejected`` faces is not named that concept."""
        distances = distance_matrix(vectors, references)
        scores = self.scores(distances, scales)
        allowed = scores
        if rejected is not None and any(len(r) for r in rejected):
            barred = distance_matrix(vectors, rejected) <= self.rejected_radius
            allowed = np.where(barred, np.inf, scores)
        return assign(allowed, self.limit), distances, scores
