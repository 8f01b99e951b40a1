"""A run's metrics in Prometheus' text format, from its summary: written beside its record, pushed to a Pushgateway.

A caption run or a rematch records its summary in ``OUTPUT/_runs/<run>.json`` and its metrics in
``OUTPUT/_runs/<run>.prom`` (Prometheus' text exposition format, as ``prometheus_client`` writes
it); with ``run.metrics_push`` (``--metrics-push URL``) it also pushes them to that Pushgateway,
in the group ``job="plvm", command=..., output=...``, which each run of the same command into
the same output replaces. Every value is the summary's own (counts, wall seconds, status, start
and end), never counted again. A push that fails is a warning: the run's rows and record stand.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, generate_latest, push_to_gateway
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from plvm_model.store.output_table import OutputTable

log = logging.getLogger(__name__)

JOB = "plvm"
"""The Pushgateway's ``job`` label of every push."""

COUNTS: dict[str, tuple[str, str]] = {
    "photos": ("plvm_run_photos", "Photos the run processed (a rematch: looked at)."),
    "rows": ("plvm_run_rows", "Rows the run wrote."),
    "skipped": ("plvm_run_skipped", "Listed photos that earlier runs wrote, skipped (--resume)."),
    "retried": ("plvm_run_retried", "Rows of earlier runs written again (--retry-errors)."),
    "failed": ("plvm_run_failed", "Rows whose error is a failure of the system (retryable)."),
    "faces": ("plvm_run_faces", "Faces in the rows the run wrote."),
    "matched": ("plvm_run_named", "Faces named after a person of the owner's bank."),
    "indexed": ("plvm_run_indexed", "Photos the run added to the face index."),
    "changed": ("plvm_run_changed", "Photos whose names changed (a rematch)."),
    "not_indexed": ("plvm_run_not_indexed", "Rows the face index does not hold, left as they are (a rematch)."),
    "wall_s": ("plvm_run_wall_seconds", "The run's wall time."),
}
"""Summary field -> (metric, help) of the numbers a run's metrics give, where its summary has them."""

STATUSES = ("ok", "failed")


def utc_now() -> str:
    """This moment in UTC, as ISO 8601 (a summary's ``started`` and ``ended``)."""
    return datetime.now(UTC).isoformat()


def gauge(name: str, text: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    """A gauge of one sample."""
    family = GaugeMetricFamily(name, text, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class SummaryMetrics(Collector):
    """The metrics of one run's summary (the dict recorded in ``_runs/<run>.json``), each labelled with its command."""

    def __init__(self, command: str, output: str, summary: dict) -> None:
        self.command, self.output, self.summary = command, output, summary

    def collect(self) -> Iterator[Metric]:
        s, mine = self.summary, {"command": self.command}
        yield gauge("plvm_run_info", "The run: its id and output.", {**mine, "run_id": s["run_id"], "output": self.output}, 1)
        for field, (name, text) in COUNTS.items():
            if field in s:
                yield gauge(name, text, mine, s[field])
        errors = GaugeMetricFamily("plvm_run_errors", "Rows with an error, by error kind.", labels=["command", "kind"])
        for kind, n in sorted(s.get("errors", {}).items()):
            errors.add_metric([self.command, kind], n)
        yield errors
        status = GaugeMetricFamily("plvm_run_status", "1 for the run's status (ok or failed), 0 for the other.",
                                   labels=["command", "status"])  # fmt: skip
        for state in STATUSES:
            status.add_metric([self.command, state], float(s["status"] == state))
        yield status
        yield gauge("plvm_run_start_time_seconds", "When the run started (Unix time).", mine,
                    datetime.fromisoformat(s["started"]).timestamp())  # fmt: skip
        yield gauge("plvm_run_end_time_seconds", "When the run ended (Unix time).", mine,
                    datetime.fromisoformat(s["ended"]).timestamp())  # fmt: skip


def record(output: OutputTable, command: str, summary: dict, push: str | None) -> None:
    """Record the run: its summary and its metrics under ``OUTPUT/_runs/``, and the metrics pushed to the Pushgateway
    at ``push`` (a URL, or None)."""
    registry = CollectorRegistry()
    registry.register(SummaryMetrics(command, output.uri, summary))
    output.record(summary["run_id"], summary, metrics=generate_latest(registry))
    if push:
        try:
            push_to_gateway(push, job=JOB, registry=registry, grouping_key={"command": command, "output": output.uri},
                            timeout=30)  # fmt: skip
        except OSError as error:  # urllib's errors: the run's rows and record stand
            log.warning("run %s: its metrics were not pushed to %s: %s", summary["run_id"], push, error)
