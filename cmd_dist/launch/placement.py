"""Where the peers run: Ray Train workers, what each asks for, the exchange backend (pure, from the nodes'
totals), checked against the cluster before anything starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cmd_dist.config import Config, ConfigError
from cmd_dist.launch import environment  # noqa: F401 - Ray's environment defaults, before Ray is imported
from cmd_dist.launch.cluster import cluster_nodes, local_node, ray_address

# isort: split
import ray
from ray.train import ScalingConfig


@dataclass
class Placement:
    """Where the peers run: Ray Train workers, what each asks for, the exchange backend, one line to print."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    backend: str
    line: str
    #: Ray's placement-group strategy: STRICT_SPREAD (``ray.spread``: every worker on its own node) or PACK.
    strategy: str = "PACK"


def auto_workers(num_peers: int, total_gpus: int, use_gpu: str) -> int:
    """``ray.placement: auto``: a worker per peer, unless GPUs exist but fewer than peers.

    Then as many workers as GPUs can evenly share the peers (the largest divisor of the peer count
    that is <= the GPUs), each worker a whole GPU hosting its peers in one process: with one GPU that
    is ``together``, whose step is one CUDA graph for all peers. Fractional-GPU workers exchanging
    through gloo were slower on one GPU (README, Performance).
    """
    if use_gpu == "false" or total_gpus <= 0 or total_gpus >= num_peers:
        return num_peers
    return max(d for d in range(1, total_gpus + 1) if num_peers % d == 0)


def plan_placement(cfg: Config, nodes: list[dict[str, float]], check_nodes: bool = True) -> Placement:
    """Decide the placement from the config and the cluster's alive nodes' total resources (pure).

    ``ray.use_gpu: auto`` puts the workers on the GPUs that exist: one GPU each when there are
    enough, else GPU shares (e.g. 2 workers on 1 GPU: 0.5 each, exchanging through gloo); CPU only
    when the cluster has no GPU. ``true`` with too few GPUs, and CPU requests that no node or the
    whole cluster can hold, are a ConfigError (exit 2) before anything starts, never a wait; so is
    ``ray.spread`` (a worker per peer, each on its own node) with fewer nodes that can hold a worker
    than workers (``check_nodes``).
    """
    r = cfg.ray
    names = [p.name for p in cfg.peers]
    mode = str(r.use_gpu).lower()
    node_gpus = [int(n.get("GPU", 0.0) + 1e-9) for n in nodes]
    total_gpus = sum(node_gpus)
    replicas = r.replicas_per_peer
    # Workers that hold every peer once (W); with replicas each of them is R workers (replica-major ranks,
    # cmd_dist.train.exchange.Exchange), so the GPUs one set of peer-workers may use are total / R.
    groups = auto_workers(len(names), total_gpus // replicas, mode) if r.placement == "auto" and not r.spread else None
    if groups is None:  # ray.spread: a worker per peer, each on its own node
        groups = len(names) if r.placement != "together" else 1
    workers = groups * replicas
    use_gpu, share, note = _gpu_share(mode, r.gpus_per_worker, workers, node_gpus)
    cpu = r.cpus_per_worker
    _check_cpus(cpu, workers, nodes)
    resources = {"CPU": cpu}
    if use_gpu:
        resources["GPU"] = share
    if r.spread and check_nodes:
        check_spread(workers, resources, nodes)
    # NCCL across GPUs; gloo on CPU and when workers share a GPU ("Duplicate GPU detected" otherwise).
    backend = "nccl" if use_gpu and workers > 1 and share >= 1 else "gloo"
    per = len(names) // groups  # contiguous, equal shares (cmd_dist.train.exchange.local_peer_indices)
    hosted = [names[i * per : (i + 1) * per] for i in range(groups)]
    device = f"{cpu:g} CPU + {share:g} GPU" if use_gpu else f"{cpu:g} CPU"
    if replicas == 1:
        where = "; ".join(f"{', '.join(h)} -> worker {i} ({device})" for i, h in enumerate(hosted))
    else:
        where = "; ".join(
            f"{', '.join(h)} -> workers {', '.join(str(j * groups + i) for j in range(replicas))}"
            for i, h in enumerate(hosted)
        )
        where += f" ({device} each, {replicas} DDP replicas per peer)"
    if use_gpu:
        how = f"on GPU{note}, {backend} exchange" if workers > 1 else "on GPU"
    else:
        how = (
            "on CPU"
            + (" (no GPU in the cluster)" if mode == "auto" else "")
            + (", gloo exchange" if workers > 1 else "")
        )
    if r.spread:
        how += ", one node each (STRICT_SPREAD)"
    strategy = "STRICT_SPREAD" if r.spread else "PACK"
    return Placement(workers, use_gpu, resources, backend, f"placement: {where}; {how}", strategy)


def _gpu_share(mode: str, gpus_per_worker: float, workers: int, node_gpus: list[int]) -> tuple[bool, float, str]:
    """(use a GPU, each worker's share of one, a note for the placement line) for ``ray.use_gpu`` ``mode``."""
    total_gpus = sum(node_gpus)

    def capacity(share: float) -> int:  # workers of this GPU share the cluster's GPUs hold
        return sum(g * int(1.0 / share + 1e-9) for g in node_gpus)

    if mode == "true":
        if total_gpus == 0:
            raise ConfigError("ray.use_gpu: true, but the Ray cluster has no GPU; use ray.use_gpu=auto or false")
        share = gpus_per_worker
        if capacity(share) < workers:
            fit = 1.0 / math.ceil(workers / total_gpus)
            raise ConfigError(
                f"ray.use_gpu: true: {workers} workers x {share:g} GPU do not fit the cluster's {total_gpus} "
                f"GPU(s); set ray.gpus_per_worker={math.floor(fit * 10000) / 10000:g}, ray.placement=together, "
                f"or ray.use_gpu=auto"
            )
        return True, share, ""
    if mode == "auto" and total_gpus > 0:
        share = gpus_per_worker
        if capacity(share) < workers:
            return True, math.floor(10000 / math.ceil(workers / total_gpus)) / 10000, f", sharing {total_gpus} GPU(s)"
        return True, share, ""
    return False, 0.0, ""


def _check_cpus(cpu: float, workers: int, nodes: list[dict[str, float]]) -> None:
    """``workers`` x ``cpu`` CPUs must fit the nodes (each worker on one node); ConfigError naming the fix."""
    node_cpus = [n.get("CPU", 0.0) for n in nodes]
    total_cpus = sum(node_cpus)
    if cpu > max(node_cpus, default=0.0) + 1e-9 or sum(int(c / cpu + 1e-9) for c in node_cpus) < workers:
        fit = math.floor(min(total_cpus / workers, max(node_cpus, default=0.0)) * 100) / 100
        fix = f"ray.cpus_per_worker={fit:g}, " if fit > 0 else ""
        raise ConfigError(
            f"ray.cpus_per_worker: {workers} workers x {cpu:g} CPU do not fit the Ray cluster "
            f"({total_cpus:g} CPUs, at most {max(node_cpus, default=0.0):g} per node); set {fix}"
            f"ray.placement=together, or use a bigger cluster"
        )


def check_spread(workers: int, need: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """``ray.spread``: a ConfigError unless ``workers`` distinct nodes can each hold one worker's ``need``.

    Ray would otherwise wait forever for a STRICT_SPREAD placement group the cluster can never place.
    Totals, not free resources, are compared: a busy cluster that can hold the job makes it wait its turn.
    """
    need = {k: v for k, v in need.items() if v > 0}
    usable = sum(1 for n in nodes if all(n.get(k, 0.0) + 1e-9 >= v for k, v in need.items()))
    if usable < workers:
        shown = ", ".join(f"{v:g} {k}" for k, v in need.items())
        raise ConfigError(
            f"ray.spread: {workers} workers need {workers} nodes with {shown} each; the cluster has {usable} such "
            f"node(s) of {len(nodes)}; add nodes, lower ray.cpus_per_worker/gpus_per_worker, or set ray.spread=false"
        )


def check_placement(cfg: Config) -> None:
    """Before Ray starts: a placement that cannot fit this machine's local Ray is a ConfigError (exit 2)."""
    if ray_address(cfg) is None and not ray.is_initialized():
        plan_placement(cfg, local_node())


def scaling_for(cfg: Config) -> tuple[ScalingConfig, str, bool]:
    """Ray Train's ScalingConfig for ``cfg`` on the connected cluster (CPU counts are checked by train())."""
    nodes = cluster_nodes() if ray.is_initialized() else []
    probe = [{**n, "CPU": max(n.get("CPU", 0.0), 1e9)} for n in nodes] or [{"CPU": 1e9}]
    # The ray.spread node count is checked by train() (and the search) against the real cluster.
    p = plan_placement(cfg, probe, check_nodes=False)
    scaling = ScalingConfig(
        num_workers=p.num_workers,
        use_gpu=p.use_gpu,
        resources_per_worker=p.resources_per_worker,
        placement_strategy=p.strategy,
    )
    return scaling, p.backend, p.use_gpu
