"""The Ray Train (V2) job of a run: its workers host the peers; the driver restarts a lost peer group.

By default each peer is its own Ray Train worker (its own GPU when the cluster has GPUs); with
``ray.placement=together`` one worker hosts every peer. With no address a fresh local Ray is
started (never whatever cluster Ray's ``ray_current_cluster`` file names); ``ray.address`` /
``RAY_ADDRESS`` joins a cluster, after checking within seconds that it answers (:mod:`cmd_dist.launch.cluster`).

Failures (docs/reliability.md): Ray itself never retries (``FailureConfig(max_failures=0)``); the
driver looks at what failed (:mod:`cmd_dist.launch.failures`). A lost worker (its process died, or its node)
restarts the peer group from the newest complete checkpoint, at most ``ray.max_failures`` times, with one notice
line; an exception raised by the training code fails the run at once (:class:`RunFailed`), with the worker's
traceback, and the run folder as it was.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmd_dist.config import Config, dump_yaml
from cmd_dist.errors import first_line
from cmd_dist.launch import environment  # noqa: F401 - Ray's environment defaults, before Ray is imported
from cmd_dist.launch.cluster import cluster_nodes, init_ray
from cmd_dist.launch.console import CONSOLE
from cmd_dist.launch.failures import (
    WRITE_ERRNOS,
    RunFailed,
    TrainingCodeError,
    code_error,
    failed_line,
    lost_nodes,
    lost_workers,
)
from cmd_dist.launch.placement import Placement, plan_placement, scaling_for
from cmd_dist.launch.revision import git_revision
from cmd_dist.launch.shared_output import check_shared_output
from cmd_dist.launch.summary import summarize
from cmd_dist.launch.worker import train_worker
from cmd_dist.runs.fs import absolute, arrow_storage, split_location
from cmd_dist.runs.lock import hold_run_lock
from cmd_dist.runs.run_folder import newest_checkpoint_epoch, open_run_folder

# isort: split
from ray.train import (
    CheckpointConfig,
    ControllerError,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    WorkerGroupError,
)
from ray.train.torch import TorchConfig, TorchTrainer


def resolve_run_dir(cfg: Config, lock: bool = True) -> Path | str:
    """Absolute paths (Ray workers run elsewhere) and a run name; locks the folder, writes config.yaml and git_rev.

    Returns the run folder: a Path, or a str when ``output_dir`` is a filesystem URI (``s3://``, ``file://``, ...).
    ``lock=False`` leaves the lock out (:func:`~cmd_dist.runs.run_folder.open_run_folder`): a tune trial's folder
    behind a URI, covered by its search's lock (a trial killed with its search would otherwise leave a lock that
    refuses ``--resume`` for a while).
    """
    cfg.output_dir = str(absolute(cfg.output_dir))
    if cfg.data.dataset != "digits":
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.noise.label_file:
        cfg.noise.label_file = str(Path(cfg.noise.label_file).expanduser().resolve())
    for peer in cfg.peers:  # workers may run elsewhere: every file path absolute
        if peer.weights:
            peer.weights = str(Path(peer.weights).expanduser().resolve())
    if not cfg.run_name:
        cfg.run_name = time.strftime("cmd-%Y%m%d-%H%M%S")
    return open_run_folder(cfg.output_dir, cfg.run_name, dump_yaml(cfg), git_revision(), lock=lock)


#: A fault the tests inject into the training code, ``raise:<rank>:<epoch>`` (see cmd_dist.launch.worker). A
#: module attribute of the process that builds the trainer, set with monkeypatch: an environment variable leaked
#: from the test that set it into later Tune trials of the shared test cluster.
TEST_FAULT = ""


def build_trainer(
    cfg: Config,
    run_dir: Path | str,
    callbacks: list | None = None,
    monitor: bool = True,
    placement: Placement | None = None,
    verbose: bool = False,
    echo: bool = True,
    hparams: dict[str, Any] | None = None,
) -> TorchTrainer:
    """The Ray Train job for one run. ``echo``: print the epoch lines (Tune trials do not: the search
    prints one line per finished trial). ``hparams``: written as TensorBoard HParams (Tune trials)."""
    if placement is None:
        scaling, backend, _ = scaling_for(cfg)
    else:
        scaling = ScalingConfig(
            num_workers=placement.num_workers,
            use_gpu=placement.use_gpu,
            resources_per_worker=placement.resources_per_worker,
            placement_strategy=placement.strategy,
        )
        backend = placement.backend
    parent, name = split_location(run_dir)
    # Ray Train keeps its own run state beside ours: in the run folder's parent, a folder or the URI's filesystem.
    storage_fs, storage_path = arrow_storage(parent)
    run_config = RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        # Ray never retries by itself: fit_with_restarts tells a lost worker (restart) from an error
        # of the training code (fail at once). Worker-group start is retried twice, not forever.
        failure_config=FailureConfig(max_failures=0, controller_failure_limit=2),
        # The engine writes, verifies and prunes the checkpoints itself (run_dir/checkpoint_<epoch>).
        checkpoint_config=CheckpointConfig(num_to_keep=None),
        callbacks=callbacks or None,
        # Ray Train's own log lines (per-report records, failure-policy decisions, the tracebacks
        # of a lost worker's partners) only with --verbose: the driver prints one line per event.
        logging_config=LoggingConfig(log_level="INFO" if (verbose or CONSOLE.verbose) else "CRITICAL"),
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
        train_loop_config={
            **loop_config,
            "test_fault": TEST_FAULT,
        },
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend=backend),
    )


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
    run_dir: Path | str,
    callbacks: list | None = None,
    monitor: bool = True,
    placement: Placement | None = None,
    log: Callable[[str], None] = print,
    verbose: bool = False,
    echo: bool = True,
    hparams: dict[str, Any] | None = None,
) -> Any:
    """Fit; after a lost worker, fit again from the newest complete checkpoint (``ray.max_failures`` times).

    Raises RunFailed at once for an exception of the training code, a run folder that cannot be
    written, or a worker group Ray could not start.
    """
    restarts = 0
    while True:
        trainer = build_trainer(cfg, run_dir, callbacks, monitor, placement, verbose, echo, hparams)
        try:
            return run_interruptibly(trainer.fit)
        except WorkerGroupError as e:
            lost = lost_workers(e) or lost_nodes(e, run_dir)
            if not lost:
                err = code_error(e)
                detail = err.tb if isinstance(err, TrainingCodeError) else "".join(traceback.format_exception(e))
                if isinstance(err, TrainingCodeError) and err.errno in WRITE_ERRNOS and not verbose:
                    detail = ""  # a full or read-only disk is not a bug: the one line says it all
                raise RunFailed(failed_line(err, run_dir), detail) from None
            restarts += 1
            ranks = ", ".join(str(r) for r in sorted(lost))
            if restarts > cfg.ray.max_failures:
                raise RunFailed(
                    f"worker {ranks} lost again ({next(iter(lost.values()))}); gave up after "
                    f"{cfg.ray.max_failures} restart(s) (ray.max_failures); continue with: "
                    f"cmd-dist train --resume {run_dir}",
                    "".join(traceback.format_exception(e)) if verbose else "",
                ) from None
            newest = newest_checkpoint_epoch(run_dir, len(cfg.peers))
            start = f"epoch {newest}'s checkpoint" if newest >= 0 else "the start (no checkpoint yet)"
            log(
                f"cmd-dist: worker {ranks} was lost ({next(iter(lost.values()))}); restarting the peer group "
                f"from {start} (restart {restarts} of at most {cfg.ray.max_failures})"
            )
            if verbose:
                log("".join(traceback.format_exception(e)))
        except ControllerError as e:
            cause = getattr(e, "controller_failure", e)
            raise RunFailed(
                f"Ray could not run the worker group: {first_line(cause)}",
                "".join(traceback.format_exception(e)),
            ) from None


def train(
    cfg: Config, run_dir: Path | str | None = None, log: Callable[[str], None] = print, verbose: bool = False
) -> dict:
    """Run (or resume) a training job on Ray and return its summary (also written to summary.json).

    Raises ConfigError (the placement cannot fit) before any worker starts, RunFailed when the run
    fails, KeyboardInterrupt on Ctrl-C / SIGTERM (the caller prints the resume command).
    """
    run_dir = run_dir or resolve_run_dir(cfg)
    hold_run_lock(run_dir)
    init_ray(cfg)
    placement = plan_placement(cfg, cluster_nodes())
    check_shared_output(cfg.output_dir)
    log(f"cmd-dist: {placement.line}")
    start = time.time()
    result = fit_with_restarts(cfg, run_dir, placement=placement, log=log, verbose=verbose)
    metrics = getattr(result, "return_value", None) or result.metrics or {}
    return summarize(cfg, metrics, run_dir, time.time() - start)
