"""Starting (or joining) Ray for a run, quietly, and Ray Data's execution settings."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

from pipelines.runner.ray_processes import claim, stop_leftovers
from pipelines.runner.settings import RayConfig

log = logging.getLogger(__name__)


ACTOR_RESTART_NOTICE = "has constructor arguments in the object store and max_restarts > 0"
"""Ray core's notice, logged once per process (ray-project/ray#57733), on the first actor of any Ray Data
actor pool: those actors get their context and UDF as object references and ``max_restarts=-1``."""


class _DropRecords(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# Ray Data's advice to turn its progress bars on, logged when they are off: they are off on purpose
# (no terminal, or ray.progress says so) and the run prints its own progress lines instead.
_PROGRESS_BARS_OFF = _DropRecords("Progress bars disabled.", "Progress bars for operators disabled.")

# Ray's notice that it turned token authentication on for the new local Ray, logged on every start: on is what
# the embedded Ray should be (see docs/deployment.md, Security), and setting RAY_AUTH_MODE=token ourselves instead does
# not reach Ray's configuration once ray is imported (its GCS then refuses the driver).
_TOKEN_AUTH_ON = _DropRecords("Token authentication is enabled for this Ray cluster.")


def init_ray(config: RayConfig) -> None:
    """Join ``config.address`` (or ``RAY_ADDRESS``, set inside a Ray job), else start a private Ray on loopback.

    The private Ray is claimed as this process's (``pipelines.runner.ray_processes``), and before it
    starts, the processes that killed runs left are stopped. A no-op when Ray is
    already up in this process.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = config.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            stop_leftovers()
            logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TOKEN_AUTH_ON)
            with _loopback_only():
                started = ray.init(
                    num_cpus=config.num_cpus,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    _system_config={"enable_metrics_collection": config.metrics},
                )
            claim(started.address_info["session_dir"])
        _spend_actor_restart_notice()
    context = DataContext.get_current()
    context.execution_no_progress_timeout_s = config.no_progress_timeout_s
    interactive = sys.stderr.isatty()
    bars = config.progress == "bar" or (config.progress == "auto" and interactive)
    context.enable_progress_bars = bars
    context.enable_operator_progress_bars = bars
    context.print_on_execution_start = False
    logging.getLogger("ray.data._internal.progress").addFilter(_PROGRESS_BARS_OFF)


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Within the block, ``ray.init(_node_ip_address="127.0.0.1")`` keeps 127.0.0.1 as the node's address.

    Ray 2.60 replaces a loopback node address by the machine's own (``resolve_ip_for_localhost``)
    unless it thinks it cannot form clusters (``ray_constants.ENABLE_RAY_CLUSTER``, read from
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when ``ray`` is first imported, so it is set here on the
    module). On the machine's address the GCS, the raylet, the object manager and every worker
    listen on all interfaces, the agents and the metrics ports on that address; on 127.0.0.1
    they all listen on loopback only (tests/test_ray_exposure.py lists them).
    """
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _spend_actor_restart_notice() -> None:
    """Have Ray core log its once-per-process actor-restart notice now, into a file, and drop it.

    Every Ray Data actor pool (detect, embed, generate) passes its actors object references and
    ``max_restarts=-1``, and Ray core then logs, once per process and at ERROR level, that a
    restart would fail if those objects were lost (ray-project/ray#57733). Ray Data holds them
    for the whole execution, so restarts work (tests/test_resilience.py kills an actor); the
    line only alarms. It comes from Ray's C++ logger straight to file descriptor 2, past Python's
    logging, so it is spent here: a throwaway actor whose constructor gets an object reference is
    created while descriptor 2 points to a temporary file, whose other content, if any, is written
    back to stderr.
    """
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class _Throwaway:
        def __init__(self, _ref) -> None:
            pass

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            _Throwaway.remote(ray.put(None))  # the handle is dropped at once: the actor never starts
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        rest = b"".join(line for line in captured if ACTOR_RESTART_NOTICE.encode() not in line)
    if rest:
        os.write(2, rest)
