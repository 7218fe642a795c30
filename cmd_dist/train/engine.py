"""The training loop every worker runs: peers, one epoch, evaluation, checkpoints.

Ray-free: the launcher passes a :class:`Reporter` (Ray Train's report/checkpoint in a worker, a
local folder otherwise), so the same code runs under Ray, in tests and in a plain process.
Each step: forward every local peer, exchange detached knowledge, build each peer's objective,
backward, step. Nothing in the step reads a value back to the host; counters live on the device
and are read once per epoch (plus an optional progress read every ``train.log_every`` steps).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cmd_dist.config import Config
from cmd_dist.data.augment import augment_generator, epoch_order  # noqa: F401
from cmd_dist.data.prepare import prepare_data
from cmd_dist.data.resident import PeerData
from cmd_dist.data.types import WHOLE, Shard
from cmd_dist.method.objectives import async_mkd_active_peer
from cmd_dist.method.selection import threshold_for_mode
from cmd_dist.method.selfkd import ModelCertainty, uniform_entropy
from cmd_dist.models import build_model, load_weights
from cmd_dist.runs.checkpoint import (
    atomic_write_bytes,
    checkpoint_epoch,
    checkpoint_folder,
    checkpoint_folders,
    folder_epoch,
    load_peer_state,
    save_peer_state,
    write_epoch_marker,
)
from cmd_dist.runs.storage import RunStore
from cmd_dist.train.exchange import Exchange
from cmd_dist.train.step import (
    ACC_COLUMNS,
    GraphedStep,
    SelfKD,
    StepState,
    TrainStep,
    build_objective,
    entropy_quantiles,
    nonfinite_first_step,
)

#: Entropy quantiles recorded per peer and epoch (``<peer>/entropy_q10`` ...), next to chi.
ENTROPY_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
HIST_BINS = 50


class Reporter(Protocol):
    """How a worker hands each epoch's metrics to whoever runs it (checkpoints live in the run folder)."""

    def report(self, metrics: dict[str, Any]) -> None: ...

    def progress(self, total: int, desc: str) -> Any: ...


@dataclass
class Peer:
    index: int
    name: str
    arch: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    certainty: ModelCertainty
    best_eval_acc: float = -1.0
    best_epoch: int = -1
    fast: bool = False
    #: What the training step calls: the model, or its DDP wrapper when the peer has replicas.
    net: nn.Module | None = None


def fast_path_enabled(cfg: Config, device: torch.device) -> bool:
    mode = str(cfg.train.fast_path).lower()
    return device.type == "cuda" if mode == "auto" else mode == "true"


def cuda_graph_enabled(cfg: Config, device: torch.device, world_size: int) -> bool:
    """Whole-step CUDA graph: a CUDA worker hosting every peer, with a step that is the same every time.

    AsyncMKD changes the stepping peer every iteration, so it runs eagerly.
    """
    mode = str(cfg.train.cuda_graph).lower()
    if mode == "false":
        return False
    possible = device.type == "cuda" and world_size == 1 and cfg.method.objective != "asyncmkd"
    if mode == "true" and not possible:
        raise ValueError(
            "train.cuda_graph=true needs a CUDA worker that hosts every peer (ray.placement=together or one "
            "worker) and an objective other than asyncmkd; use train.cuda_graph=auto"
        )
    return possible


def resolved_compile_mode(cfg: Config, device: torch.device, graphed: bool, replicas: int = 1) -> str:
    """``train.compile_mode: auto``: reduce-overhead on a CUDA worker without the whole-step graph, else eager.

    Replicas (DDP) run eagerly under ``auto``: torch.compile's DDP graph splitting with cudagraph trees
    has not been run on a GPU here; ``train.compile_mode=default`` opts in.
    """
    mode = cfg.train.compile_mode
    if mode != "auto":
        return mode
    return "reduce-overhead" if (device.type == "cuda" and not graphed and replicas == 1) else "none"


def sync_batchnorm_enabled(cfg: Config, device: torch.device, replicas: int) -> bool:
    """``ray.sync_batchnorm``: BatchNorm statistics over a peer's whole global batch (all its replicas)."""
    mode = str(cfg.ray.sync_batchnorm).lower()
    if replicas == 1 or mode == "false":
        return False
    if device.type != "cuda":
        if mode == "true":
            raise ValueError(
                "ray.sync_batchnorm: true, but this worker has no GPU (torch's SyncBatchNorm runs on CUDA only); "
                "use ray.sync_batchnorm=auto or a model without BatchNorm (cnn_small_gn)"
            )
        return False
    return True


def wrap_replicas(peers: list[Peer], exchange: Exchange, cfg: Config, device: torch.device) -> None:
    """Replicas of a peer (``ray.replicas_per_peer`` > 1): SyncBatchNorm where enabled, then DDP over the peer group.

    ``peer.model`` stays the plain network (checkpoints, evaluation); ``peer.net`` is what the step calls.
    DDP starts every replica from replica 0's weights and averages the gradients in its backward.
    """
    if exchange.replicas == 1:
        return
    from torch.nn.parallel import DistributedDataParallel

    sync = sync_batchnorm_enabled(cfg, device, exchange.replicas)
    for p in peers:
        if sync:  # the same parameter and buffer tensors: the optimizer and checkpoints are unaffected
            p.model = nn.SyncBatchNorm.convert_sync_batchnorm(p.model, process_group=exchange.peer_group)
        p.net = DistributedDataParallel(
            p.model,
            device_ids=[device.index] if device.type == "cuda" and device.index is not None else None,
            process_group=exchange.peer_group,
        )


def build_peer(
    cfg: Config, k: int, num_classes: int, channels: int, device: torch.device, image_size: int = 32
) -> Peer:
    """Peer k's network, SGD optimiser and step schedule; the init depends only on (seed, k)."""
    torch.manual_seed(cfg.seed * 1000 + k)
    model = build_model(cfg.peers[k].arch, num_classes, channels, image_size)
    if cfg.peers[k].weights:
        load_weights(model, cfg.peers[k].weights, f"peers[{k}].weights")
    model = model.to(device)
    t = cfg.train
    fast = fast_path_enabled(cfg, device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    # The lr is a plain float in the param group; a whole-step CUDA graph is recaptured when it changes.
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=t.milestones, gamma=t.gamma)
    return Peer(k, cfg.peers[k].name, cfg.peers[k].arch, model, opt, sched, ModelCertainty(num_classes), fast=fast)


class LocalForward(nn.Module):
    """All local peers' forward passes as one call: one compiled graph step for every local peer.

    On the fast path each peer runs in bf16 autocast on channels_last input (autocast's weight cache is
    off so the step can be captured). With a cudagraph-capturing ``torch.compile`` mode, one new graph
    step is marked per training step, before *all* peers' forwards: marking it per peer let peer B's
    replay overwrite peer A's logits (the crash measured on an H200, 2026-11-26).
    """

    def __init__(self, peers: list[Peer], compile_mode: str) -> None:
        super().__init__()
        self.nets = nn.ModuleList([p.net if p.net is not None else p.model for p in peers])
        self.fast = [p.fast for p in peers]
        self.mark_step = compile_mode in ("reduce-overhead", "max-autotune")
        self._call = self._forward if compile_mode == "none" else torch.compile(self._forward, mode=compile_mode)

    def _forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for net, fast, x in zip(self.nets, self.fast, xs):
            if fast:
                with torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=False):
                    out.append(net(x.contiguous(memory_format=torch.channels_last)))
            else:
                out.append(net(x))
        return out

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:  # noqa: D102
        if self.mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        return self._call(xs)


@dataclass
class EpochResult:
    """Per-epoch, host-side numbers for one worker's peers (read once at epoch end)."""

    rows: dict[int, dict[str, float]] = field(default_factory=dict)
    distilled: list[float] = field(default_factory=list)  # samples each peer's knowledge was distilled from
    chi: float = math.nan
    images: int = 0
    seconds: float = 0.0
    #: Per local peer: counts of H(p) over the epoch's samples in HIST_BINS bins on [0, H(u)].
    hists: dict[int, list[float]] = field(default_factory=dict)
    #: Unreadable images skipped so far by all workers together (set after the epoch's gather).
    skipped: int = 0


class Trainer:
    """A worker's peers and their step, built once; ``train_one_epoch`` runs one epoch of it."""

    def __init__(self, cfg: Config, peers: list[Peer], exchange: Exchange, data: PeerData, device: torch.device):
        self.cfg, self.peers, self.exchange, self.data, self.device = cfg, peers, exchange, data, device
        replicas = getattr(exchange, "replicas", 1)
        self.shard = Shard(exchange.replica, replicas) if replicas > 1 else WHOLE
        wrap_replicas(peers, exchange, cfg, device)
        graphed = cuda_graph_enabled(cfg, device, exchange.world_size)
        self.forward = LocalForward(peers, resolved_compile_mode(cfg, device, graphed, replicas))
        self.state = StepState(len(peers), len(cfg.peers), data.num_train, device)
        self.step = TrainStep(
            peers,
            len(cfg.peers),
            data.spec.num_classes,
            exchange,
            SelfKD(cfg.method),
            build_objective(cfg.method),
            self.state,
            self.forward,
        )
        self.graphed = GraphedStep(self.step, cfg.train.batch_size) if graphed else None

    def train_one_epoch(self, epoch: int, progress: Callable[[int, str], Any] | None = None) -> EpochResult:
        cfg, data, st, device = self.cfg, self.data, self.state, self.device
        m, t = cfg.method, cfg.train
        n_peers, c, n = len(cfg.peers), data.spec.num_classes, data.num_train
        steps = data.steps_per_epoch(t.batch_size)
        chi = threshold_for_mode(m.knowledge, epoch, t.epochs, c, m.eta, m.b2) if m.objective == "cmd" else math.nan
        st.reset()
        st.chi.fill_(chi if not math.isnan(chi) else math.inf)
        st.certainty.copy_(torch.tensor([p.certainty.r for p in self.peers], dtype=torch.float32))
        # Zero knowledge (chi = -inf, the same on every rank for the whole epoch) needs no exchange at all.
        self.step.exchanging = self.step.objective.exchanges and n_peers > 1 and chi != -math.inf
        for p in self.peers:
            (p.net if p.net is not None else p.model).train()
        bar = progress(steps, f"epoch {epoch + 1}/{t.epochs}") if progress else None
        start = time.perf_counter()
        batches = data.epoch_batches(epoch, [p.index for p in self.peers], t.batch_size, cfg.seed, shard=self.shard)
        for step, batch in enumerate(batches):
            global_step = epoch * steps + step
            # ProSelfLC's t/Gamma (Eq. 5): iterations (the authors' experiments) or epochs.
            st.progress.fill_(epoch / t.epochs if m.progress_unit == "epoch" else global_step / (t.epochs * steps))
            st.step.fill_(step)
            if m.objective == "asyncmkd":
                self.step.active = async_mkd_active_peer(global_step + 1, n_peers)
            if self.graphed is not None:
                self.graphed(batch)
            else:
                self.step(batch.xs, batch.y, batch.clean, batch.ids, batch.share)
            if bar is not None:
                bar.update(1)
                if device.type != "cuda" and t.log_every and (step + 1) % t.log_every == 0:
                    if hasattr(bar, "set_postfix_str"):  # a host read: only on CPU, where it costs nothing
                        losses = (st.acc[:, 0] / (step + 1)).tolist()
                        bar.set_postfix_str(" ".join(f"{p.name} {v:.3f}" for p, v in zip(self.peers, losses)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()

        self._sum_over_replicas()
        acc = st.acc.tolist()
        bad = nonfinite_first_step(st.bad_step)
        result = EpochResult(chi=chi, images=n, seconds=seconds, distilled=st.distilled.tolist())
        h_u = uniform_entropy(c)
        for slot, p in enumerate(self.peers):
            a = dict(zip(ACC_COLUMNS, acc[slot]))
            if m.self_kd == "mconf":  # r of Eq. (6) from this epoch's entropies, used next epoch
                p.certainty.add_epoch_sum(a["entropy"], n)
            ents = st.entropies[slot]
            row = {
                "train_loss": a["loss"] / steps,
                "train_self_loss": a["self_loss"] / steps,
                "train_peer_loss": a["peer_loss"] / steps,
                "train_acc_noisy": 100.0 * a["correct_noisy"] / n,
                # over the samples whose clean label is known; NaN when none is (e.g. WebVision)
                "train_acc_clean": 100.0 * a["correct_clean"] / a["clean_known"] if a["clean_known"] else math.nan,
                "epsilon_mean": a["epsilon"] / n,
                "entropy_mean": a["entropy"] / n,
                "nonfinite_step": bad[slot],
                "train_labels": n,  # what the distilled counts are out of (the report's exchange figure)
            }
            for q, v in zip(ENTROPY_QUANTILES, entropy_quantiles(ents, ENTROPY_QUANTILES)):
                row[f"entropy_q{round(q * 100)}"] = v
            result.rows[p.index] = row
            result.hists[p.index] = torch.histc(ents.clamp(0.0, h_u), bins=HIST_BINS, min=0.0, max=h_u).tolist()
        return result

    def _sum_over_replicas(self) -> None:
        """The epoch's counters over the whole global batch: each replica counted its slices only.

        Sums (losses weighted by each slice's share, hits, entropies: every sample's entropy lands in one
        replica's row, zeros elsewhere); the first non-finite step is the minimum over the replicas.
        """
        ex, st = self.exchange, self.state
        if getattr(ex, "replicas", 1) == 1:
            return
        ex.sum_over_replicas(st.acc)
        ex.sum_over_replicas(st.distilled)
        ex.sum_over_replicas(st.entropies)
        never = torch.iinfo(torch.long).max
        first = torch.where(st.bad_step < 0, torch.full_like(st.bad_step, never), st.bad_step)
        ex.min_over_replicas(first)
        st.bad_step.copy_(torch.where(first == never, torch.full_like(first, -1), first))


def train_one_epoch(
    cfg: Config,
    peers: list[Peer],
    exchange: Exchange,
    data: PeerData,
    epoch: int,
    device: torch.device,
    progress: Callable[[int, str], Any] | None = None,
) -> EpochResult:
    """One epoch with a freshly built :class:`Trainer` (tests; the worker keeps one Trainer for all epochs)."""
    return Trainer(cfg, peers, exchange, data, device).train_one_epoch(epoch, progress)


@torch.no_grad()
def evaluate(
    peer: Peer, data: PeerData, batch_size: int, exchange: Exchange | None = None, split: str | None = None
) -> float:
    """Top-1 accuracy (%) on the eval split, in eval mode, batched; one host read at the end.

    On the fast path in eager bf16: a compiled eval graph per batch shape is not worth its compile time.
    With replicas each scores every R-th batch with replica 0's BatchNorm statistics (broadcast first)
    and the hits are summed over the replicas. ``split``: another of a streamed dataset's ``eval_sets``
    (e.g. WebVision's own val set beside the ImageNet val test set).
    """
    peer.model.eval()
    replicas = getattr(exchange, "replicas", 1) if exchange is not None else 1
    which = {"split": split} if split else {}
    if replicas > 1:
        return _evaluate_sharded(peer, data, batch_size, exchange, which)
    correct, total = None, 0
    for x, y in data.eval_batches(batch_size, **which):
        hits = (_eval_logits(peer, x).argmax(1) == y).sum()
        correct = hits if correct is None else correct + hits
        total += int(y.shape[0])
    return 100.0 * float(correct) / total if total else 0.0


def _eval_logits(peer: Peer, x: torch.Tensor) -> torch.Tensor:
    if peer.fast:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return peer.model(x.contiguous(memory_format=torch.channels_last))
    return peer.model(x)


def _evaluate_sharded(peer: Peer, data: PeerData, batch_size: int, exchange: Exchange, which: dict) -> float:
    import torch.distributed as dist

    for buf in peer.model.buffers():  # per-replica BatchNorm statistics differ (no SyncBatchNorm): use replica 0's
        dist.broadcast(buf, src=exchange.worker, group=exchange.peer_group)
    device = next(peer.model.parameters()).device
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in data.eval_batches(batch_size, shard=Shard(exchange.replica, exchange.replicas), **which):
        counts[0] += (_eval_logits(peer, x).argmax(1) == y).sum()
        counts[1] += y.shape[0]
    exchange.sum_over_replicas(counts)
    correct, total = counts.tolist()
    return 100.0 * correct / total if total else 0.0


def peer_state(p: Peer, next_epoch: int) -> dict[str, Any]:
    return {
        "model": p.model.state_dict(),
        "optimizer": p.optimizer.state_dict(),
        "scheduler": p.scheduler.state_dict(),
        "certainty": p.certainty.state_dict(),
        "epoch": next_epoch,
        "best_eval_acc": p.best_eval_acc,
        "best_epoch": p.best_epoch,
        "torch_rng": torch.get_rng_state(),
    }


def load_into_peer(p: Peer, state: dict[str, Any]) -> int:
    p.model.load_state_dict(state["model"])
    p.optimizer.load_state_dict(state["optimizer"])
    p.scheduler.load_state_dict(state["scheduler"])
    p.certainty.load_state_dict(state["certainty"])
    p.best_eval_acc = float(state["best_eval_acc"])
    p.best_epoch = int(state["best_epoch"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"])


class NonFiniteLoss(RuntimeError):
    pass


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
    group, an interrupted run, the same run name again). After each epoch every worker writes its
    peers' files into ``run_dir/checkpoint_<epoch>``; after a barrier rank 0 writes the marker, prunes
    old checkpoints (never the newest complete one) and reports. ``fault_hook(rank, epoch)`` runs
    before each epoch (tests inject faults with it). ``run_dir`` may be a filesystem URI (or a
    :class:`~cmd_dist.runs.storage.RunStore`): the run is then written in a local staging folder and copied
    there (checkpoint files by each worker, the marker last by rank 0, the logs every epoch).
    """
    store = RunStore.open(run_dir)
    data = prepare_data(cfg.data, cfg.noise, device)
    if cfg.train.batch_size > data.num_train:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is larger than the {data.num_train} training images")
    replicas = cfg.ray.replicas_per_peer
    last_batch = data.num_train % cfg.train.batch_size
    if replicas > 1 and 0 < last_batch < replicas:
        raise ValueError(
            f"ray.replicas_per_peer: the epoch's last batch has {last_batch} of the {data.num_train} training images, "
            f"fewer than the {replicas} replicas that split it; choose another train.batch_size"
        )
    exchange = Exchange(len(cfg.peers), replicas)
    peers = [
        build_peer(cfg, k, data.spec.num_classes, data.spec.channels, device, data.spec.size)
        for k in exchange.local_peers
    ]
    run_dir = store.dir
    n_peers = len(cfg.peers)

    start_epoch = 0
    # Every rank must pick the same folder: rank 0 decides (and warns once), the others follow.
    choice = store.newest_complete_checkpoint(n_peers, warn=log) if exchange.rank == 0 else None
    name = exchange.gather_objects(choice.name if choice else None)[0]
    folder = store.fetch_checkpoint(name, exchange.local_peers) if name else None
    if folder is not None:
        for p in peers:
            start_epoch = load_into_peer(p, load_peer_state(folder, p.index))
    last: dict[str, Any] = {}
    if folder is not None and start_epoch >= cfg.train.epochs:
        # Restarted after the last epoch (e.g. the same run name again): nothing to train.
        last = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
        reporter.report(last)
        return last
    if exchange.rank == 0:
        if folder is not None:
            log(
                f"resuming from {store.shown(folder.name)} (epoch {start_epoch} done), training epoch "
                f"{start_epoch + 1} onwards"
            )
        # Folders past the resume point are from epochs about to be retrained (or broken): clear them
        # so an epoch's folder only ever holds that epoch's files.
        for stale in checkpoint_folders(run_dir):
            if stale != folder and (folder_epoch(stale) > start_epoch or checkpoint_epoch(stale) < 0):
                _remove_tree(stale)
        store.clear_stale(folder, start_epoch)
    exchange.gather_objects(None)  # nobody writes a checkpoint before the stale ones are gone
    _write_worker_info(run_dir, exchange, start_epoch, reporter)
    store.upload(f"workers/rank{exchange.rank}.json")
    best_dir = run_dir / "best_checkpoint"
    store.download("best_checkpoint/metrics.json")
    best_score = _stored_best_score(best_dir)
    best_pending: tuple[dict, dict, int] | None = None  # (CPU states, metrics, epoch) not yet on disk
    if monitor_factory and exchange.rank == 0:
        store.download("metrics.jsonl")  # the Monitor truncates it to the resumed epoch, then appends
    monitor = monitor_factory(cfg, run_dir, start_epoch) if (monitor_factory and exchange.rank == 0) else None
    verified: set[Path] = {folder} if folder is not None else set()
    trainer = Trainer(cfg, peers, exchange, data, device)  # after loading: a CUDA graph binds the live tensors
    extra_sets = extra_eval_sets(data)
    every = cfg.train.checkpoint_every

    for epoch in range(start_epoch, cfg.train.epochs):
        if fault_hook is not None:
            fault_hook(exchange.rank, epoch + 1)
        lr = peers[0].optimizer.param_groups[0]["lr"]
        res = trainer.train_one_epoch(epoch, reporter.progress if exchange.rank == 0 else None)
        for p in peers:
            row = res.rows[p.index]
            t_eval = time.perf_counter()
            row["eval_acc"] = evaluate(p, data, cfg.train.eval_batch_size, exchange)
            for name in extra_sets:  # e.g. mini-WebVision: ImageNet val is the test set, WebVision val beside it
                row[f"{name}_acc"] = evaluate(p, data, cfg.train.eval_batch_size, exchange, split=name)
            row["train_s"], row["eval_s"] = res.seconds, time.perf_counter() - t_eval
            row["certainty_r"] = p.certainty.end_epoch() if cfg.method.self_kd == "mconf" else math.nan
            row["lr"] = p.optimizer.param_groups[0]["lr"]
            row["images_per_s"] = res.images / max(res.seconds, 1e-9)  # this peer's training images / train time
            if row["eval_acc"] > p.best_eval_acc:
                p.best_eval_acc, p.best_epoch = row["eval_acc"], epoch + 1
            row["best_eval_acc"], row["best_epoch"] = p.best_eval_acc, p.best_epoch
            p.scheduler.step()
        # Unreadable images met by any worker (replicas each decode their own slices, so they meet different ones).
        gathered = exchange.gather_objects((res.rows, res.hists, sorted(data.skipped)))
        rows = {k: v for part, _, _ in gathered for k, v in part.items()}
        res.hists = {k: v for _, part, _ in gathered for k, v in part.items()}
        res.skipped = len({path for _, _, paths in gathered for path in paths})
        metrics = flatten_metrics(cfg, data, epoch, rows, res, lr)
        last = metrics
        bad = [(k, r["nonfinite_step"]) for k, r in sorted(rows.items()) if r["nonfinite_step"] >= 0]
        if bad:
            k, s = bad[0]
            msg = (
                f"non-finite loss in peer {cfg.peers[k].name!r} at epoch {epoch + 1}, step {s + 1}; "
                f"stopped, the last good checkpoint is kept"
            )
            metrics["nonfinite"] = msg
            if monitor:
                monitor.close()
                store.sync_logs()
            reporter.report(metrics)
            return metrics
        if monitor:
            monitor.log_epoch(epoch, rows, res, metrics)
            store.sync_logs()  # a URI gets every epoch's metrics and TensorBoard events at once
        score = metrics[f"{data.eval_split}_acc"]
        if score > best_score:  # kept in host memory, written with the next checkpoint
            best_score = score
            # Replica 0 of each peer writes its files; the other replicas hold the same weights.
            best_pending = (
                {p.index: _to_cpu(peer_state(p, epoch + 1)) for p in peers if exchange.primary},
                metrics,
                epoch + 1,
            )
        if (epoch + 1) % every and epoch + 1 != cfg.train.epochs:
            reporter.report(metrics)
            continue
        if best_pending is not None:
            _save_best(best_dir, exchange, *best_pending, store=store)
            best_pending = None
        states = {p.index: peer_state(p, epoch + 1) for p in peers if exchange.primary}
        _save_checkpoint(
            run_dir, exchange, states, metrics, epoch + 1, cfg.ray.keep_checkpoints, n_peers, verified, store
        )
        reporter.report(metrics)
    if monitor:
        monitor.close()
        store.sync_logs()
    return last


def _to_cpu(obj: Any) -> Any:
    """A copy of a (nested) state with every tensor on the host: the best epoch, held until it is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _save_checkpoint(
    run_dir: Path,
    exchange: Exchange,
    states: dict[int, dict],
    metrics: dict,
    epoch: int,
    keep: int,
    num_peers: int,
    verified: set[Path],
    store: RunStore | None = None,
) -> None:
    """Every worker writes its peers' files; after a barrier rank 0 writes the marker (last) and prunes.

    With a URI (``store``) each worker uploads its files before the barrier and rank 0 the marker after it,
    last, so the checkpoint on the URI is complete iff its marker is there.

    A write that fails (full disk, read-only folder) raises OSError after removing its temporary
    file; the folder then has no marker, so it is never resumed from, and the next prune removes it.
    """
    folder = checkpoint_folder(run_dir, epoch)
    folder.mkdir(parents=True, exist_ok=True)
    store = store or RunStore(run_dir)
    for k, state in states.items():
        save_peer_state(folder, k, state)
    store.upload_checkpoint_files(folder, states)
    exchange.gather_objects(None)
    if exchange.rank == 0:
        atomic_write_bytes(folder / "metrics.json", json.dumps(metrics).encode())
        write_epoch_marker(folder, epoch)
        store.upload_marker(folder)
        verified.add(folder)  # written and checksummed just now, by this run
        store.prune(keep, num_peers, verified)


def _stored_best_score(best_dir: Path) -> float:
    """The mean eval accuracy of ``best_checkpoint/`` (kept across resumes), or -inf."""
    try:
        stored = json.loads((best_dir / "metrics.json").read_text())
        return float(stored[f"{stored['eval_split']}_acc"])
    except (OSError, ValueError, KeyError):
        return -math.inf


def _save_best(
    best_dir: Path,
    exchange: Exchange,
    states: dict[int, dict],
    metrics: dict,
    epoch: int,
    store: RunStore | None = None,
) -> None:
    """Keep the epoch with the best mean accuracy on the eval split (validation in the search protocol).

    Each worker writes its peers' files atomically; after everyone is done (the gather is a barrier),
    rank 0 writes metrics.json and epoch.txt last, so a complete marker means a consistent set.
    """
    best_dir.mkdir(parents=True, exist_ok=True)
    store = store or RunStore(best_dir.parent)
    name = best_dir.name
    if exchange.rank == 0:
        (best_dir / "epoch.txt").unlink(missing_ok=True)
        store.delete_uploaded(f"{name}/epoch.txt")
    exchange.gather_objects(None)
    for k, state in states.items():
        save_peer_state(best_dir, k, state)
    store.upload(*(f"{name}/peer{k}{ext}" for k in states for ext in (".pt", ".sha256")))
    exchange.gather_objects(None)
    if exchange.rank == 0:
        atomic_write_bytes(best_dir / "metrics.json", json.dumps(metrics).encode())
        write_epoch_marker(best_dir, epoch)
        store.upload(f"{name}/metrics.json", f"{name}/epoch.txt")


def _write_worker_info(run_dir: Path, exchange: Exchange, start_epoch: int, reporter: Reporter | None = None) -> None:
    """``workers/rank<r>.json``: which process on which host hosts which peers, and the epochs done when it started.

    The reporter may add where it runs (the Ray launcher: the Ray node id and IP); operators and the
    cluster tests read it to see which peers ran on which node.
    """
    folder = Path(run_dir) / "workers"
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


def extra_eval_sets(data: Any) -> list[str]:
    """Evaluation sets scored every epoch besides ``eval_split`` (streamed data may have some; never selects)."""
    return [s for s in data.eval_sets[1:] if s != data.eval_split]


def flatten_metrics(
    cfg: Config, data: PeerData, epoch: int, rows: dict[int, dict], res: EpochResult, lr: float
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
