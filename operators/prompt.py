"""Stage 6, prompt: which recognised concepts a photo's prompt injects, with their soft tokens.

The soft tokens are read from the bank (computed at enrollment), never recomputed here.
At most ``max_concepts`` are injected: the closest matches, then ordered left to right as
they stand in the photo, so that "Mike is <...>. Susan is <...>." reads like the photo.
"""

from __future__ import annotations

import logging

from pydantic import Field

from operators.base import Resources, RowStage, Stage, StageConfig
from operators.rows import injected_record
from plvm_model.store.banks import BankCache, BankSource

log = logging.getLogger(__name__)


class PromptConfig(StageConfig):
    max_concepts: int = Field(
        4, ge=0, description="Recognised people injected per prompt: the closest matches, then ordered left to right."
    )


class ChooseConcepts(RowStage):
    """faces (matched) -> injected (name, soft tokens, head weight)."""

    needs = ("user_id", "faces")
    adds = ("injected",)

    def __init__(
        self,
        config: PromptConfig,
        banks: BankSource,
        aligner: str | None = None,
    ) -> None:
        self.max_concepts = config.max_concepts
        self.banks = BankCache(banks, aligner=aligner)

    def process(self, row: dict) -> None:
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
        self.stat_update("injected", len(chosen))


def stage(config: PromptConfig, banks: BankSource, aligner: str, tasks: Resources) -> Stage:
    args = (config, banks, aligner)
    return Stage.of("prompt", ChooseConcepts, args, tasks)
