"""A Ray Train worker's entry point: the typed config, the run folder, and the shared training code."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

from cmd_dist.config import from_dict
from cmd_dist.launch import environment  # noqa: F401 - Ray's environment defaults, before Ray is imported
from cmd_dist.launch.failures import TrainingCodeError
from cmd_dist.launch.progress import RayReporter
from cmd_dist.runs.lock import hold_workers_lock
from cmd_dist.runs.storage import RunStore

# isort: split
import ray
import ray.train
import ray.train.torch


def _test_fault_hook(spec: str) -> Callable[[int, int], None]:
    """``job.TEST_FAULT = "raise:<rank>:<epoch>"``: that rank raises before that epoch (tests only)."""
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
    import torch

    from cmd_dist.train.monitor import Monitor
    from cmd_dist.train.worker import run_worker

    if not config.get("verbose", False):
        _quiet_report_log()
    cfg = from_dict(config["cfg"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    workers_lock = hold_workers_lock(config["run_dir"])
    store = RunStore.open(config["run_dir"])  # a folder, or a URI staged in a folder of this process
    fault = config.get("test_fault")
    echo, hparams = config.get("echo", True), config.get("hparams")
    reporter = RayReporter(progress=config.get("progress", False))
    try:
        return run_worker(
            cfg,
            store,
            reporter,
            device,
            monitor_factory=(lambda c, d, s: Monitor(c, d, s, echo=echo, hparams=hparams))
            if config.get("monitor", True)
            else None,
            fault_hook=_test_fault_hook(fault) if fault else None,
        )
    except Exception as e:
        reporter.close_bars()
        rank = ray.train.get_context().get_world_rank()
        raise TrainingCodeError(
            rank, type(e).__name__, str(e), traceback.format_exc(), getattr(e, "errno", None)
        ) from None
    finally:
        store.close()
        if workers_lock is not None:
            os.close(workers_lock)


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
