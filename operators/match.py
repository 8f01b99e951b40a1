"""Stage 5, match: each face against its photo owner's concept bank, and no other user's.

A bank is read once per worker process and user, and cached for the run. A photo whose
user has no bank, or an empty one, gets an error; a damaged bank is refused before the run
starts (see :func:`check_banks`).

With ``normalization: cohort`` (the default) a face is named when its distance divided by
the concept's cohort scale is at most ``relative_threshold``. The scale of a concept is
measured on its user's cohort: the bank's other concepts and every face of the user's
photos in the run farther than ``cohort_min_distance`` from the concept (see
``plvm_model.faces.matching.cohort_scale``). It needs all of a user's faces first, so the
pipeline embeds every photo before it matches any (:class:`CohortScales`). A concept
without a cohort falls back to the raw ``threshold``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from operators.base import StageConfig
from operators.rows import RowError, map_rows
from plvm_model import storage
from plvm_model.bank import BankError, ConceptBank, UserBank
from plvm_model.faces.matching import assign, cohort_scale, distance_matrix


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
    cohort_gather_mb: float = Field(
        256,
        ge=0,
        description="A run whose embedded faces take at most this much is scaled in the driver; a larger one by a "
        "groupby on the cluster (a shuffle, which costs a small run more than its matching).",
    )


class BankCache:
    """Users' banks, loaded on first use; a usable bank or a :class:`RowError` for each user.

    ``embedder_space`` and ``aligner``, when given, are checked against the bank's.
    """

    def __init__(
        self,
        uri: str,
        storage_options: storage.StorageOptions | None = None,
        embedder_space: str | None = None,
        aligner: str | None = None,
    ) -> None:
        self.bank = ConceptBank(uri, storage_options)
        self.embedder_space = embedder_space
        self.aligner = aligner
        self._cache: dict[str, UserBank | RowError] = {}

    def _load(self, user_id: str) -> UserBank | RowError:
        try:
            bank = self.bank.load(user_id)
        except BankError as error:
            return RowError("bank_error", str(error))
        if bank is None:
            return RowError("unknown_user", f"user {user_id!r} has no concept bank at {self.bank.location(user_id)}")
        if not bank.concepts:
            return RowError("empty_bank", f"the concept bank of user {user_id!r} has no concepts")
        try:
            bank.check_compatible(embedder=self.embedder_space, aligner=self.aligner)
        except BankError as error:
            return RowError("bank_error", str(error))
        return bank

    def get(self, user_id: str) -> UserBank:
        if user_id not in self._cache:
            self._cache[user_id] = self._load(user_id)
        found = self._cache[user_id]
        if isinstance(found, RowError):
            raise found
        return found


def check_banks(users: list[str], bank_uri: str, storage_options: storage.StorageOptions | None) -> None:
    """Refuse to start if any of ``users`` has a bank that exists but cannot be read."""
    bank = ConceptBank(bank_uri, storage_options)
    for user in sorted(set(users)):
        bank.load(user)  # raises BankError naming the file


Scales = dict[tuple[str, str], float]
"""(user_id, concept_id) -> cohort scale."""


SCALE_SCHEMA = pa.schema([("user_id", pa.string()), ("concept_id", pa.string()), ("scale", pa.float64())])


class CohortScales:
    """All rows of one user (with face embeddings) -> (user_id, concept_id, scale) per concept of the bank."""

    def __init__(
        self,
        config: MatchConfig,
        bank_uri: str,
        storage_options: storage.StorageOptions | None = None,
        embedder_space: str | None = None,
    ) -> None:
        self.config = config
        self.banks = BankCache(bank_uri, storage_options, embedder_space)

    def __call__(self, group: pa.Table) -> pa.Table:
        out: dict[str, list] = {"user_id": [], "concept_id": [], "scale": []}
        user = group.column("user_id")[0].as_py() if group.num_rows else None
        try:
            bank = self.banks.get(user)
        except (RowError, ValueError):  # no usable bank, or no valid user id: the match stage reports it
            return pa.table(out, schema=SCALE_SCHEMA)
        faces = [f["embedding"] for faces in group.column("faces").to_pylist() for f in faces or [] if f["embedding"]]
        run = np.asarray(faces, np.float32).reshape(-1, bank.concepts[0].face_descriptors.shape[1])
        for concept in bank.concepts:
            others = [c.face_descriptors for c in bank.concepts if c is not concept]
            cohort = np.concatenate([*others, run]) if others else run
            scale = cohort_scale(
                concept.face_descriptors, cohort, self.config.cohort_min_distance, self.config.cohort_fraction
            )
            if scale is not None:
                out["user_id"].append(user)
                out["concept_id"].append(concept.concept_id)
                out["scale"].append(scale)
        return pa.table(out, schema=SCALE_SCHEMA)


def cohort_scales(
    rows,
    config: MatchConfig,
    bank_uri: str,
    storage_options: storage.StorageOptions | None = None,
    embedder_space: str | None = None,
) -> Scales:
    """Every user's concept scales from ``rows`` with face embeddings (a materialized Ray dataset or a table)."""
    scales = CohortScales(config, bank_uri, storage_options, embedder_space)
    if not isinstance(rows, pa.Table) and rows.size_bytes() <= config.cohort_gather_mb * 2**20:
        import ray

        rows = pa.concat_tables([t.select(["user_id", "faces"]) for t in ray.get(rows.to_arrow_refs())])
    if isinstance(rows, pa.Table):
        users = pc.unique(rows.column("user_id")).to_pylist()
        found = [scales(rows.filter(pc.equal(rows.column("user_id"), user))) for user in users]
        out = pa.concat_tables(found).to_pylist() if found else []
    else:
        # one partition per block at most
        partitions = max(1, min(200, rows.num_blocks()))
        grouped = rows.select_columns(["user_id", "faces"]).groupby("user_id", num_partitions=partitions)
        out = grouped.map_groups(scales.__call__, batch_format="pyarrow").take_all()
    return {(r["user_id"], r["concept_id"]): r["scale"] for r in out}


class MatchFaces:
    """faces (with embeddings) + user_id -> each face's concept, concept_id, distance; ``concepts``."""

    def __init__(
        self,
        config: MatchConfig,
        bank_uri: str,
        storage_options: storage.StorageOptions | None = None,
        embedder_space: str | None = None,
        scales: Scales | None = None,
    ) -> None:
        self.config = config
        self.scales = scales or {}
        self.banks = BankCache(bank_uri, storage_options, embedder_space)

    def _match(self, row: dict) -> None:
        bank = self.banks.get(row["user_id"])
        faces = [f for f in row["faces"] if f.get("embedding") is not None]
        row["concepts"] = []
        if not faces:
            return
        vectors = np.asarray([f["embedding"] for f in faces], np.float32)
        distances = distance_matrix(vectors, [c.face_descriptors for c in bank.concepts])
        relative = self.config.normalization == "cohort"
        if relative:
            fallback = self.config.threshold / self.config.relative_threshold
            scale = [self.scales.get((row["user_id"], c.concept_id), fallback) for c in bank.concepts]
            scores, threshold = distances / np.asarray(scale, np.float32), self.config.relative_threshold
        else:
            scores, threshold = distances, self.config.threshold
        for i, (face, match) in enumerate(zip(faces, assign(scores, threshold))):
            nearest = match.concept if match.concept is not None else int(scores[i].argmin())
            face["distance"] = float(distances[i, nearest])
            face["relative_distance"] = float(scores[i, nearest]) if relative else None
            if match.concept is not None:
                concept = bank.concepts[match.concept]
                face["concept"], face["concept_id"] = concept.name, concept.concept_id
                row["concepts"].append(concept.name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows("match", batch, self._match, add=["concepts"])
