"""The one place that imports Ray for training: a Ray Train (V2) job whose workers host the peers.

By default each peer is its own Ray Train worker (its own GPU when the cluster has GPUs); with
``ray.placement=together`` one worker hosts every peer. ``ray.init()`` starts a local Ray when no
address is given (the embedded default); ``ray.address`` / ``RAY_ADDRESS`` joins a cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
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
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig  # noqa: E402
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


@dataclass
class Console:
    """What the driver's console shows. Quiet by default: the epoch lines, one live progress bar when
    stdout is a terminal, and errors; ``verbose`` (``--verbose``) brings Ray's own INFO logs back."""

    verbose: bool = False
    #: A live progress bar; only on a terminal (piped into a file, tqdm's carriage returns are garbage).
    progress: bool = False


CONSOLE = Console()


def set_console(verbose: bool = False, progress: bool | None = None) -> Console:
    """Called by the CLI before Ray starts; ``progress`` defaults to "stdout is a terminal"."""
    CONSOLE.verbose = verbose
    CONSOLE.progress = sys.stdout.isatty() if progress is None else progress
    return CONSOLE


def ray_log_level() -> str:
    """Core Ray's Python loggers in every process: INFO with --verbose, else ERROR (the placement-group
    cleaner warns on every poll of a state API that only exists with the dashboard). Ray Train's own
    level is set per run in :func:`build_trainer` (WARNING: its failure and restart warnings stay)."""
    return "INFO" if CONSOLE.verbose else "ERROR"


def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` / RAY_ADDRESS, or start a local Ray bound to 127.0.0.1, no dashboard."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    env_vars = {key: os.environ[key] for key in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",)}
    if not CONSOLE.verbose:
        # Ray Train's preemption watcher only logs spot-node preemptions (failures are handled either way)
        # and makes Ray's core print a C++ error line about its constructor arguments on every run.
        env_vars["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    kwargs: dict[str, Any] = dict(
        log_to_driver=True,
        logging_config=ray.LoggingConfig(log_level=ray_log_level()),
    )
    # Ray Train's placement-group cleaner (an actor) finds its cluster through RAY_ADDRESS; without it, on
    # a machine with several Ray instances, it cannot tell which is its own and dies with a traceback.
    chosen_port = None
    if address is None:
        kwargs.update(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", include_dashboard=False)
        if not os.environ.get("RAY_GCS_SERVER_PORT"):
            chosen_port = _free_port()
            os.environ["RAY_GCS_SERVER_PORT"] = str(chosen_port)  # read by ray.init's local start
        env_vars["RAY_ADDRESS"] = f"127.0.0.1:{os.environ['RAY_GCS_SERVER_PORT']}"
    elif not address.startswith("ray://"):
        env_vars.setdefault("RAY_ADDRESS", address)
        if address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
            kwargs["_node_ip_address"] = "127.0.0.1"  # a loopback cluster: this node is 127.0.0.1 too
    kwargs["runtime_env"] = {"env_vars": env_vars}
    try:
        ray.init(address=address, **kwargs)
    finally:
        if chosen_port is not None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
    if not CONSOLE.verbose:
        _collapse_forwarded_tracebacks()


class _CollapseTracebacks:
    """Wraps Ray's printer of the lines its workers and actors write to stderr/stdout (``log_to_driver``).

    Ray's internal actors log transient trouble with a full traceback (a state-API poll failing, a worker
    thread hit by SIGTERM while the cluster shuts down). Each traceback becomes its last line, the
    exception, so a warning that matters still shows in one line; a process told to exit (SystemExit,
    KeyboardInterrupt) shows nothing, nor do warnings Ray itself calls safe to ignore (its autoscaling
    coordinator timing out on a busy machine; this fixed-size job asks no autoscaler for anything).
    ``--verbose`` keeps everything.
    """

    def __init__(self, handler: Any) -> None:
        self._handler = handler
        self._inside: set[tuple[Any, Any]] = set()
        self._benign: set[tuple[Any, Any]] = set()

    def __call__(self, data: dict[str, Any]) -> None:
        key = (data.get("ip"), data.get("pid"))
        out = []
        for line in data.get("lines", []):
            if line.startswith(_BENIGN):
                self._benign.add(key)  # and the traceback that follows it
            elif line.startswith("Traceback (most recent call last)") or _THREAD_DIED.match(line):
                self._inside.add(key)
            elif key not in self._inside:
                out.append(line)
            elif not line.strip() or line[0] in " \t^~" or line.startswith(_CHAINED):
                continue  # a frame, a caret line, a blank, or "During handling of the above exception ..."
            else:
                self._inside.discard(key)
                if key in self._benign:
                    self._benign.discard(key)
                elif not line.startswith(("SystemExit", "KeyboardInterrupt")):
                    out.append(line)
        if out:
            self._handler({**data, "lines": out})


_THREAD_DIED = re.compile(r"^Exception (in thread|ignored in)\b")
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
_BENIGN = ("Failed to send resource request for ",)  # "... it's safe to ignore this error", says Ray


def _collapse_forwarded_tracebacks() -> None:
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its output stays as it is
        return
    with dispatcher._lock:
        dispatcher.handlers = [
            (name, _CollapseTracebacks(h) if name == "ray_print_logs" and not isinstance(h, _CollapseTracebacks) else h)
            for name, h in dispatcher.handlers
        ]


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def __init__(self, progress: bool = False) -> None:
        self._tmp: list[Any] = []
        self._show_progress = progress
        self._bar: _RunBar | None = None

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
        if not self._show_progress:
            return None
        if self._bar is None:
            self._bar = _RunBar()
        return self._bar.start_epoch(total, desc)


_EPOCH_DESC = re.compile(r"epoch (\d+)/(\d+)")


class _RunBar:
    """One ``tqdm_ray`` bar for the whole run, reset at each epoch.

    The driver draws a worker's tqdm_ray bars and keeps the line of every closed bar; one bar per
    epoch would leave a bar line beside every epoch line. This one is reused and closed only after
    the last epoch's steps, long before the run ends, so the final lines print below it.
    """

    def __init__(self) -> None:
        from ray.experimental.tqdm_ray import tqdm

        self._bar = tqdm(total=1, desc="")
        self._last = False

    def start_epoch(self, total: int, desc: str) -> _RunBar:
        match = _EPOCH_DESC.search(desc)
        self._last = bool(match) and int(match.group(1)) >= int(match.group(2))
        self._bar.n = 0
        self._bar.total = total
        self._bar.set_description(desc)
        return self

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        if self._last:
            self._bar.close()
        else:
            self._bar.refresh()


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: plain dict -> typed config -> the shared training code."""
    import torch

    from cmd_dist.engine import run_worker
    from cmd_dist.monitor import Monitor

    if not config.get("verbose", False):
        _quiet_report_log()
    cfg = from_dict(config["cfg"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    run_dir = Path(config["run_dir"])
    echo, hparams = config.get("echo", True), config.get("hparams")
    run_worker(
        cfg,
        run_dir,
        RayReporter(progress=config.get("progress", False)),
        device,
        monitor_factory=(lambda c, d, s: Monitor(c, d, s, echo=echo, hparams=hparams))
        if config.get("monitor", True)
        else None,
        checkpoint_search_dir=run_dir,
    )


def _quiet_report_log() -> None:
    """Ray Train logs every report (``Reporting training result 1: TrainingReport(...)``, every metric, on
    one line) through a logger named after its file, outside ``ray.train``, so RunConfig's log level
    misses it: raise that logger's level here, in the worker."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without that module does not print these lines either
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def build_trainer(
    cfg: Config,
    run_dir: Path,
    callbacks: list | None = None,
    monitor: bool = True,
    echo: bool = True,
    hparams: dict[str, Any] | None = None,
) -> TorchTrainer:
    """The Ray Train job for one run. ``echo``: print the epoch lines (Tune trials do not: the search
    prints one line per finished trial). ``hparams``: written as TensorBoard HParams (Tune trials)."""
    scaling, backend, _ = scaling_for(cfg)
    run_config = RunConfig(
        name=run_dir.name,
        storage_path=str(run_dir.parent),
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints),
        callbacks=callbacks or None,
        # Ray Train's per-report `Reporting training result ...: TrainingReport(...)` lines and worker-group
        # set-up chatter are INFO; its warnings (restarts, failures) stay.
        logging_config=LoggingConfig(log_level="INFO" if CONSOLE.verbose else "WARNING"),
    )
    loop_config = {
        "cfg": cfg.to_dict(),
        "run_dir": str(run_dir),
        "monitor": monitor,
        "echo": echo,
        "progress": CONSOLE.progress and echo,
        "hparams": hparams,
        "verbose": CONSOLE.verbose,
    }
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend=backend),
    )


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


def train(cfg: Config, run_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) a training job on Ray and return its summary (also written to summary.json)."""
    run_dir = run_dir or resolve_run_dir(cfg)
    init_ray(cfg)
    start = time.time()
    result = build_trainer(cfg, run_dir).fit()
    return summarize(cfg, result.metrics or {}, run_dir, time.time() - start)
