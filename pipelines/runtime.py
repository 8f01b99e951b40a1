"""Starting (or joining) Ray for a run, quietly, and Ray Data's execution settings."""

from __future__ import annotations

import logging
import os
import sys

from pipelines.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(config: RayConfig) -> None:
    """Join ``config.address`` (or ``RAY_ADDRESS``, set inside a Ray job), else start a private Ray on 127.0.0.1.

    A no-op when Ray is already up in this process.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = config.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(
                num_cpus=config.num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
    context = DataContext.get_current()
    context.execution_no_progress_timeout_s = config.no_progress_timeout_s
    interactive = sys.stderr.isatty()
    bars = config.progress == "bar" or (config.progress == "auto" and interactive)
    context.enable_progress_bars = bars
    context.enable_operator_progress_bars = bars
    context.print_on_execution_start = False
