"""Stage 5, match: each face against its photo owner's concept bank, and no other user's.

A bank is read once per worker process and user, and cached for the run. A photo whose
user has no bank, or an empty one, gets an error; a damaged bank is refused before the run
starts (see :func:`check_banks`).

With ``normalization: cohort`` (the default) a face is named when its distance divided by
the concept's cohort scale is at most ``relative_threshold``. The scale of a concept is
measured on its user's cohort: the bank's other concepts and every face of the user's
photos in the run farther than ``cohort_min_distance`` from the concept (see
``plvm_model.faces.matching.cohort_scale``). It needs all of a user's faces first, so the
pipeline embeds every photo before it matches any (the cohort barrier,
``operators.cohort``). A concept without a cohort falls back to the raw ``threshold``.
The rule itself is :class:`plvm_model.faces.matching.MatchRule`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from operators.base import FromRun, Resources, RowStage, Stage, StageConfig
from plvm_model.faces.matching import MatchRule
from plvm_model.store.banks import BankCache, BankSource


class MatchConfig(StageConfig):
    normalization: Literal["cohort", "none"] = Field(
        "cohort",
        description="`cohort`: a face is named when distance / its concept's cohort scale <= `relative_threshold` "
        "(see Evaluation: recognition); `none`: when the raw distance <= `threshold`.",
    )
    threshold: float = Field(
        0.504,
        gt=0,
        description="Largest raw descriptor distance at which a face is named (`none`, or a concept without a cohort).",
    )
    relative_threshold: float = Field(
        0.887, gt=0, description="Largest distance / cohort scale at which a face is named."
    )
    cohort_min_distance: float = Field(
        0.55,
        ge=0,
        description="Run faces at most this far from a concept are left out of its cohort (probably the person).",
    )
    cohort_fraction: float = Field(
        0.02, gt=0, le=1, description="The nearest share of the cohort (at least one) that the scale averages."
    )
    rejected_radius: float = Field(
        0.05,
        ge=0,
        description="A face at most this far from a face the owner rejected for a person (`plvm people reject`) is "
        "never named that person: the same face, in any copy of the photo (another person's faces are 0.3 and more "
        "apart).",
    )
    cohort_gather_mb: float = Field(
        256,
        ge=0,
        description="A run whose embedded faces take at most this much is scaled in the driver; a larger one by a "
        "groupby on the cluster (a shuffle, which costs a small run more than its matching).",
    )

    def rule(self) -> MatchRule:
        """The naming rule these settings define."""
        return MatchRule(self.normalization, self.threshold, self.relative_threshold, self.cohort_min_distance,
                         self.cohort_fraction, self.rejected_radius)  # fmt: skip


Scales = dict[tuple[str, str], float]
"""(user_id, concept_id) -> cohort scale."""


class MatchFaces(RowStage):
    """faces (with embeddings) + user_id -> each face's concept, concept_id, distance; ``concepts``."""

    needs = ("user_id", "faces")
    adds = ("concepts",)

    def __init__(
        self,
        config: MatchConfig,
        banks: BankSource,
        embedder_space: str | None = None,
        scales: Scales | None = None,
    ) -> None:
        self.rule = config.rule()
        self.scales = scales or {}
        self.banks = BankCache(banks, embedder_space)

    def process(self, row: dict) -> None:
        bank = self.banks.get(row["user_id"])
        faces = [f for f in row["faces"] if f.get("embedding")]  # a forgotten face's is empty: never named
        row["concepts"] = []
        if not faces:
            return
        vectors = np.asarray([f["embedding"] for f in faces], np.float32)
        scales = [self.scales.get((row["user_id"], c.concept_id)) for c in bank.concepts]
        references = [c.face_descriptors for c in bank.concepts]
        matches, distances, scores = self.rule.name(vectors, references, scales, [c.rejections for c in bank.concepts])
        for i, (face, match) in enumerate(zip(faces, matches)):
            nearest = match.concept if match.concept is not None else int(scores[i].argmin())
            face["distance"] = float(distances[i, nearest])
            face["relative_distance"] = float(scores[i, nearest]) if self.rule.cohort else None
            if match.concept is not None:
                concept = bank.concepts[match.concept]
                face["concept"], face["concept_id"] = concept.name, concept.concept_id
                row["concepts"].append(concept.name)
        self.stat_update("named", len(row["concepts"]))


def stage(config: MatchConfig, banks: BankSource, embedder_space: str, tasks: Resources) -> Stage:
    """The match stage; with cohort normalization its scales come from the cohort barrier."""
    scales = FromRun("scales") if config.normalization == "cohort" else None
    args = (config, banks, embedder_space, scales)
    return Stage.of("match", MatchFaces, args, tasks)
