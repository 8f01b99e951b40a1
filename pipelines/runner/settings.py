"""The runner's sections of the config: the Ray a run uses, how it treats failures of the system, its metrics."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from operators.base import StageConfig


class RayConfig(StageConfig):
    address: str | None = Field(
        None,
        description="null: start a Ray for this run on this machine (bound to 127.0.0.1); else a cluster address.",
    )
    num_cpus: int | None = Field(None, description="CPUs of the local Ray (null: all).")
    metrics: bool = Field(
        False,
        description="Whether the local Ray records and exports its metrics (for Prometheus); off, as it runs no "
        "dashboard, since every Ray process pays for them in CPU. A cluster's own setting is never changed.",
    )
    no_progress_timeout_s: float = Field(1800.0, description="Fail the run if no stage makes progress for this long.")
    progress: Literal["auto", "bar", "lines", "off"] = Field(
        "auto", description="`auto`: Ray's progress bars on a terminal, periodic lines otherwise."
    )
    progress_interval_s: float = Field(30.0, gt=0, description="Seconds between progress lines.")


class RunConfig(StageConfig):
    """How a run treats failures of the system (not input faults, which are always rows with an error), and where it
    pushes its metrics."""

    max_failed_fraction: float = Field(
        0.0, ge=0, le=1,
        description="Share of a run's photos that may fail in the system (a stage's unexpected exception, an engine "
        "timeout) before the run fails. 0: the first unexpected exception stops the run, after its retries; above "
        "0: such photos get a retryable row error and the run fails at its end only past this share.",
    )  # fmt: skip
    retries: int = Field(
        1, ge=0, description="Times Ray Data retries a stage's batch after an unexpected exception (a worker that dies is "
        "retried by Ray as always)."
    )
    metrics_push: str | None = Field(
        None,
        description="A Prometheus Pushgateway (`http://HOST:9091`) to which each caption run and rematch pushes its "
        "metrics at its end (`--metrics-push`); they are always written to `OUTPUT/_runs/<run>.prom`.",
    )

    @property
    def tolerate(self) -> bool:
        """Whether a failing batch is tried photo by photo, its failing photos becoming retryable row errors."""
        return self.max_failed_fraction > 0
