"""Applying a list of stages: one loop, the column contract, and the error policy.

A pipeline is a list of steps: :class:`operators.base.Stage` descriptors, and
:class:`Barrier` steps that need the whole dataset at once (the cohort barrier).
:func:`apply` checks, before anything runs, that every stage's needed columns come from
the listing or an earlier stage, then maps each stage over the dataset as its descriptor
says (tasks or an actor pool, its resources). A column that a later step drops leaves the
rows as soon as no step needs it any more (:func:`drop_early`), and stages :func:`joined`
into one batch call keep what passes between them out of Ray's object store: the caption
pipeline decodes, detects and aligns in the detect actor, so that a photo's pixels never
leave it. :class:`InProcess` runs the same stages in this process, without Ray (enrollment's
few photos).

Every stage's batch function is wrapped in :class:`Guarded`, which checks the columns it
needs and that it returns one row per row, and applies the error policy:

- an *input fault* (``operators.rows.RowError``) is already that row's error;
- any other exception is a *failure of the system*. With ``run.max_failed_fraction`` 0 (the
  default) the batch fails with :class:`StageFailed`, Ray retries it ``run.retries`` times,
  and then the run stops; the driver reports the stage, the photos and the first traceback.
  With a budget above 0 the batch is run again photo by photo and each photo that still
  fails gets a ``stage_failed`` row error (retryable); the driver fails the run at the end
  if they are more than the budget;
- :class:`plvm_model.store.errors.RunFailed` (a dead engine), and a stage whose function cannot be
  built (a model that cannot load), always stop the run;
- an actor whose process dies is started again by Ray, which gives it the batch again, unless
  its stage says ``restarts=False`` (the engine): then the run stops, and ``--resume`` goes on.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray.data.exceptions import UserCodeException
from ray.util.annotations import RayDeprecationWarning

from operators.base import FromRun, Resources, Stage
from operators.rows import fail, output_columns, to_table
from plvm_model.store.output_schema import ErrorKind
from plvm_model.store.errors import RunFailed


class StageFailed(UserCodeException):
    """What a stage's batch raises when it fails in the system: the stage, its photos and the traceback.

    Ray Data retries it (its message carries :attr:`MARK`) unless it carries a :class:`RunFailed`
    (``fatal``: a dead engine), and raises it in the driver as it is (``raise_original_map_exception``),
    where :func:`cause_of` finds it. It is a ``UserCodeException`` so that Ray reports it as the
    user's error, not its own.
    """

    MARK = "failed on a batch of"
    """In the message of every retryable one: what Ray Data's ``retried_map_errors`` matches."""

    def __init__(self, stage: str, paths: list[str], detail: str, fatal: RunFailed | None = None) -> None:
        super().__init__(stage, paths, detail, fatal)
        self.stage, self.paths, self.detail, self.fatal = stage, paths, detail, fatal

    def __str__(self) -> str:
        if self.fatal is not None:
            return f"stage {self.stage} stopped the run: {self.fatal}"
        first = self.paths[0] if self.paths else "?"
        return f"stage {self.stage} {self.MARK} {len(self.paths)} photos (the first: {first}):\n{self.detail}"


def _where(error: BaseException) -> str:
    """``Type: message (at file:line in function)`` of an exception, at its innermost frame."""
    frames = traceback.extract_tb(error.__traceback__)
    at = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(error).__name__}: {error}{at}"


class Guarded:
    """A stage's batch function with its contract checked and the error policy applied (see the module)."""

    def __init__(self, stage: Stage, args: tuple[Any, ...], tolerate: bool) -> None:
        self.stage, self.tolerate = stage, tolerate
        try:
            self.udf = stage.udf(*args)
        except Exception as error:  # a model that cannot load: no retry helps
            fatal = RunFailed(f"stage {stage.name} could not start: {_where(error)}")
            raise StageFailed(stage.name, [], traceback.format_exc(), fatal=fatal) from error

    def __call__(self, batch: pa.Table) -> pa.Table:
        missing = [c for c in self.stage.needs if c not in batch.column_names]
        if missing:
            raise ValueError(f"stage {self.stage.name} got a batch without the columns {missing}")
        paths = batch.column("path").to_pylist() if "path" in batch.column_names else []
        try:
            out = self.udf(batch)
        except RunFailed as error:
            raise StageFailed(self.stage.name, paths, traceback.format_exc(), fatal=error) from error
        except Exception as error:
            if not self.tolerate or not self.stage.keeps_rows:
                raise StageFailed(self.stage.name, paths, traceback.format_exc()) from error
            out = self._row_by_row(batch)
        if self.stage.keeps_rows and out.num_rows != batch.num_rows:
            raise ValueError(f"stage {self.stage.name} returned {out.num_rows} rows for {batch.num_rows}")
        return out.drop_columns([c for c in self.stage.drops if c in out.column_names])

    def _row_by_row(self, batch: pa.Table) -> pa.Table:
        """Each row alone; a row that still fails keeps its columns and gets a ``stage_failed`` error."""
        parts = []
        for i in range(batch.num_rows):
            row = batch.slice(i, 1)
            try:
                parts.append(self.udf(row))
            except RunFailed as error:
                raise StageFailed(self.stage.name, row["path"].to_pylist(), traceback.format_exc(), error) from error
            except Exception as error:
                failed = row.to_pylist()[0]
                fail(failed, ErrorKind.STAGE_FAILED, f"{failed.get('path')}: {self.stage.name} failed: {_where(error)}")
                # the stage's own columns too (null): a batch whose every row failed still has them
                parts.append(to_table([failed], output_columns(row, self.stage.adds, self.stage.drops)))
        return pa.concat_tables(parts, promote_options="permissive")


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


def check_columns(steps: Iterable[Step], columns: Iterable[str]) -> None:
    """Raise if a step needs a column that neither the input nor an earlier step provides."""
    available = {*columns, "error", "error_kind"}
    for step in steps:
        missing = [c for c in step.needs if c not in available]
        if missing:
            raise ValueError(f"stage {step.name} needs the columns {missing}, which no earlier stage adds")
        available = (available | set(getattr(step, "adds", ()))) - set(step.drops)


def drop_early(steps: list[Step]) -> list[Step]:
    """``steps`` with each column that a step drops without needing it dropped instead by the stage that last
    needs or adds it before (its batch function's output loses it, in the same task), where there is one."""
    steps = list(steps)
    for j, step in enumerate(steps):
        for column in (c for c in step.drops if c not in step.needs):
            users = [i for i in range(j) if column in steps[i].needs or column in getattr(steps[i], "adds", ())]
            if users and isinstance(steps[users[-1]], Stage):
                last = steps[users[-1]]
                steps[users[-1]] = replace(last, drops=(*last.drops, column))
                steps[j] = step = replace(step, drops=tuple(c for c in step.drops if c != column))
    return steps


def joined(*stages: Stage) -> list[Stage]:
    """``stages`` as one batch call: each batch goes through all of them in turn, in the workers of the one that
    runs in actors (if any; else as tasks, with the last one's resources). What one adds and a later one drops
    (see :func:`drop_early`) never leaves that call."""
    return [replace(stage, joins_next=True) for stage in stages[:-1]] + [replace(stages[-1], joins_next=False)]


def calls(steps: list[Step]) -> list[Barrier | tuple[Stage, ...]]:
    """``steps`` as Ray runs them: each barrier, and each run of stages joined into one batch call."""
    out: list[Barrier | tuple[Stage, ...]] = []
    current: list[Stage] = []
    for step in steps:
        if isinstance(step, Barrier):
            if current:
                raise ValueError(f"stage {current[-1].name} cannot join the barrier {step.name}")
            out.append(step)
            continue
        current.append(step)
        if not step.joins_next:
            out.append(tuple(current))
            current = []
    if current:
        raise ValueError(f"stage {current[-1].name} joins a next stage, and none follows")
    for call in (c for c in out if isinstance(c, tuple) and len(c) > 1):
        names = ", ".join(stage.name for stage in call)
        if sum(stage.actors for stage in call) > 1:
            raise ValueError(f"stages {names} join two actor pools into one call")
        if any(stage.runtime_env != call[0].runtime_env for stage in call):
            raise ValueError(f"stages {names} need different runtime environments: they cannot share a call")
    return out


class Joined:
    """Stages joined into one batch call, each :class:`Guarded`, applied in turn."""

    def __init__(self, stages: tuple[tuple[Stage, tuple[Any, ...]], ...], tolerate: bool) -> None:
        self.guarded = [Guarded(stage, args, tolerate) for stage, args in stages]

    def __call__(self, batch: pa.Table) -> pa.Table:
        for guarded in self.guarded:
            batch = guarded(batch)
        return batch


def _resolve(args: tuple[Any, ...], values: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(values[a.name] if isinstance(a, FromRun) else a for a in args)


def _joined_class(stages: tuple[Stage, ...]) -> type:
    """A subclass of :class:`Joined` named after the stages' functions (``Decode+DetectFaces+AlignFaces``), so
    Ray names its operator and workers the same."""
    return type("+".join(stage.udf.__name__ for stage in stages), (Joined,), {"__module__": __name__})


def apply(ds, steps: list[Step], tolerate: bool, retries: int):
    """``ds`` through ``steps`` on Ray (see the module)."""
    import ray.data

    values: dict[str, Any] = {}  # what barriers hand on to later stages' FromRun arguments
    check_columns(steps, ds.columns())
    context = ds.context  # the dataset's own copy of Ray Data's settings, taken when it was created
    context.retried_map_errors = [StageFailed.MARK]  # Ray Data retries a map task whose error says this
    context.max_map_retries = retries
    context.raise_original_map_exception = True  # the driver gets the StageFailed itself
    for call in calls(drop_early(steps)):
        if isinstance(call, Barrier):
            ds = call.run(ds.drop_columns(list(call.drops)) if call.drops else ds, values)
            continue
        host = next((stage for stage in call if stage.actors), call[-1])  # the stage whose workers run the call
        args = (tuple((stage, _resolve(stage.args, values)) for stage in call), tolerate)
        resources: Resources = host.resources
        if host.actors:
            compute = ray.data.ActorPoolStrategy(size=resources.concurrency)
            udf, options = _joined_class(call), {"fn_constructor_args": args, "num_gpus": resources.num_gpus or None}
        else:
            compute = ray.data.TaskPoolStrategy(size=resources.concurrency)
            udf, options = _joined_class(call)(*args), {}
        with warnings.catch_warnings():
            # Ray 2.60 takes max_restarts only among its ray_remote_args, which it marks deprecated without
            # naming a replacement; its actor pool reads it (actor_pool_map_operator: "max_restarts=0 to disable")
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
            ds = ds.map_batches(
                udf,
                compute=compute,
                batch_format="pyarrow",
                batch_size=resources.batch_size,
                num_cpus=resources.num_cpus,
                udf_modifying_row_count=not all(stage.keeps_rows for stage in call),
                runtime_env=host.runtime_env,
                **options,
                **({} if host.restarts or not host.actors else {"max_restarts": 0}),
            )
    return ds


class InProcess:
    """Stages run in this process, without Ray, each stage's function built once; a system failure raises."""

    def __init__(self, steps: list[Stage]) -> None:
        self.steps = steps
        self.joined = Joined(tuple((step, step.args) for step in steps), tolerate=False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(self.steps, batch.column_names)
        return self.joined(batch)


def cause_of(error: BaseException, *types: type[BaseException]) -> BaseException | None:
    """The first exception of ``types`` in ``error``'s chain of causes (Ray wraps what a task raised: its
    ``RayTaskError`` is also an instance of the cause's class, and holds the cause itself as ``cause``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for candidate in (getattr(error, "cause", None), error):
            if isinstance(candidate, types):
                return candidate
        error = error.__cause__ or error.__context__ or getattr(error, "cause", None)
    return None
