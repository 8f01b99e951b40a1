"""A listing of photos through a list of steps, on Ray: the one entry every composition runs its stages by."""

from __future__ import annotations

import pyarrow as pa

from operators.base import Step
from operators.rows import COLUMNS, STATS
from pipelines.runner.failures import as_run_failure
from pipelines.runner.loop import apply
from pipelines.runner.preflight import check_resources
from pipelines.runner.runtime import init_ray
from pipelines.runner.settings import RayConfig, RunConfig


def execute(listing: pa.Table, steps: list[Step], ray_config: RayConfig, run: RunConfig, batch_size: int):
    """The Ray dataset of ``listing``'s rows through ``steps``, in blocks of ``batch_size`` rows (Ray started or
    joined first, the stages' resources checked against its nodes). The rows carry the stages' counters (an empty
    stats column to begin with, ``operators.rows.STATS``). A failure of the run in the steps before a barrier, which
    runs them here, is raised as its ``RunFailed``."""
    import ray.data

    init_ray(ray_config)
    check_resources(steps)
    if STATS not in listing.column_names:
        listing = listing.append_column(STATS, pa.nulls(listing.num_rows, COLUMNS[STATS]))
    blocks = [listing.slice(i, batch_size) for i in range(0, max(listing.num_rows, 1), batch_size)]
    # from_blocks: the metadata is computed here, with no Ray task (from_arrow runs one per block, and Ray then
    # warns that no CPU is free before it counts them free again)
    with as_run_failure():  # a barrier runs the steps before it here
        return apply(ray.data.from_blocks(blocks), steps, run.tolerate, run.retries, max_tasks=len(blocks))
