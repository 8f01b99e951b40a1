"""Stage 6, prompt: which recognised concepts a photo's prompt injects, with their soft tokens.

The soft tokens are read from the bank (computed at enrollment), never recomputed here.
At most ``max_concepts`` are injected: the closest matches, then ordered left to right as
they stand in the photo, so that "Mike is <...>. Susan is <...>." reads like the photo.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
from pydantic import Field

from operators.base import StageConfig
from operators.match import BankCache
from operators.rows import map_rows
from plvm_model import storage
from plvm_model.injection import ConceptTokens

log = logging.getLogger(__name__)


class PromptConfig(StageConfig):
    max_concepts: int = Field(
        4, ge=0, description="Recognised people injected per prompt: the closest matches, then ordered left to right."
    )


def injected_tokens(row: dict) -> list[ConceptTokens]:
    """The row's injected concepts as :class:`ConceptTokens`, in prompt order."""
    out = []
    for item in row["injected"] or []:
        soft = np.frombuffer(item["soft_tokens"], np.float32).reshape(-1, item["hidden"])
        head = np.frombuffer(item["head_weight"], np.float32) if item["head_weight"] else None
        out.append(ConceptTokens(item["name"], soft, head))
    return out


class ChooseConcepts:
    """faces (matched) -> injected (name, soft tokens, head weight)."""

    def __init__(
        self,
        config: PromptConfig,
        bank_uri: str,
        storage_options: storage.StorageOptions | None = None,
        aligner: str | None = None,
    ) -> None:
        self.max_concepts = config.max_concepts
        self.banks = BankCache(bank_uri, storage_options, aligner=aligner)

    def _choose(self, row: dict) -> None:
        matched = [f for f in row["faces"] if f.get("concept_id")]
        chosen = sorted(matched, key=lambda f: f["distance"])[: self.max_concepts]
        if len(chosen) < len(matched):
            dropped = [f["concept"] for f in matched if f not in chosen]
            log.info(
                "%s: %d concepts recognised, injecting the %d closest (%s), leaving out %s",
                row["path"], len(matched), len(chosen), ", ".join(f["concept"] for f in chosen), ", ".join(dropped),
            )  # fmt: skip
        chosen.sort(key=lambda f: f["box"][0])
        concepts = {c.concept_id: c for c in self.banks.get(row["user_id"]).concepts} if chosen else {}
        row["injected"] = []
        for face in chosen:
            concept = concepts[face["concept_id"]]
            row["injected"].append(
                {
                    "concept_id": concept.concept_id,
                    "name": concept.name,
                    "soft_tokens": np.ascontiguousarray(concept.soft_tokens, np.float32).tobytes(),
                    "head_weight": np.ascontiguousarray(concept.head_weight, np.float32).tobytes(),
                    "hidden": concept.soft_tokens.shape[1],
                }
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows("prompt", batch, self._choose, add=["injected"])
