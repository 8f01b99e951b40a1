"""Config base for stages, the resources a stage asks Ray for, the step descriptors, and the base of a batch function.

A stage is data (:class:`Stage`): the batch function's class and constructor arguments,
whether it runs as Ray tasks or in an actor pool, its resources, and the columns it needs,
adds and drops. The batch function states those columns once, as class attributes
(:class:`RowStage`), and :meth:`Stage.of` takes them from there. A :class:`Barrier` is a step
that needs the whole dataset at once. Each operator module exports a function that builds
its step from the run's config; ``pipelines.runner`` applies a list of them with one loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.rows import map_rows


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
    optional: tuple[str, ...] = ()
    """Columns the batch function reads when the batch has them (a row's own questions for the engine)."""
    actors: bool = False
    """An actor pool (each actor builds ``udf`` once: stages that hold a model); else stateless tasks."""
    keeps_rows: bool = True
    """One output row per input row, checked on every batch (false only for the write stage)."""
    runtime_env: dict[str, Any] | None = None
    """Ray's runtime environment of the stage's workers (another Python, environment variables)."""
    joins_next: bool = False
    """Runs in the next stage's workers, in the same batch call (:func:`joined`): a column it adds
    that a later stage of the call drops never enters Ray's object store."""
    restarts: bool = True
    """Whether Ray starts an actor again when its process dies, and gives it the batch again; false where the
    death must stop the run (the engine: a crashed engine is not retried into every batch)."""

    @classmethod
    def of(cls, name: str, udf: type[RowStage], args: tuple[Any, ...], resources: Resources, **how: Any) -> Stage:
        """The stage of ``udf``, with the columns its class states (:class:`RowStage`)."""
        contract = {"needs": udf.needs, "adds": udf.adds, "drops": udf.drops, "optional": udf.optional}
        return cls(name, udf, args, resources, **contract, **how)


def joined(*stages: Stage) -> list[Stage]:
    """``stages`` as one batch call: each batch goes through all of them in turn, in the workers of the one that
    runs in actors (if any; else as tasks, with the last one's resources). What one adds and a later one drops
    (``pipelines.runner.loop.drop_early``) never leaves that call."""
    return [replace(stage, joins_next=True) for stage in stages[:-1]] + [replace(stages[-1], joins_next=False)]


@dataclass(frozen=True)
class Barrier:
    """A step that needs every row of the run at once: ``run(dataset, values)`` returns the dataset (now
    materialized) and may put into ``values`` what later stages take as :class:`FromRun` arguments. The
    dataset it gets has lost ``drops`` already."""

    name: str
    run: Callable[[Any, dict[str, Any]], Any]
    needs: tuple[str, ...]
    drops: tuple[str, ...] = ()


Step = Stage | Barrier


class RowStage:
    """The base of a batch function: the columns it needs, adds and drops, stated once (the stage loop checks
    them, :meth:`__call__` builds its output from them), and its counters.

    A subclass implements :meth:`process`, one error-free row at a time (a ``RowError`` is that row's input
    fault); one that works on the whole batch overrides :meth:`__call__`. :meth:`stat_update` counts what the
    stage did (faces found, photos taken from the index...), as datatrove's steps do; the stage loop takes the
    counts of each batch, with the stage's rows, time and errors, into the run's summary.
    """

    needs: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()
    drops: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()

    def process(self, row: dict) -> None:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows(batch, self.process, add=self.adds, drop=self.drops)

    def stat_update(self, key: str, value: float = 1) -> None:
        """Count ``value`` more of ``key`` in this batch."""
        self.__dict__.setdefault("_stats", Counter())[key] += value

    def take_stats(self) -> Counter:
        """The counts since the last call (the stage loop takes them after each batch)."""
        return self.__dict__.pop("_stats", Counter())
