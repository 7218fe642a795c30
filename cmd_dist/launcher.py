"""The one place that imports Ray for training: a Ray Train (V2) job whose workers host the peers.

By default each peer is its own Ray Train worker (its own GPU when the cluster has GPUs); with
``ray.placement=together`` one worker hosts every peer. ``ray.init()`` starts a local Ray when no
address is given (the embedded default); ``ray.address`` / ``RAY_ADDRESS`` joins a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from cmd_dist.config import Config, ConfigError, dump_yaml, from_dict
from cmd_dist.storage import RunStore, is_uri, join, ray_storage

# Quiet, local-only defaults: no auth token warning, no doubled prints, no metrics exporter.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller takes one report per health check (default every 2 s): short epochs would
# wait for it. 0.25 s halves `make demo` and changes nothing for CIFAR-sized epochs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402


def git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def resolve_run_dir(cfg: Config) -> Path | str:
    """Absolute paths (Ray workers run elsewhere) and a run name; writes config.yaml and git_rev.

    Returns the run folder: a Path, or a URI string when ``output_dir`` is a filesystem URI (s3://, gs://, ...).
    """
    if not is_uri(cfg.output_dir):
        cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    if cfg.data.dataset != "digits":
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if not cfg.run_name:
        cfg.run_name = time.strftime("cmd-%Y%m%d-%H%M%S")
    location = join(cfg.output_dir, cfg.run_name)
    store = RunStore(location)
    existing = store.read_bytes("config.yaml")
    if existing is not None and existing.decode() != dump_yaml(cfg):
        raise ConfigError(
            f"run_name: {cfg.run_name!r} already exists in {cfg.output_dir} with a different config; "
            f"use 'cmd-dist train --resume {location}' to continue it, or choose a new run_name"
        )
    store.mkdir()
    store.write_bytes("config.yaml", dump_yaml(cfg).encode())
    store.write_bytes("git_rev.txt", (git_revision() + "\n").encode())
    return Path(location) if store.is_local else location


#: Seconds to wait for a cluster's GCS port to accept a connection before calling the address unreachable.
CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A one-line ConfigError if ``host:port`` does not accept a TCP connection within ``timeout``.

    ``ray.init`` itself retries an unreachable GCS for minutes; this answers in seconds.
    """
    import socket

    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address: {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379), 'auto' or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise ConfigError(
            f"ray.address: cannot reach a Ray cluster at {address} ({reason} after at most {timeout:g} s); "
            f"check the head node is up ('ray status' there) and the address/port, or leave --address out "
            f"for a local Ray"
        ) from None


def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` / RAY_ADDRESS, or start a local Ray bound to 127.0.0.1, no dashboard."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    # Ray's own INFO/WARNING chatter (per-report logs; the placement-group cleaner polling a state
    # API that only exists with the dashboard) drowns the epoch lines; errors still show.
    kwargs: dict[str, Any] = dict(log_to_driver=True, logging_config=ray.LoggingConfig(log_level="ERROR"))
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        # Inside a Ray Job (cmd-dist submit) the job's runtime env already carries these, and a runtime_env
        # given here would replace the job's, whose working_dir package the workers then could not download.
        kwargs["runtime_env"] = {"env_vars": {k: os.environ[k] for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",)}}
    if address is None:
        kwargs.update(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", include_dashboard=False)
    else:
        check_reachable(address)
    ray.init(address=address, **kwargs)


def alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def check_cluster_fits(cfg: Config, scaling: ScalingConfig) -> None:
    """A one-line ConfigError if no placement of the workers exists on this cluster's nodes.

    Ray Train would otherwise wait (and retry) forever for resources the cluster will never have. Totals,
    not free resources, are compared: a busy cluster that can hold the job makes it wait its turn.
    """
    need = {k: v for k, v in (scaling.resources_per_worker or {}).items() if v > 0}
    workers = scaling.num_workers
    nodes = alive_nodes()
    fits_per_node = [
        min((int(n["Resources"].get(k, 0.0) / v + 1e-9) for k, v in need.items()), default=workers) for n in nodes
    ]
    if cfg.ray.spread:
        usable = sum(1 for f in fits_per_node if f >= 1)
        if usable < workers:
            raise ConfigError(
                f"ray.spread: {workers} workers need {workers} nodes with {need} each; the cluster has "
                f"{usable} such node(s) of {len(nodes)}; add nodes, lower ray.cpus_per_worker/gpus_per_worker, "
                f"or set ray.spread=false"
            )
    elif sum(fits_per_node) < workers:
        total = {k: sum(n["Resources"].get(k, 0.0) for n in nodes) for k in need}
        raise ConfigError(
            f"the job needs {workers} workers x {need} but the Ray cluster has {total} in all; lower "
            f"ray.cpus_per_worker/gpus_per_worker, set ray.use_gpu=false, or add nodes"
        )


#: Seconds the output_dir visibility probe waits for every node's answer.
PROBE_TIMEOUT_S = 60.0


def nodes_missing_file(folder: str, name: str, token: str, timeout: float = PROBE_TIMEOUT_S) -> list[dict[str, Any]]:
    """The alive nodes on which ``folder/name`` does not hold ``token`` (one zero-CPU task pinned to each node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def read_token(path: str) -> str | None:
        try:
            return Path(path).read_text()
        except OSError:
            return None

    nodes = alive_nodes()
    refs = [
        read_token.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            str(Path(folder) / name)
        )
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    missing = []
    for node, ref in zip(nodes, refs):
        seen = ray.get(ref, timeout=1) if ref in ready else None
        if seen != token:
            missing.append(node)
    return missing


def check_shared_output(output_dir: str) -> None:
    """On a multi-node cluster a plain-path ``output_dir`` must be the same folder on every node (NFS or similar).

    A token file written here is read back by a task on every node; a node that cannot read it means the
    folder is local to this machine, and the run is refused (one line) before any worker starts.
    """
    if is_uri(output_dir) or len(alive_nodes()) < 2:
        return
    import uuid

    token = uuid.uuid4().hex
    name = f".cmd-dist-shared-{token[:12]}"
    probe = Path(output_dir) / name
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(token)
    try:
        missing = nodes_missing_file(output_dir, name, token)
    finally:
        probe.unlink(missing_ok=True)
    if missing:
        raise ConfigError(shared_output_error(output_dir, missing, len(alive_nodes())))


def shared_output_error(output_dir: str, missing: list[dict[str, Any]], total: int) -> str:
    where = ", ".join(f"{n.get('NodeManagerAddress', '?')} ({str(n.get('NodeID', ''))[:8]})" for n in missing[:3])
    return (
        f"output_dir: {output_dir} is local to this machine: {len(missing)} of the cluster's {total} nodes "
        f"cannot see it ({where}); use a folder shared by every node at the same path (NFS) or a URI such "
        f"as s3://bucket/runs or gs://bucket/runs"
    )


def scaling_for(cfg: Config) -> tuple[ScalingConfig, str, bool]:
    workers = len(cfg.peers) if cfg.ray.placement == "separate" else 1
    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    mode = str(cfg.ray.use_gpu).lower()
    per_gpu = cfg.ray.gpus_per_worker
    use_gpu = gpus >= workers * per_gpu if mode == "auto" else mode == "true"
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = per_gpu
    # NCCL across GPUs; gloo on CPU and when workers share a GPU ("Duplicate GPU detected" otherwise).
    backend = "nccl" if use_gpu and workers > 1 and per_gpu >= 1 else "gloo"
    # STRICT_SPREAD: one worker per node (peers on different machines); PACK (Ray's default) fills nodes first.
    strategy = "STRICT_SPREAD" if cfg.ray.spread else "PACK"
    scaling = ScalingConfig(
        num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources, placement_strategy=strategy
    )
    return scaling, backend, use_gpu


class RayReporter:
    """Ray Train's report/checkpoint API behind the engine's Reporter protocol."""

    def __init__(self) -> None:
        self._tmp: list[Any] = []

    def latest_checkpoint(self) -> Path | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        if Path(ckpt.path).is_dir():
            return Path(ckpt.path)
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="cmd-restore-")
        self._tmp.append(tmp)
        return Path(ckpt.to_directory(tmp.name))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def worker_info(self) -> dict[str, Any]:
        """Where this worker runs, for ``workers/rank<r>.json``."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()}

    def progress(self, total: int, desc: str) -> Any:
        from ray.experimental.tqdm_ray import tqdm

        return tqdm(total=total, desc=desc)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: plain dict -> typed config -> the shared training code."""
    import logging

    import torch

    from cmd_dist.engine import run_worker
    from cmd_dist.monitor import Monitor

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines
    cfg = from_dict(config["cfg"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    run_dir = config["run_dir"]
    run_worker(
        cfg,
        run_dir,
        RayReporter(),
        device,
        monitor_factory=(lambda c, d, s: Monitor(c, d, s)) if config.get("monitor", True) else None,
        # Older checkpoints are searched for in a local/shared run folder; behind a URI Ray restores the latest.
        checkpoint_search_dir=None if is_uri(run_dir) else Path(run_dir),
    )


def build_trainer(
    cfg: Config, run_dir: Path | str, callbacks: list | None = None, monitor: bool = True
) -> TorchTrainer:
    scaling, backend, _ = scaling_for(cfg)
    # Ray Train writes the checkpoints to output_dir/run_name itself, through a pyarrow filesystem for a URI.
    storage_path, storage_fs = ray_storage(cfg.output_dir)
    run_config = RunConfig(
        name=cfg.run_name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints),
        callbacks=callbacks or None,
    )
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(run_dir), "monitor": monitor},
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend=backend),
    )


def summarize(cfg: Config, metrics: dict[str, Any], run_dir: Path | str, wall_s: float) -> dict[str, Any]:
    split = metrics.get("eval_split", "test" if cfg.data.protocol == "final" else "val")
    peers = []
    for p in cfg.peers:
        acc = metrics.get(f"{p.name}/{split}_acc")
        best = metrics.get(f"{p.name}/best_{split}_acc")
        peers.append(
            {
                "name": p.name,
                "arch": p.arch,
                "test_acc": acc if split == "test" else None,
                "val_acc": acc if split == "val" else None,
                "best_val_acc": best if split == "val" else None,
                # Final protocol: the best epoch's test accuracy is shown, never used for selection.
                "best_test_acc": best if split == "test" else None,
                "best_epoch": metrics.get(f"{p.name}/best_epoch"),
                "train_acc_clean": metrics.get(f"{p.name}/train_acc_clean"),
                "train_acc_noisy": metrics.get(f"{p.name}/train_acc_noisy"),
            }
        )
    summary = {
        "run_dir": str(run_dir),
        "protocol": cfg.data.protocol,
        "eval_split": split,
        "epochs_run": metrics.get("epoch", 0),
        "epochs": cfg.train.epochs,
        "peers": peers,
        f"mean_{split}_acc": metrics.get(f"{split}_acc"),
        "wall_s": round(wall_s, 1),
        "stopped": metrics.get("nonfinite"),
        "splits_read": metrics.get("splits_read"),
    }
    RunStore(run_dir).write_bytes("summary.json", json.dumps(summary, indent=2).encode())
    return summary


def check_cluster(cfg: Config) -> None:
    """Before any worker starts: the cluster can place the job, and every node sees output_dir."""
    scaling, _, _ = scaling_for(cfg)
    check_cluster_fits(cfg, scaling)
    check_shared_output(cfg.output_dir)


def train(cfg: Config, run_dir: Path | str | None = None) -> dict[str, Any]:
    """Run (or resume) a training job on Ray and return its summary (also written to summary.json)."""
    run_dir = run_dir or resolve_run_dir(cfg)
    init_ray(cfg)
    check_cluster(cfg)
    start = time.time()
    result = build_trainer(cfg, run_dir).fit()
    return summarize(cfg, result.metrics or {}, run_dir, time.time() - start)
