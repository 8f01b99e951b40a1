"""Stage 5, match: each face against its photo owner's concept bank, and no other user's.

A bank is read once per worker process and user, and cached for the run. A photo whose
user has no bank, or an empty one, gets an error; a damaged bank is refused before the run
starts (see :func:`check_banks`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from operators.base import StageConfig
from operators.rows import RowError, map_rows
from plvm_model import storage
from plvm_model.bank import BankError, ConceptBank, UserBank
from plvm_model.faces.matching import assign, distance_matrix


class MatchConfig(StageConfig):
    threshold: float = Field(0.6, gt=0)
    """Largest descriptor distance at which a face is named."""


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


class MatchFaces:
    """faces (with embeddings) + user_id -> each face's concept, concept_id, distance; ``concepts``."""

    def __init__(
        self,
        config: MatchConfig,
        bank_uri: str,
        storage_options: storage.StorageOptions | None = None,
        embedder_space: str | None = None,
    ) -> None:
        self.threshold = config.threshold
        self.banks = BankCache(bank_uri, storage_options, embedder_space)

    def _match(self, row: dict) -> None:
        bank = self.banks.get(row["user_id"])
        faces = [f for f in row["faces"] if f.get("embedding") is not None]
        row["concepts"] = []
        if not faces:
            return
        vectors = np.asarray([f["embedding"] for f in faces], np.float32)
        distances = distance_matrix(vectors, [c.face_descriptors for c in bank.concepts])
        for face, match in zip(faces, assign(distances, self.threshold)):
            face["distance"] = match.distance
            if match.concept is not None:
                concept = bank.concepts[match.concept]
                face["concept"], face["concept_id"] = concept.name, concept.concept_id
                row["concepts"].append(concept.name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows("match", batch, self._match, add=["concepts"])
