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
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cmd_dist.checkpoint import (
    atomic_write_bytes,
    candidate_checkpoints,
    first_valid_checkpoint,
    load_peer_state,
    save_peer_state,
    write_epoch_marker,
)
from cmd_dist.config import Config
from cmd_dist.data import PeerData, augment_generator, epoch_order, prepare_data  # noqa: F401 (re-exported)
from cmd_dist.exchange import Exchange
from cmd_dist.models import build_model
from cmd_dist.objectives import async_mkd_active_peer
from cmd_dist.selection import threshold_for_mode
from cmd_dist.selfkd import DEFAULT_FIXED_EPSILON, ModelCertainty, uniform_entropy
from cmd_dist.step import (
    ACC_COLUMNS,
    GraphedStep,
    SelfKD,
    StepState,
    TrainStep,
    build_objective,
    entropy_quantiles,
    nonfinite_first_step,
)
from cmd_dist.storage import RunStore

#: Entropy quantiles recorded per peer and epoch (``<peer>/entropy_q10`` ...), next to chi.
ENTROPY_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
HIST_BINS = 50


class Reporter(Protocol):
    """How a worker hands results and checkpoints to whoever runs it."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...

    def latest_checkpoint(self) -> Path | None: ...

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


def resolved_compile_mode(cfg: Config, device: torch.device, graphed: bool) -> str:
    mode = cfg.train.compile_mode
    if mode != "auto":
        return mode
    return "reduce-overhead" if (device.type == "cuda" and not graphed) else "none"


def build_peer(cfg: Config, k: int, num_classes: int, channels: int, device: torch.device) -> Peer:
    """Peer k's network, SGD optimiser and step schedule; the init depends only on (seed, k)."""
    torch.manual_seed(cfg.seed * 1000 + k)
    model = build_model(cfg.peers[k].arch, num_classes, channels).to(device)
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
        self.nets = nn.ModuleList([p.model for p in peers])
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


def fixed_epsilon(cfg: Config) -> float:
    m = cfg.method
    return m.epsilon if m.epsilon is not None else DEFAULT_FIXED_EPSILON.get(m.self_kd, 0.0)


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


class Trainer:
    """A worker's peers and their step, built once; ``train_one_epoch`` runs one epoch of it."""

    def __init__(self, cfg: Config, peers: list[Peer], exchange: Exchange, data: PeerData, device: torch.device):
        self.cfg, self.peers, self.exchange, self.data, self.device = cfg, peers, exchange, data, device
        graphed = cuda_graph_enabled(cfg, device, exchange.world_size)
        self.forward = LocalForward(peers, resolved_compile_mode(cfg, device, graphed))
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
            p.model.train()
        bar = progress(steps, f"epoch {epoch + 1}/{t.epochs}") if progress else None
        start = time.perf_counter()
        for step, batch in enumerate(data.epoch_batches(epoch, [p.index for p in self.peers], t.batch_size, cfg.seed)):
            global_step = epoch * steps + step
            # ProSelfLC's t/Gamma (Eq. 5): iterations (the authors' experiments) or epochs.
            st.progress.fill_(epoch / t.epochs if m.progress_unit == "epoch" else global_step / (t.epochs * steps))
            st.step.fill_(step)
            if m.objective == "asyncmkd":
                self.step.active = async_mkd_active_peer(global_step + 1, n_peers)
            if self.graphed is not None:
                self.graphed(batch)
            else:
                self.step(batch.xs, batch.y, batch.clean, batch.ids)
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
                "train_acc_clean": 100.0 * a["correct_clean"] / n,
                "epsilon_mean": a["epsilon"] / n,
                "entropy_mean": a["entropy"] / n,
                "nonfinite_step": bad[slot],
            }
            for q, v in zip(ENTROPY_QUANTILES, entropy_quantiles(ents, ENTROPY_QUANTILES)):
                row[f"entropy_q{round(q * 100)}"] = v
            result.rows[p.index] = row
            result.hists[p.index] = torch.histc(ents.clamp(0.0, h_u), bins=HIST_BINS, min=0.0, max=h_u).tolist()
        return result


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
def evaluate(peer: Peer, data: PeerData, batch_size: int) -> float:
    """Top-1 accuracy (%) on the eval split, in eval mode, batched; one host read at the end.

    On the fast path in eager bf16: a compiled eval graph per batch shape is not worth its compile time.
    """
    peer.model.eval()
    correct, total = None, 0
    for x, y in data.eval_batches(batch_size):
        if peer.fast:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                logits = peer.model(x.contiguous(memory_format=torch.channels_last))
        else:
            logits = peer.model(x)
        hits = (logits.argmax(1) == y).sum()
        correct = hits if correct is None else correct + hits
        total += int(y.shape[0])
    return 100.0 * float(correct) / total if total else 0.0


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
    run_dir: Path | str,
    reporter: Reporter,
    device: torch.device,
    monitor_factory: Callable[..., Any] | None = None,
    checkpoint_search_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train this worker's peers for all epochs; returns the last epoch's gathered metrics.

    ``run_dir`` is a local (or shared) folder or a filesystem URI (:mod:`cmd_dist.storage`); with a URI, rank 0's
    metrics log and TensorBoard files are staged locally and copied up after every epoch.
    """
    data = prepare_data(cfg.data, cfg.noise, device)
    if cfg.train.batch_size > data.num_train:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is larger than the {data.num_train} training images")
    exchange = Exchange(len(cfg.peers))
    peers = [build_peer(cfg, k, data.spec.num_classes, data.spec.channels, device) for k in exchange.local_peers]

    start_epoch = 0
    candidates = candidate_checkpoints(reporter.latest_checkpoint(), checkpoint_search_dir)
    folder = first_valid_checkpoint(candidates, len(cfg.peers), warn=log) if candidates else None
    if folder is not None:
        for p in peers:
            start_epoch = load_into_peer(p, load_peer_state(folder, p.index))
        if exchange.rank == 0:
            log(f"resuming from {folder} at epoch {start_epoch + 1}")
    last: dict[str, Any] = {}
    if folder is not None and start_epoch >= cfg.train.epochs:
        # Restarted after the last epoch (e.g. the same run name again): nothing to train.
        last = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
        reporter.report(last, None)
        return last
    store = RunStore(run_dir)
    _write_worker_info(store, exchange, reporter)
    best_score = _stored_best_score(store)
    best_pending: tuple[dict, dict, int] | None = None  # (CPU states, metrics, epoch) not yet on disk
    staging = None if store.is_local else tempfile.TemporaryDirectory(prefix="cmd-run-")
    log_dir = store.local if store.is_local else Path(staging.name)
    monitor = None
    if monitor_factory and exchange.rank == 0:
        if staging is not None:  # the log so far, so that a resumed run appends to it (not to an empty file)
            store.download("metrics.jsonl", log_dir / "metrics.jsonl")
        monitor = monitor_factory(cfg, log_dir, start_epoch)
    trainer = Trainer(cfg, peers, exchange, data, device)  # after loading: a CUDA graph binds the live tensors
    every = cfg.train.checkpoint_every

    for epoch in range(start_epoch, cfg.train.epochs):
        lr = peers[0].optimizer.param_groups[0]["lr"]
        res = trainer.train_one_epoch(epoch, reporter.progress if exchange.rank == 0 else None)
        for p in peers:
            row = res.rows[p.index]
            t_eval = time.perf_counter()
            row["eval_acc"] = evaluate(p, data, cfg.train.eval_batch_size)
            row["train_s"], row["eval_s"] = res.seconds, time.perf_counter() - t_eval
            row["certainty_r"] = p.certainty.end_epoch() if cfg.method.self_kd == "mconf" else math.nan
            row["lr"] = p.optimizer.param_groups[0]["lr"]
            row["images_per_s"] = res.images / max(res.seconds, 1e-9)  # this peer's training images / train time
            if row["eval_acc"] > p.best_eval_acc:
                p.best_eval_acc, p.best_epoch = row["eval_acc"], epoch + 1
            row["best_eval_acc"], row["best_epoch"] = p.best_eval_acc, p.best_epoch
            p.scheduler.step()
        gathered = exchange.gather_objects((res.rows, res.hists))
        rows = {k: v for part, _ in gathered for k, v in part.items()}
        res.hists = {k: v for _, part in gathered for k, v in part.items()}
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
                if staging is not None:
                    store.upload(log_dir)
            reporter.report(metrics, None)
            return metrics
        if monitor:
            monitor.log_epoch(epoch, rows, res, metrics)
            if staging is not None:
                store.upload(log_dir)
        score = metrics[f"{data.eval_split}_acc"]
        if score > best_score:  # kept in host memory, written with the next checkpoint
            best_score = score
            best_pending = ({p.index: _to_cpu(peer_state(p, epoch + 1)) for p in peers}, metrics, epoch + 1)
        if (epoch + 1) % every and epoch + 1 != cfg.train.epochs:
            reporter.report(metrics, None)
            continue
        if best_pending is not None:
            _save_best(store, exchange, *best_pending)
            best_pending = None
        states = {p.index: peer_state(p, epoch + 1) for p in peers}
        with tempfile.TemporaryDirectory(prefix="cmd-ckpt-") as tmp:
            for k, state in states.items():
                save_peer_state(Path(tmp), k, state)
            if exchange.rank == 0:
                atomic_write_bytes(Path(tmp) / "metrics.json", json.dumps(metrics).encode())
                write_epoch_marker(Path(tmp), epoch + 1)
            reporter.report(metrics, Path(tmp))
    if monitor:
        monitor.close()
        if staging is not None:
            store.upload(log_dir)
    if staging is not None:
        staging.cleanup()
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


BEST = "best_checkpoint"


def _stored_best_score(store: RunStore) -> float:
    """The mean eval accuracy of ``best_checkpoint/`` (kept across resumes), or -inf."""
    try:
        stored = json.loads(store.read_bytes(f"{BEST}/metrics.json") or b"")
        return float(stored[f"{stored['eval_split']}_acc"])
    except (OSError, ValueError, KeyError):
        return -math.inf


def _save_best(store: RunStore, exchange: Exchange, states: dict[int, dict], metrics: dict, epoch: int) -> None:
    """Keep the epoch with the best mean accuracy on the eval split (validation in the search protocol).

    Each worker writes its peers' files atomically; after everyone is done (the gather is a barrier),
    rank 0 writes metrics.json and epoch.txt last, so a complete marker means a consistent set.
    """
    store.mkdir(BEST)
    if exchange.rank == 0:
        store.delete(f"{BEST}/epoch.txt")
    exchange.gather_objects(None)
    for k, state in states.items():
        if store.is_local:
            save_peer_state(store.local / BEST, k, state)
        else:  # written locally (with its checksum), then copied up file by file
            with tempfile.TemporaryDirectory(prefix="cmd-best-") as tmp:
                save_peer_state(Path(tmp), k, state)
                store.upload(Path(tmp), BEST)
    exchange.gather_objects(None)
    if exchange.rank == 0:
        store.write_bytes(f"{BEST}/metrics.json", json.dumps(metrics).encode())
        store.write_bytes(f"{BEST}/epoch.txt", str(epoch).encode())


def _write_worker_info(store: RunStore, exchange: Exchange, reporter: Reporter | None = None) -> None:
    """``workers/rank<r>.json``: which process on which host (and Ray node) hosts which peers, and since when.

    The reporter may add where it runs (the Ray launcher: the Ray node id and IP); operators and the
    cluster tests read it to see which peers ran on which node.
    """
    info = {
        "rank": exchange.rank,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "peers": exchange.local_peers,
        "started_at": time.time(),
    }
    where = getattr(reporter, "worker_info", None)
    if where is not None:
        info.update(where())
    store.write_bytes(f"workers/rank{exchange.rank}.json", json.dumps(info).encode())


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
    }
    names = [p.name for p in cfg.peers]
    for k, r in sorted(rows.items()):
        for key, value in r.items():
            name = f"{split}_acc" if key == "eval_acc" else (f"best_{split}_acc" if key == "best_eval_acc" else key)
            out[f"{names[k]}/{name}"] = value
    for j, count in enumerate(res.distilled):
        out[f"{names[j]}/distilled_from"] = count
    return out
