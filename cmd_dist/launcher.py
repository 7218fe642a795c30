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

from cmd_dist.checkpoint import atomic_write_bytes
from cmd_dist.config import Config, ConfigError, dump_yaml, from_dict

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


def resolve_run_dir(cfg: Config) -> Path:
    """Absolute paths (Ray workers run elsewhere) and a run name; writes config.yaml and git_rev."""
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    if cfg.data.dataset != "digits":
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.noise.label_file:
        cfg.noise.label_file = str(Path(cfg.noise.label_file).expanduser().resolve())
    for peer in cfg.peers:  # workers may run elsewhere: every file path absolute
        if peer.weights:
            peer.weights = str(Path(peer.weights).expanduser().resolve())
    if not cfg.run_name:
        cfg.run_name = time.strftime("cmd-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / cfg.run_name
    existing = run_dir / "config.yaml"
    if existing.is_file() and existing.read_text() != dump_yaml(cfg):
        raise ConfigError(
            f"run_name: {cfg.run_name!r} already exists in {cfg.output_dir} with a different config; "
            f"use 'cmd-dist train --resume {run_dir}' to continue it, or choose a new run_name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / "git_rev.txt").write_text(git_revision() + "\n")
    return run_dir


def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` / RAY_ADDRESS, or start a local Ray bound to 127.0.0.1, no dashboard."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    # Ray's own INFO/WARNING chatter (per-report logs; the placement-group cleaner polling a state
    # API that only exists with the dashboard) drowns the epoch lines; errors still show.
    kwargs: dict[str, Any] = dict(
        log_to_driver=True,
        logging_config=ray.LoggingConfig(log_level="ERROR"),
        runtime_env={"env_vars": {key: os.environ[key] for key in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",)}},
    )
    if address is None:
        kwargs.update(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", include_dashboard=False)
    ray.init(address=address, **kwargs)


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
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources), backend, use_gpu


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
    run_dir = Path(config["run_dir"])
    run_worker(
        cfg,
        run_dir,
        RayReporter(),
        device,
        monitor_factory=(lambda c, d, s: Monitor(c, d, s)) if config.get("monitor", True) else None,
        checkpoint_search_dir=run_dir,
    )


def build_trainer(cfg: Config, run_dir: Path, callbacks: list | None = None, monitor: bool = True) -> TorchTrainer:
    scaling, backend, _ = scaling_for(cfg)
    run_config = RunConfig(
        name=run_dir.name,
        storage_path=str(run_dir.parent),
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


def _finite_or_none(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and x == x and abs(x) != float("inf") else None


def summarize(cfg: Config, metrics: dict[str, Any], run_dir: Path, wall_s: float) -> dict[str, Any]:
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
        # Realised fraction of training labels != clean labels (null where no clean label is known).
        "noise_rate": _finite_or_none(metrics.get("noise_rate")),
        "skipped_images": metrics.get("skipped_images", 0),
    }
    atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def train(cfg: Config, run_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) a training job on Ray and return its summary (also written to summary.json)."""
    run_dir = run_dir or resolve_run_dir(cfg)
    init_ray(cfg)
    start = time.time()
    result = build_trainer(cfg, run_dir).fit()
    return summarize(cfg, result.metrics or {}, run_dir, time.time() - start)
