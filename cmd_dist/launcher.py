"""The one place that imports Ray for training: a Ray Train (V2) job whose workers host the peers.

By default each peer is its own Ray Train worker (its own GPU when the cluster has GPUs); with
``ray.placement=together`` one worker hosts every peer. With no address a fresh local Ray is
started (never whatever cluster Ray's ``ray_current_cluster`` file names); ``ray.address`` /
``RAY_ADDRESS`` joins a cluster, after checking within seconds that it answers.

Failures (docs/reliability.md): Ray itself never retries (``FailureConfig(max_failures=0)``); the
driver looks at what failed. A lost worker (its process died, or its node) restarts the peer group
from the newest complete checkpoint, at most ``ray.max_failures`` times, with one notice line; an
exception raised by the training code fails the run at once (:class:`RunFailed`), with the
worker's traceback, and the run folder as it was.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmd_dist.checkpoint import RunFolderBusy, RunLock, atomic_write_bytes, checkpoint_epoch, newest_complete_checkpoint
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
from ray.train import (  # noqa: E402
    CheckpointConfig,
    ControllerError,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    WorkerGroupError,  # noqa: E402
)
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


#: Run folders this process holds the lock of (a process may train the same folder again, e.g. tests).
_LOCKS: dict[Path, RunLock] = {}


def lock_run_dir(run_dir: Path) -> None:
    """Hold ``run_dir``'s lock until this process exits; ConfigError (exit 2) if another run holds it."""
    run_dir = Path(run_dir)
    if run_dir in _LOCKS:
        return
    try:
        _LOCKS[run_dir] = RunLock(run_dir).acquire()
    except RunFolderBusy as e:
        raise ConfigError(str(e)) from None


def resolve_run_dir(cfg: Config) -> Path:
    """Absolute paths (Ray workers run elsewhere) and a run name; locks the folder, writes config.yaml and git_rev."""
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    if cfg.data.dataset != "digits":
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if not cfg.run_name:
        cfg.run_name = time.strftime("cmd-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / cfg.run_name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir)
        existing = run_dir / "config.yaml"
        if existing.is_file() and existing.read_text() != dump_yaml(cfg):
            raise ConfigError(
                f"run_name: {cfg.run_name!r} already exists in {cfg.output_dir} with a different config; "
                f"use 'cmd-dist train --resume {run_dir}' to continue it, or choose a new run_name"
            )
        atomic_write_bytes(run_dir / "config.yaml", dump_yaml(cfg).encode())
        atomic_write_bytes(run_dir / "git_rev.txt", (git_revision() + "\n").encode())
    except OSError as e:
        raise ConfigError(
            f"output_dir: cannot write the run folder {run_dir} ({e.strerror or e}); choose a writable "
            f"output_dir with free space"
        ) from None
    return run_dir


#: Seconds to wait for a given Ray address to answer before giving up with one line.
CONNECT_TIMEOUT_S = 5.0


def ray_address(cfg: Config) -> str | None:
    """The cluster to join (``ray.address``, else RAY_ADDRESS), or None for a fresh local Ray."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A ``HOST:PORT`` address must accept a TCP connection within ``timeout``; ConfigError otherwise.

    Without this, ray.init on a dead address retries "Failed to connect to GCS" for minutes and
    ignores Ctrl-C. Other forms (``auto``, ``ray://``) are left to Ray.
    """
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (getattr(e, "strerror", None) or str(e))
        raise ConfigError(
            f"ray.address: no Ray cluster answers at {address} ({reason} after {timeout:g} s); start it "
            f"('ray start --head'), fix the address, or leave it out for a local Ray"
        ) from None


def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` / RAY_ADDRESS, or start a fresh local Ray bound to 127.0.0.1, no dashboard."""
    if ray.is_initialized():
        return
    address = ray_address(cfg)
    # Ray's own INFO/WARNING chatter (per-report logs; the placement-group cleaner polling a state
    # API that only exists with the dashboard) drowns the epoch lines; errors still show.
    kwargs: dict[str, Any] = dict(
        log_to_driver=True,
        logging_config=ray.LoggingConfig(log_level="ERROR"),
        runtime_env={"env_vars": {key: os.environ[key] for key in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",)}},
    )
    if address is None:
        # "local": always a new cluster. address=None would join whatever Ray's ray_current_cluster
        # file names (a `ray start` left running, another program's Ray, or one long dead: a hang).
        address = "local"
        kwargs.update(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", include_dashboard=False)
    else:
        check_reachable(address)
    ray.init(address=address, **kwargs)


# ----------------------------------------------------------------------------- placement (pure)


@dataclass
class Placement:
    """Where the peers run: Ray Train workers, what each asks for, the exchange backend, one line to print."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    backend: str
    line: str


def plan_placement(cfg: Config, nodes: list[dict[str, float]]) -> Placement:
    """Decide the placement from the config and the cluster's alive nodes' total resources (pure).

    ``ray.use_gpu: auto`` puts the workers on the GPUs that exist: one GPU each when there are
    enough, else GPU shares (e.g. 2 workers on 1 GPU: 0.5 each, exchanging through gloo); CPU only
    when the cluster has no GPU. ``true`` with too few GPUs, and CPU requests that no node or the
    whole cluster can hold, are a ConfigError (exit 2) before anything starts, never a wait.
    """
    r = cfg.ray
    names = [p.name for p in cfg.peers]
    workers = len(names) if r.placement == "separate" else 1
    mode = str(r.use_gpu).lower()
    node_gpus = [int(n.get("GPU", 0.0) + 1e-9) for n in nodes]
    total_gpus = sum(node_gpus)

    def capacity(share: float) -> int:  # workers of this GPU share the cluster's GPUs hold
        return sum(g * int(1.0 / share + 1e-9) for g in node_gpus)

    use_gpu, share, note = False, 0.0, ""
    if mode == "true":
        if total_gpus == 0:
            raise ConfigError("ray.use_gpu: true, but the Ray cluster has no GPU; use ray.use_gpu=auto or false")
        share = r.gpus_per_worker
        if capacity(share) < workers:
            fit = 1.0 / math.ceil(workers / total_gpus)
            raise ConfigError(
                f"ray.use_gpu: true: {workers} workers x {share:g} GPU do not fit the cluster's {total_gpus} "
                f"GPU(s); set ray.gpus_per_worker={math.floor(fit * 10000) / 10000:g}, ray.placement=together, "
                f"or ray.use_gpu=auto"
            )
        use_gpu = True
    elif mode == "auto" and total_gpus > 0:
        use_gpu, share = True, r.gpus_per_worker
        if capacity(share) < workers:
            share = math.floor(10000 / math.ceil(workers / total_gpus)) / 10000
            note = f", sharing {total_gpus} GPU(s)"
    cpu = r.cpus_per_worker
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
    resources = {"CPU": cpu}
    if use_gpu:
        resources["GPU"] = share
    # NCCL across GPUs; gloo on CPU and when workers share a GPU ("Duplicate GPU detected" otherwise).
    backend = "nccl" if use_gpu and workers > 1 and share >= 1 else "gloo"
    if r.placement == "separate":
        hosted = [[n] for n in names]
    else:
        hosted = [names]
    device = f"{cpu:g} CPU + {share:g} GPU" if use_gpu else f"{cpu:g} CPU"
    where = "; ".join(f"{', '.join(h)} -> worker {i} ({device})" for i, h in enumerate(hosted))
    if use_gpu:
        how = f"on GPU{note}, {backend} exchange" if workers > 1 else "on GPU"
    else:
        how = (
            "on CPU"
            + (" (no GPU in the cluster)" if mode == "auto" else "")
            + (", gloo exchange" if workers > 1 else "")
        )
    return Placement(workers, use_gpu, resources, backend, f"placement: {where}; {how}")


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def local_node() -> list[dict[str, float]]:
    """What a fresh local Ray will have (its defaults: every CPU core, every visible CUDA device)."""
    import torch

    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def check_placement(cfg: Config) -> None:
    """Before Ray starts: a placement that cannot fit this machine's local Ray is a ConfigError (exit 2)."""
    if ray_address(cfg) is None and not ray.is_initialized():
        plan_placement(cfg, local_node())


def scaling_for(cfg: Config) -> tuple[ScalingConfig, str, bool]:
    """Ray Train's ScalingConfig for ``cfg`` on the connected cluster (CPU counts are checked by train())."""
    nodes = cluster_nodes() if ray.is_initialized() else []
    probe = [{**n, "CPU": max(n.get("CPU", 0.0), 1e9)} for n in nodes] or [{"CPU": 1e9}]
    p = plan_placement(cfg, probe)
    scaling = ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu, resources_per_worker=p.resources_per_worker)
    return scaling, p.backend, p.use_gpu


class RayReporter:
    """Ray Train's report API behind the engine's Reporter protocol (checkpoints live in the run folder)."""

    def __init__(self) -> None:
        self._bars: list[Any] = []

    def report(self, metrics: dict[str, Any]) -> None:
        ray.train.report(metrics)

    def progress(self, total: int, desc: str) -> Any:
        from ray.experimental.tqdm_ray import tqdm

        self._bars = [b for b in self._bars if not getattr(b, "_closed", False)]
        bar = tqdm(total=total, desc=desc)
        self._bars.append(bar)
        return bar

    def close_bars(self) -> None:
        """Close bars a failing epoch left open: the driver would otherwise redraw them above every later line."""
        for bar in self._bars:
            try:
                bar.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self._bars = []


class TrainingCodeError(RuntimeError):
    """An exception raised by the training code in a worker, with the worker's traceback as text."""

    def __init__(self, rank: int, kind: str, message: str, tb: str, errno_: int | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.rank, self.kind, self.message, self.tb, self.errno = rank, kind, message, tb, errno_

    def __reduce__(self):
        return (self.__class__, (self.rank, self.kind, self.message, self.tb, self.errno))


def _test_fault_hook(spec: str) -> Callable[[int, int], None]:
    """``CMD_DIST_TEST_FAULT=raise:<rank>:<epoch>``: that rank raises before that epoch (tests only)."""
    kind, rank, epoch = spec.split(":")

    def hook(r: int, e: int) -> None:
        if kind == "raise" and r == int(rank) and e == int(epoch):
            raise ValueError(f"test fault: rank {r} raises before epoch {e}")

    return hook


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker entry point: plain dict -> typed config -> the shared training code.

    Exceptions of the training code leave as :class:`TrainingCodeError` carrying the traceback text
    (Ray hands the driver the exception without its traceback); rank 0 returns the last metrics.
    """
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
    fault = config.get("test_fault")
    reporter = RayReporter()
    try:
        return run_worker(
            cfg,
            run_dir,
            reporter,
            device,
            monitor_factory=(lambda c, d, s: Monitor(c, d, s)) if config.get("monitor", True) else None,
            fault_hook=_test_fault_hook(fault) if fault else None,
        )
    except Exception as e:
        reporter.close_bars()
        rank = ray.train.get_context().get_world_rank()
        raise TrainingCodeError(
            rank, type(e).__name__, str(e), traceback.format_exc(), getattr(e, "errno", None)
        ) from None


def build_trainer(
    cfg: Config,
    run_dir: Path,
    callbacks: list | None = None,
    monitor: bool = True,
    placement: Placement | None = None,
    verbose: bool = False,
) -> TorchTrainer:
    if placement is None:
        scaling, backend, _ = scaling_for(cfg)
    else:
        scaling = ScalingConfig(
            num_workers=placement.num_workers,
            use_gpu=placement.use_gpu,
            resources_per_worker=placement.resources_per_worker,
        )
        backend = placement.backend
    run_config = RunConfig(
        name=run_dir.name,
        storage_path=str(run_dir.parent),
        # Ray never retries by itself: fit_with_restarts tells a lost worker (restart) from an error
        # of the training code (fail at once). Worker-group start is retried twice, not forever.
        failure_config=FailureConfig(max_failures=0, controller_failure_limit=2),
        # The engine writes, verifies and prunes the checkpoints itself (run_dir/checkpoint_<epoch>).
        checkpoint_config=CheckpointConfig(num_to_keep=None),
        callbacks=callbacks or None,
        # Ray Train's own log lines (per-report records, failure-policy decisions, the tracebacks
        # of a lost worker's partners) only with --verbose: the driver prints one line per event.
        logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "CRITICAL"),
    )
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "run_dir": str(run_dir),
            "monitor": monitor,
            # Tests inject a fault in the training code with CMD_DIST_TEST_FAULT (see _test_fault_hook).
            "test_fault": os.environ.get("CMD_DIST_TEST_FAULT", ""),
        },
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend=backend),
    )


class RunFailed(RuntimeError):
    """The run cannot go on: ``str(e)`` is the one line to print, ``detail`` the traceback (if any)."""

    def __init__(self, message: str, detail: str = "", code: int = 1) -> None:
        super().__init__(message)
        self.detail, self.code = detail, code


def lost_workers(error: WorkerGroupError) -> dict[int, str]:
    """Ranks whose worker process (or node) is gone, with Ray's reason; empty when all errors are the code's.

    A dead actor reaches the driver as Ray Train's WorkerHealthCheckFailedError wrapping a
    ``ray.exceptions.RayActorError`` (ActorDiedError: process killed, node lost). Everything else,
    e.g. our TrainingCodeError or a peer's collective failing because its partner died, is not a loss.
    Pinned by tests/test_faults.py::test_lost_worker_classification_matches_ray.
    """
    lost = {}
    for rank, err in error.worker_failures.items():
        inner = getattr(err, "health_check_failure", err)
        if isinstance(inner, ray.exceptions.RayActorError) or isinstance(err, ray.exceptions.RayActorError):
            lost[rank] = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    return lost


def code_error(error: WorkerGroupError) -> TrainingCodeError | BaseException:
    """The first training-code exception among the workers' failures (lowest rank), else any failure."""
    failures = dict(sorted(error.worker_failures.items()))
    for err in failures.values():
        if isinstance(err, TrainingCodeError):
            return err
    return next(iter(failures.values()), error)


#: errnos that mean "the disk cannot take the run's files": a one-line error, never a retry. (Permission
#: errors keep their traceback: they may come from any file, not only the run folder.)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _failed_line(err: BaseException, run_dir: Path) -> str:
    resume = f"cmd-dist train --resume {run_dir}"
    if isinstance(err, TrainingCodeError):
        if err.errno in WRITE_ERRNOS:
            return (
                f"cannot write to the run folder ({err.kind}: {err.message}); free space (or use a "
                f"writable output_dir), then continue with: {resume}"
            )
        return (
            f"the training code raised {err.kind} in worker {err.rank}: {err.message} (not retried; the run "
            f"folder {run_dir} is kept; fix the cause, then continue with: {resume})"
        )
    return f"training failed: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}"


def run_interruptibly(fn: Callable[[], Any]) -> Any:
    """``fn()`` (a Ray Train or Tune fit) in a helper thread; the caller waits in short, interruptible joins.

    Ray Train (and Tune) install their own SIGINT handlers when fit() runs in the main thread (Train
    aborts the run and exits 1, or does nothing while the main thread is blocked in ray.get); in a
    helper thread they do not, so Ctrl-C and SIGTERM reach the caller as KeyboardInterrupt within a
    fraction of a second.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="cmd-dist-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def fit_with_restarts(
    cfg: Config,
    run_dir: Path,
    callbacks: list | None = None,
    monitor: bool = True,
    placement: Placement | None = None,
    log: Callable[[str], None] = print,
    verbose: bool = False,
) -> Any:
    """Fit; after a lost worker, fit again from the newest complete checkpoint (``ray.max_failures`` times).

    Raises RunFailed at once for an exception of the training code, a run folder that cannot be
    written, or a worker group Ray could not start.
    """
    restarts = 0
    while True:
        trainer = build_trainer(cfg, run_dir, callbacks, monitor, placement, verbose)
        try:
            return run_interruptibly(trainer.fit)
        except WorkerGroupError as e:
            lost = lost_workers(e)
            if not lost:
                err = code_error(e)
                detail = err.tb if isinstance(err, TrainingCodeError) else "".join(traceback.format_exception(e))
                if isinstance(err, TrainingCodeError) and err.errno in WRITE_ERRNOS and not verbose:
                    detail = ""  # a full or read-only disk is not a bug: the one line says it all
                raise RunFailed(_failed_line(err, run_dir), detail) from None
            restarts += 1
            ranks = ", ".join(str(r) for r in sorted(lost))
            if restarts > cfg.ray.max_failures:
                raise RunFailed(
                    f"worker {ranks} lost again ({next(iter(lost.values()))}); gave up after "
                    f"{cfg.ray.max_failures} restart(s) (ray.max_failures); continue with: "
                    f"cmd-dist train --resume {run_dir}",
                    "".join(traceback.format_exception(e)) if verbose else "",
                ) from None
            newest = newest_complete_checkpoint(run_dir, len(cfg.peers), warn=lambda _: None)
            start = f"epoch {checkpoint_epoch(newest)}'s checkpoint" if newest else "the start (no checkpoint yet)"
            log(
                f"cmd-dist: worker {ranks} was lost ({next(iter(lost.values()))}); restarting the peer group "
                f"from {start} (restart {restarts} of at most {cfg.ray.max_failures})"
            )
            if verbose:
                log("".join(traceback.format_exception(e)))
        except ControllerError as e:
            cause = getattr(e, "controller_failure", e)
            raise RunFailed(
                f"Ray could not run the worker group: {str(cause).strip().splitlines()[0]}",
                "".join(traceback.format_exception(e)),
            ) from None


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
    }
    atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def train(cfg: Config, run_dir: Path | None = None, log: Callable[[str], None] = print, verbose: bool = False) -> dict:
    """Run (or resume) a training job on Ray and return its summary (also written to summary.json).

    Raises ConfigError (the placement cannot fit) before any worker starts, RunFailed when the run
    fails, KeyboardInterrupt on Ctrl-C / SIGTERM (the caller prints the resume command).
    """
    run_dir = run_dir or resolve_run_dir(cfg)
    lock_run_dir(run_dir)
    init_ray(cfg)
    placement = plan_placement(cfg, cluster_nodes())
    log(f"cmd-dist: {placement.line}")
    start = time.time()
    result = fit_with_restarts(cfg, run_dir, placement=placement, log=log, verbose=verbose)
    metrics = getattr(result, "return_value", None) or result.metrics or {}
    return summarize(cfg, metrics, run_dir, time.time() - start)
