"""A worker's life: build its peers, resume from the newest complete checkpoint, train every epoch, report.

Ray-free: the launcher passes a :class:`Reporter` (Ray Train's report in a worker, a list in a local run),
so the same code runs under Ray, in tests and in a plain process. The epoch itself is
:class:`~cmd_dist.train.trainer.Trainer`'s, the checkpoints :class:`~cmd_dist.train.checkpointer.Checkpointer`'s.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from cmd_dist.config import Config
from cmd_dist.data.prepare import prepare_data
from cmd_dist.data.types import TrainData
from cmd_dist.runs.checkpoint import atomic_write_bytes
from cmd_dist.runs.storage import RunStore
from cmd_dist.train.checkpointer import Checkpointer
from cmd_dist.train.exchange import Exchange
from cmd_dist.train.peers import build_peer, load_into_peer, peer_state
from cmd_dist.train.trainer import EpochResult, Trainer, extra_eval_sets


class Reporter(Protocol):
    """How a worker hands each epoch's metrics to whoever runs it (checkpoints live in the run folder)."""

    def report(self, metrics: dict[str, Any]) -> None: ...

    def progress(self, total: int, desc: str) -> Any: ...


def run_worker(
    cfg: Config,
    run_dir: Path | str | RunStore,
    reporter: Reporter,
    device: torch.device,
    monitor_factory: Callable[..., Any] | None = None,
    log: Callable[[str], None] = print,
    fault_hook: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train this worker's peers for all epochs; returns the last epoch's gathered metrics.

    Resumes from the newest complete checkpoint in ``run_dir`` (whatever wrote it: a killed worker
    group, an interrupted run, the same run name again) and writes one every ``train.checkpoint_every``
    epochs (see :class:`~cmd_dist.train.checkpointer.Checkpointer`). ``fault_hook(rank, epoch)`` runs
    before each epoch (tests inject faults with it). ``run_dir`` may be a filesystem URI (or a
    :class:`~cmd_dist.runs.storage.RunStore`): the run is then written in a local staging folder and copied
    there (checkpoint files by each worker, the marker last by rank 0, the logs every epoch).
    """
    store = RunStore.open(run_dir)
    data = prepare_data(cfg.data, cfg.noise, device)
    check_batches(cfg, data)
    exchange = Exchange(len(cfg.peers), cfg.ray.replicas_per_peer)
    peers = [
        build_peer(cfg, k, data.spec.num_classes, data.spec.channels, device, data.spec.size)
        for k in exchange.local_peers
    ]
    t = cfg.train
    keep = cfg.ray.keep_checkpoints
    checkpointer = Checkpointer(store, exchange, len(cfg.peers), t.epochs, t.checkpoint_every, keep, log)
    restored = checkpointer.load_latest()
    if restored.states:
        for p in peers:
            load_into_peer(p, restored.states[p.index])
    if restored.finished:  # restarted after the last epoch (e.g. the same run name again): nothing to train
        reporter.report(restored.metrics)
        return restored.metrics
    write_worker_info(store, exchange, restored.epoch, reporter)
    monitor = None
    if monitor_factory and exchange.rank == 0:
        store.download("metrics.jsonl")  # the Monitor truncates it to the resumed epoch, then appends
        monitor = monitor_factory(cfg, store.dir, restored.epoch)
    trainer = Trainer(cfg, peers, exchange, data, device)  # after loading: a CUDA graph binds the live tensors
    last: dict[str, Any] = {}
    stop = None
    for epoch in range(restored.epoch, t.epochs):
        if fault_hook is not None:
            fault_hook(exchange.rank, epoch + 1)
        lr = peers[0].optimizer.param_groups[0]["lr"]
        res = trainer.train_one_epoch(epoch, reporter.progress if exchange.rank == 0 else None)
        trainer.evaluate_peers(epoch, res)
        rows = gather_rows(exchange, data, res)
        last = flatten_metrics(cfg, data, epoch, rows, res, lr)
        stop = nonfinite_message(cfg, epoch, rows)
        if stop:
            last["nonfinite"] = stop
            break
        if monitor:
            monitor.log_epoch(epoch, rows, res, last)
            store.sync_logs()  # a URI gets every epoch's metrics and TensorBoard events at once
        states = {p.index: peer_state(p, epoch + 1) for p in peers if exchange.primary}
        checkpointer.save(epoch + 1, states, last, last[f"{data.eval_split}_acc"])
        reporter.report(last)
    if monitor:
        monitor.close()
        store.sync_logs()
    if stop:  # after the logs: the last good checkpoint stays the newest
        reporter.report(last)
    return last


def check_batches(cfg: Config, data: TrainData) -> None:
    """A batch size the training set can fill, and a last batch every replica gets a slice of."""
    if cfg.train.batch_size > data.num_train:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is larger than the {data.num_train} training images")
    replicas = cfg.ray.replicas_per_peer
    last_batch = data.num_train % cfg.train.batch_size
    if replicas > 1 and 0 < last_batch < replicas:
        raise ValueError(
            f"ray.replicas_per_peer: the epoch's last batch has {last_batch} of the {data.num_train} training images, "
            f"fewer than the {replicas} replicas that split it; choose another train.batch_size"
        )


def gather_rows(exchange: Exchange, data: TrainData, res: EpochResult) -> dict[int, dict]:
    """Every peer's row of the epoch, on every rank; ``res`` gets every peer's entropy histogram and the count
    of unreadable images met by any worker (replicas each decode their own slices, so they meet different ones)."""
    gathered = exchange.gather_objects((res.rows, res.hists, sorted(data.skipped)))
    res.hists = {k: v for _, part, _ in gathered for k, v in part.items()}
    res.skipped = len({path for _, _, paths in gathered for path in paths})
    return {k: v for part, _, _ in gathered for k, v in part.items()}


def nonfinite_message(cfg: Config, epoch: int, rows: dict[int, dict]) -> str | None:
    """The run stops at the first peer whose loss was not finite in this epoch: what to tell, or None."""
    bad = [(k, r["nonfinite_step"]) for k, r in sorted(rows.items()) if r["nonfinite_step"] >= 0]
    if not bad:
        return None
    k, s = bad[0]
    return (
        f"non-finite loss in peer {cfg.peers[k].name!r} at epoch {epoch + 1}, step {s + 1}; "
        f"stopped, the last good checkpoint is kept"
    )


def write_worker_info(store: RunStore, exchange: Exchange, start_epoch: int, reporter: Reporter | None = None) -> None:
    """``workers/rank<r>.json``: which process on which host hosts which peers, and the epochs done when it started.

    The reporter may add where it runs (the Ray launcher: the Ray node id and IP); operators and the
    cluster tests read it to see which peers ran on which node.
    """
    folder = store.dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "rank": exchange.rank,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "peers": exchange.local_peers,
        "replica": exchange.replica,
        "resumed_after_epoch": start_epoch,
        "started_at": time.time(),
    }
    where = getattr(reporter, "worker_info", None)
    if where is not None:
        info.update(where())
    atomic_write_bytes(folder / f"rank{exchange.rank}.json", json.dumps(info).encode())
    store.upload(f"workers/rank{exchange.rank}.json")


def flatten_metrics(
    cfg: Config, data: TrainData, epoch: int, rows: dict[int, dict], res: EpochResult, lr: float
) -> dict:
    """One flat dict per epoch for Ray/Tune: means over peers plus ``<peer>/<metric>`` entries."""
    split = data.eval_split
    out: dict[str, Any] = {
        "epoch": epoch + 1,
        "eval_split": split,
        "splits_read": ",".join(data.splits_read),
        "chi": res.chi,
        "lr": lr,
        "images_per_s": res.images / max(res.seconds, 1e-9),
        f"{split}_acc": sum(r["eval_acc"] for r in rows.values()) / len(rows),
        f"best_{split}_acc": sum(r["best_eval_acc"] for r in rows.values()) / len(rows),
        "extra_eval_sets": ",".join(extra_eval_sets(data)),
        "noise_rate": float(data.noise_rate),
        "skipped_images": max(res.skipped, int(data.skipped_images)),
    }
    for name in extra_eval_sets(data):
        out[f"{name}_acc"] = sum(r[f"{name}_acc"] for r in rows.values()) / len(rows)
    names = [p.name for p in cfg.peers]
    for k, r in sorted(rows.items()):
        for key, value in r.items():
            name = f"{split}_acc" if key == "eval_acc" else (f"best_{split}_acc" if key == "best_eval_acc" else key)
            out[f"{names[k]}/{name}"] = value
    for j, count in enumerate(res.distilled):
        out[f"{names[j]}/distilled_from"] = count
    return out
