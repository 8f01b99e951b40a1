"""Config base for stages, and the resources a stage asks Ray for."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    """A config section: unknown keys are errors that name the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(StageConfig):
    """How a stage runs on Ray: actors (or parallel tasks), CPUs and GPUs each, rows per batch."""

    concurrency: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    threads: int | None = Field(None, ge=1)
    """torch threads in each actor of a stage that runs torch (default: its CPU share, at least 1)."""

    def torch_threads(self) -> int:
        return self.threads or max(1, round(self.num_cpus))
