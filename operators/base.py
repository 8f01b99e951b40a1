"""Config base for stages, the resources a stage asks Ray for, and the stage descriptor.

A stage is data (:class:`Stage`): the batch function's class and constructor arguments,
whether it runs as Ray tasks or in an actor pool, its resources, and the columns it needs,
adds and drops. Each operator module exports a function that builds its descriptor from
the run's config; ``pipelines.stages`` applies a list of them with one loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StageConfig(BaseModel):
    """A config section: unknown keys are errors that name the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _subsections_start_from_their_defaults(cls, data: Any) -> Any:
        """A subsection given in part keeps its field's default for the rest (``tasks: {batch_size: 4}`` keeps
        ``tasks``' own concurrency and num_cpus, not those of a bare ``Resources``)."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, field in cls.model_fields.items():
            if isinstance(field.default, BaseModel) and isinstance(data.get(name), dict):
                merged[name] = field.default.model_dump(exclude_defaults=True) | data[name]
        return merged


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
    joins_next: bool = False
    """Runs in the next stage's workers, in the same batch call (``pipelines.stages.joined``): a column it adds
    that a later stage of the call drops never enters Ray's object store."""
    restarts: bool = True
    """Whether Ray starts an actor again when its process dies, and gives it the batch again; false where the
    death must stop the run (the engine: a crashed engine is not retried into every batch)."""
