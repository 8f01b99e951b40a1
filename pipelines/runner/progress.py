"""Periodic progress lines on stderr for runs without a terminal (Ray's progress bars draw on one)."""

from __future__ import annotations

import sys
import time

from pipelines.runner.settings import RayConfig


class Progress:
    """Lines of photos written, rate and time left, every ``ray.progress_interval_s``."""

    def __init__(self, total: int, config: RayConfig) -> None:
        interactive = sys.stderr.isatty()
        self.enabled = config.progress == "lines" or (config.progress == "auto" and not interactive)
        self.total, self.interval = total, config.progress_interval_s
        self.done = 0
        self.started = self.last = time.monotonic()

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            left = (self.total - self.done) / rate if rate else float("inf")
            print(f"progress: {self.done}/{self.total} photos written ({100 * self.done / max(self.total, 1):.0f}%), "
                  f"{rate:.2f} photos/s, about {left:.0f} s left", file=sys.stderr, flush=True)  # fmt: skip
