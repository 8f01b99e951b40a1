"""Config base for stages, the resources a stage asks Ray for, and the stage descriptor.

A stage is data (:class:`Stage`): the batch function's class and constructor arguments,
whether it runs as Ray tasks or in an actor pool, its resources, and the columns it needs,
adds and drops. Each operator module exports a function that builds its descriptor from
the run's config; ``pipelines.stages`` applies a list of them with one loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class FromRun:
    """A constructor argument known only once the run reaches the stage (e.g. the cohort scales of a barrier)."""

    name: str


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline: ``udf(*args)`` maps a ``pyarrow.Table`` batch to another with the same rows."""

    name: str
    udf: type
    args: tuple[Any, ...]
    resources: Resources
    needs: tuple[str, ...]
    """Columns the batch must carry (``error``/``error_kind`` always come along)."""
    adds: tuple[str, ...] = ()
    drops: tuple[str, ...] = ()
    actors: bool = False
    """An actor pool (each actor builds ``udf`` once: stages that hold a model); else stateless tasks."""
    keeps_rows: bool = True
    """One output row per input row, checked on every batch (false only for the write stage)."""
    runtime_env: dict[str, Any] | None = None
    """Ray's runtime environment of the stage's workers (another Python, environment variables)."""
