"""``cmd-dist evaluate RUN --address ADDR``: the same evaluation (:func:`cmd_dist.infer.evaluate.evaluate_run`) as
one Ray task on a cluster, on a GPU when the cluster has one.

The task runs on whichever node Ray picks, so RUN must be where that node can read it (a URI, or a folder every node
shares: ``output_dir``'s rule for training) and so must the data (``data.root``). The driver joins the cluster as
``cmd-dist train`` does (:func:`cmd_dist.launch.cluster.init_ray`: token authentication, the address checked to
answer first); only the results (a small dict) come back.
"""

from __future__ import annotations

import os

from cmd_dist.config import Config
from cmd_dist.errors import CheckpointError, ConfigError, DataError
from cmd_dist.launch.cluster import cluster_nodes, init_ray
from cmd_dist.runs.fs import absolute

# isort: split
import ray


def _evaluate_task(run: str, checkpoint: str, split: str | None, overrides: list[str]) -> dict:
    from cmd_dist.infer.evaluate import evaluate_run

    result = evaluate_run(run, checkpoint, split, overrides)
    result["node"] = ray.get_runtime_context().get_node_id()
    result["pid"] = os.getpid()
    return result


def evaluate_on_cluster(
    address: str, run: str, checkpoint: str = "best", split: str | None = None, overrides: list[str] | None = None
) -> dict:
    """Join ``address`` (or use the Ray this process already joined) and evaluate there; the results dict.

    A user error inside the task (a missing checkpoint, another class count) comes back as the same exception
    type, so the CLI prints the same single line.
    """
    cfg = Config()
    cfg.ray.address = address
    init_ray(cfg)
    gpus = 1 if any(node.get("GPU", 0) >= 1 for node in cluster_nodes()) else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(_evaluate_task)
    location = str(absolute(run))  # a folder's absolute path: the task's node must see the same folder
    try:
        return ray.get(task.remote(location, checkpoint, split, list(overrides or [])))
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (ConfigError, DataError, CheckpointError)):
            raise cause from None  # the user's mistake, as one line (not the task's traceback)
        raise
