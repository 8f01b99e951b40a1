"""Failures of the system, as the stage loop raises them and the driver reports them.

An input fault is a row's error (``plvm_model.store.output_schema.RowError``) and never reaches
here. Any other exception of a stage fails its batch with :class:`StageFailed`, which Ray Data
retries ``run.retries`` times (its message carries :attr:`StageFailed.MARK`) unless it carries a
:class:`RunFailed` (a dead engine, a model that cannot load). In the driver, :func:`run_failure`
finds the failure behind what Ray raised, and :func:`results` iterates a dataset's rows with every
failure of the run raised as a :class:`RunFailed` (exit code 3), as :func:`as_run_failure` raises them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from ray.data.exceptions import UserCodeException

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


def run_failure(error: BaseException) -> RunFailed | None:
    """The run's failure behind an exception that Ray raised in the driver, as a :class:`RunFailed`; None when
    ``error`` is not one (a bug of the driver's own)."""
    import ray.exceptions

    found = cause_of(error, StageFailed, RunFailed)
    if isinstance(found, StageFailed):
        retried = f"{found}\n(failed after its retries; fix the cause, then run again with --resume)"
        found = found.fatal or RunFailed(retried)
    if found is not None:
        return found
    died = cause_of(error, ray.exceptions.RayActorError)
    if died is not None:
        actor = re.search(r"MapBatches\((\w+)\)", str(died))
        who = f"the {actor[1]} actor" if actor else "an actor of the run"
        return RunFailed(f"{who} died and is not restarted, so the run stops: {died}\n(run again with --resume)")
    return None


@contextlib.contextmanager
def as_run_failure() -> Iterator[None]:
    """Within the block, a failure of the run that Ray raises (a stage's, a dead actor's) is raised as its
    :class:`RunFailed`; anything else goes on as it is."""
    try:
        yield
    except RunFailed:
        raise
    except Exception as error:
        failure = run_failure(error)
        if failure is None:
            raise
        raise failure from error


def results(ds) -> Iterator[dict[str, Any]]:
    """The rows of the Ray dataset ``ds`` as they come; a failure of the run in a stage raised as its
    :class:`RunFailed`."""
    with as_run_failure():
        yield from ds.iter_rows()
