"""Checks at the start of a run, for what would otherwise be found only late: an output that
cannot be written (found by the write stage, after all the work), and a stage that asks for
more than any Ray node has (which waits, doing nothing, until ``ray.no_progress_timeout_s``).
"""

from __future__ import annotations

import posixpath
import uuid

from operators.base import Stage, Step
from plvm_model.store import storage
from plvm_model.store.errors import OutputUnwritable, ResourcesUnavailable


def check_output(uri: str, storage_options: storage.StorageOptions | None) -> None:
    """Write a probe file under the output ``uri`` and remove it, or raise :class:`OutputUnwritable`.

    What the run will do, done once at its start: a local output's folder is made (a file in
    its place, or a folder this user cannot write, fails here); on an object store a probe
    object is put and deleted under the prefix (a missing bucket, or credentials without
    write or delete rights, fail here; a bucket is never created).
    """
    fs, root = storage.filesystem(uri, storage_options)
    probe = posixpath.join(root, f"_probe-{uuid.uuid4().hex}")  # readers of the output skip `_` names
    try:
        if "file" in fs.protocol:  # object stores have no folders, and their makedirs would create a bucket
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except OSError as error:
        raise OutputUnwritable(f"output {uri} cannot be written: {type(error).__name__}: {error}") from None


def largest_node() -> dict[str, float]:
    """The most of each resource that one node of the Ray cluster has, or could have.

    The nodes alive now, and, where the cluster's autoscaler publishes its node types (Ray's
    cluster config, which Ray Data reads the same way), each node type it may start.
    """
    import ray
    import ray._private.state

    shapes = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    config = ray._private.state.state.get_cluster_config()
    if config is not None:
        shapes += [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]
    largest: dict[str, float] = {}
    for shape in shapes:
        for name, amount in shape.items():
            largest[name] = max(largest.get(name, 0.0), float(amount))
    return largest


def check_resources(steps: list[Step]) -> None:
    """Raise :class:`ResourcesUnavailable` if a stage's actor or task needs more CPUs or GPUs than any
    node has or could have (:func:`largest_node`; Ray must be up): Ray would wait for it forever."""
    largest = largest_node()
    for step in steps:
        if not isinstance(step, Stage):
            continue
        r = step.resources
        # as pipelines.runner.loop.apply asks Ray: GPUs only for an actor pool's actors
        asked = {"CPU": r.num_cpus, "GPU": r.num_gpus if step.actors else 0.0}
        unit = "actor" if step.actors else "task"
        for name, amount in asked.items():
            if amount > largest.get(name, 0.0):
                raise ResourcesUnavailable(
                    f"stage {step.name} asks for {amount:g} {name} per {unit}, but no node of the Ray cluster has "
                    f"more than {largest.get(name, 0.0):g} (nor any node type its autoscaler may start): "
                    "lower the stage's resources, or run on a cluster that has such a node"
                )
