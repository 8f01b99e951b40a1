"""Applying a list of stages: one loop, the column contract, and the error policy.

A pipeline is a list of steps: :class:`operators.base.Stage` descriptors, and
:class:`operators.base.Barrier` steps that need the whole dataset at once (the cohort barrier).
:func:`apply` checks, before anything runs, that every stage's needed columns come from
the listing or an earlier stage, then maps each stage over the dataset as its descriptor
says (tasks or an actor pool, its resources). A column that a later step drops leaves the
rows as soon as no step needs it any more (:func:`drop_early`), and stages ``operators.base.joined``
into one batch call keep what passes between them out of Ray's object store: the caption
pipeline decodes, detects and aligns in the detect actor, so that a photo's pixels never
leave it. :class:`InProcess` runs the same stages in this process, without Ray (enrollment's
few photos).

Every stage's batch function is wrapped in :class:`Guarded`, which checks the columns it
needs and adds and that it returns one row per row, counts what the stage did (its rows,
seconds, the row errors it gave by kind, and the batch function's own counters) into the
rows' stats column when they carry one (``operators.rows.STATS``), and applies the error policy:

- an *input fault* (``plvm_model.store.output_schema.RowError``) is already that row's error;
- any other exception is a *failure of the system*. With ``run.max_failed_fraction`` 0 (the
  default) the batch fails with :class:`pipelines.runner.failures.StageFailed`, Ray retries it ``run.retries`` times,
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

import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from ray.util.annotations import RayDeprecationWarning

from operators.base import Barrier, FromRun, Resources, Stage, Step
from operators.rows import STATS, fail, output_columns, to_table, with_stats
from pipelines.runner.failures import StageFailed
from plvm_model.store.errors import RunFailed
from plvm_model.store.output_schema import ErrorKind


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
        started = time.perf_counter()
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
        unmade = [c for c in self.stage.adds if c not in out.column_names]
        if unmade:
            raise ValueError(f"stage {self.stage.name} returned a batch without the columns {unmade} it adds")
        out = out.drop_columns([c for c in self.stage.drops if c in out.column_names])
        return with_stats(out, self._counts(batch, out, time.perf_counter() - started))

    def _counts(self, batch: pa.Table, out: pa.Table, seconds: float) -> Counter:
        """What the stage did to ``batch``: its rows, seconds, the row errors it gave by kind (``<stage>.errors.<kind>``)
        and its batch function's own counters, each under the stage's name."""
        if STATS not in out.column_names:
            return Counter()
        own = self.udf.take_stats() if hasattr(self.udf, "take_stats") else Counter()
        counts = Counter({f"{self.stage.name}.{key}": value for key, value in own.items()})
        counts[f"{self.stage.name}.rows"] += batch.num_rows
        counts[f"{self.stage.name}.seconds"] += seconds
        if self.stage.keeps_rows and "error_kind" in out.column_names:
            before = batch.column("error_kind") if "error_kind" in batch.column_names else pa.nulls(batch.num_rows)
            new = out.column("error_kind").filter(pc.is_null(before))
            for kind in new.drop_null().value_counts().to_pylist():
                counts[f"{self.stage.name}.errors.{kind['values']}"] += kind["counts"]
        return counts

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


def apply(ds, steps: list[Step], tolerate: bool, retries: int, max_tasks: int | None = None):
    """``ds`` through ``steps`` on Ray (see the module); a stage of tasks runs at most ``max_tasks`` at once (the
    dataset's blocks: a small run starts no idle workers, and Ray does not warn)."""
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
            compute = ray.data.TaskPoolStrategy(size=min(resources.concurrency, max_tasks or resources.concurrency))
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
