"""How many trials run at once, and with what: computed from the cluster so a search never deadlocks.

A trial process asks Ray for no CPU (its Ray Train workers hold the CPUs and GPUs), so nothing in Ray
itself stops too many trials from starting and queueing their workers behind each other; the cap is
set here, from one trial's workers and the cluster's totals. Pure (no Ray) so it is unit-tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cmd_dist.config import ConfigError


@dataclass
class ResourcePlan:
    """Per-worker resources of a trial and how many trials run at once."""

    resources_per_worker: dict[str, float]
    concurrency: int
    notes: list[str] = field(default_factory=list)


def plan_resources(
    num_workers: int, per_worker: dict[str, float], cluster: dict[str, float], requested: int, trials: int
) -> ResourcePlan:
    """Fit one trial's workers into the cluster, then as many trials as the cluster holds (or ``requested``).

    A trial whose workers ask for more CPUs than the cluster has would never start, so the per-worker
    CPU share is lowered to fit (e.g. 3 peers on 2 CPUs: 0.666 CPU each). GPUs are never shared.
    """
    per_worker = dict(per_worker)
    notes = []
    total_cpu = cluster.get("CPU", 0.0)
    cpu = per_worker.get("CPU", 0.0)
    if cpu * num_workers > total_cpu + 1e-9:
        shared = math.floor(total_cpu / num_workers * 1000) / 1000
        if shared <= 0:
            raise ConfigError(f"the Ray cluster has {total_cpu:g} CPUs; a trial needs CPUs for {num_workers} workers")
        notes.append(
            f"a trial's {num_workers} workers x {cpu:g} CPU exceed the cluster's {total_cpu:g} CPUs; "
            f"using ray.cpus_per_worker={shared:g}"
        )
        per_worker["CPU"] = shared
    fits = math.inf
    for name, need in per_worker.items():
        if need > 0:
            fits = min(fits, math.floor(cluster.get(name, 0.0) / (need * num_workers) + 1e-9))
    if fits < 1:
        need = {k: v * num_workers for k, v in per_worker.items() if v > 0}
        have = {k: cluster.get(k, 0.0) for k in need}
        raise ConfigError(
            f"a trial needs {need} but the Ray cluster has {have}; set ray.use_gpu=false or ray.placement=together"
        )
    fits = int(fits)
    if requested > fits:
        notes.append(f"--max-concurrent {requested} lowered to {fits}: the cluster fits {fits} trial(s) at once")
    concurrency = fits if requested == 0 else min(requested, fits)
    return ResourcePlan(per_worker, max(1, min(concurrency, trials)), notes)
