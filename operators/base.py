"""Config base for stages, and the resources a stage asks Ray for."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    """A config section: unknown keys are errors that name the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(StageConfig):
    """How a stage runs on Ray: actors (or parallel tasks), CPUs and GPUs each, rows per batch."""

    concurrency: int = Field(
        1, ge=1, description="Actors in the stage's pool (for `tasks`: the most tasks of each stage at once)."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each actor or task.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each actor or task.")
    batch_size: int = Field(8, ge=1, description="Rows per batch.")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads in each actor of a stage that runs torch (null: its CPU share, at least 1).",
    )

    def torch_threads(self) -> int:
        return self.threads or max(1, round(self.num_cpus))
