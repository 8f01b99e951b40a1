"""Stage 6, prompt: which recognised concepts a photo's prompt injects, with their soft tokens.

The soft tokens are read from the bank (computed at enrollment), never recomputed here.
At most ``max_concepts`` are injected: the closest matches, then ordered left to right as
they stand in the photo, so that "Mike is <...>. Susan is <...>." reads like the photo.
"""

from __future__ import annotations

import logging

import pyarrow as pa
from pydantic import Field

from operators.banks import BankCache, BankSource
from operators.base import Resources, Stage, StageConfig
from operators.rows import injected_record, map_rows

log = logging.getLogger(__name__)


class PromptConfig(StageConfig):
    max_concepts: int = Field(
        4, ge=0, description="Recognised people injected per prompt: the closest matches, then ordered left to right."
    )


class ChooseConcepts:
    """faces (matched) -> injected (name, soft tokens, head weight)."""

    def __init__(
        self,
        config: PromptConfig,
        banks: BankSource,
        aligner: str | None = None,
    ) -> None:
        self.max_concepts = config.max_concepts
        self.banks = BankCache(banks, aligner=aligner)

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
        row["injected"] = [injected_record(concepts[face["concept_id"]]) for face in chosen]

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows(batch, self._choose, add=["injected"])


def stage(config: PromptConfig, banks: BankSource, aligner: str, tasks: Resources) -> Stage:
    args = (config, banks, aligner)
    return Stage("prompt", ChooseConcepts, args, tasks, needs=("user_id", "faces"), adds=("injected",))
