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
import torch.nn.functional as F
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
from cmd_dist.data import PeerData, augment, normalize, prepare_data
from cmd_dist.exchange import Exchange
from cmd_dist.models import build_model
from cmd_dist.objectives import (
    async_mkd_active_peer,
    cmd_peer_loss,
    kdcl_losses,
    sync_mkd_losses,
    tfkd_reg_loss,
)
from cmd_dist.selection import threshold_for_mode
from cmd_dist.selfkd import (
    DEFAULT_FIXED_EPSILON,
    ModelCertainty,
    entropy,
    mconf_trust,
    proselflc_trust,
    refined_label,
    self_kd_loss,
)
from cmd_dist.storage import RunStore


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
    #: What the step calls: the network itself, or its torch.compile'd wrapper on the fast path.
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    fast: bool = False


def fast_path_enabled(cfg: Config, device: torch.device) -> bool:
    mode = str(cfg.train.fast_path).lower()
    return device.type == "cuda" if mode == "auto" else mode == "true"


def build_peer(cfg: Config, k: int, num_classes: int, channels: int, device: torch.device) -> Peer:
    """Peer k's network, SGD optimiser and step schedule; the init depends only on (seed, k)."""
    torch.manual_seed(cfg.seed * 1000 + k)
    model = build_model(cfg.peers[k].arch, num_classes, channels).to(device)
    t = cfg.train
    fast = fast_path_enabled(cfg, device)
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if fast:
        model = model.to(memory_format=torch.channels_last)
        forward = model if t.compile_mode == "none" else torch.compile(model, mode=t.compile_mode)
    # The lr is a plain float in the param group: schedule changes never touch a captured graph.
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=t.milestones, gamma=t.gamma)
    return Peer(
        k,
        cfg.peers[k].name,
        cfg.peers[k].arch,
        model,
        opt,
        sched,
        ModelCertainty(num_classes),
        forward=forward,
        fast=fast,
    )


def peer_logits(p: Peer, x: torch.Tensor) -> torch.Tensor:
    """The peer's forward pass; on the fast path in bf16 autocast with channels_last input."""
    if not p.fast:
        return p.model(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return p.forward(x.contiguous(memory_format=torch.channels_last))


def epoch_order(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """The sample order of an epoch: the same for every peer and every worker, a function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def augment_generator(seed: int, peer: int, epoch: int, device: torch.device) -> torch.Generator:
    """Peer k's augmentation randomness for an epoch (peers see the same samples, cropped differently)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 1009 + peer)


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


def train_one_epoch(
    cfg: Config,
    peers: list[Peer],
    exchange: Exchange,
    data: PeerData,
    epoch: int,
    device: torch.device,
    progress: Callable[[int, str], Any] | None = None,
) -> EpochResult:
    m, t = cfg.method, cfg.train
    n_peers = len(cfg.peers)
    c = data.spec.num_classes
    n = data.num_train
    steps = math.ceil(n / t.batch_size)
    order = epoch_order(cfg.seed, epoch, n, device)
    chi = threshold_for_mode(m.knowledge, epoch, t.epochs, c, m.eta, m.b2) if m.objective == "cmd" else math.nan
    eps_fixed = fixed_epsilon(cfg)
    gens = {p.index: augment_generator(cfg.seed, p.index, epoch, device) for p in peers}
    for p in peers:
        p.model.train()

    zeros = lambda: torch.zeros((), device=device)  # noqa: E731
    acc = {
        p.index: {k: zeros() for k in ("loss", "self_loss", "peer_loss", "correct_noisy", "correct_clean", "epsilon")}
        for p in peers
    }
    bad_step = {p.index: torch.full((), -1, dtype=torch.long, device=device) for p in peers}
    distilled = torch.zeros(n_peers, device=device)
    bar = progress(steps, f"epoch {epoch + 1}/{t.epochs}") if progress else None
    start = time.perf_counter()
    for step in range(steps):
        idx = order[step * t.batch_size : (step + 1) * t.batch_size]
        xb, yb, cb = data.train_x[idx], data.train_labels[idx], data.train_clean[idx]
        q = F.one_hot(yb, c).float()
        progress_t = epoch / t.epochs if m.progress_unit == "epoch" else (epoch * steps + step) / (t.epochs * steps)
        live, packs = {}, []
        for p in peers:
            x = augment(xb, data.spec.pad, data.spec.flip, gens[p.index]) if cfg.data.augment else xb
            if p.fast and device.type == "cuda" and cfg.train.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            logits = peer_logits(p, normalize(x, data.mean, data.std))
            prob = torch.softmax(logits.float(), dim=1)
            h = entropy(prob.detach())
            if m.self_kd == "proselflc":
                eps = proselflc_trust(prob, progress_t, m.b1, entropies=h)
            elif m.self_kd == "mconf":
                eps = mconf_trust(prob, p.certainty.r, m.b1, m.rho, entropies=h)
                p.certainty.accumulate(h)
            else:
                eps = torch.full_like(h, eps_fixed if m.self_kd != "ce" else 0.0)
            refined = refined_label(
                m.self_kd, q, prob, eps if m.self_kd in ("proselflc", "mconf") else float(eps_fixed)
            )
            live[p.index] = (logits, prob, eps, refined)
            packs.append(torch.cat([prob.detach(), refined, h[:, None]], dim=1))
        # Zero knowledge (chi = -inf, the same on every rank for the whole epoch) needs no exchange at all.
        exchanging = n_peers > 1 and not (m.objective == "cmd" and chi == -math.inf)
        masks = None
        if exchanging:
            gathered = exchange.all_gather(packs)  # the knowledge exchange, every peer in global order
            all_p = [g[:, :c] for g in gathered]
            all_q = [g[:, c : 2 * c] for g in gathered]
            if m.objective == "cmd":
                masks = [(g[:, 2 * c] < chi).float() for g in gathered]
                distilled += torch.stack([mk.sum() for mk in masks])

        active = async_mkd_active_peer(epoch * steps + step + 1, n_peers) if m.objective == "asyncmkd" else None
        total = None
        stepping = []
        for p in peers:
            logits, prob, eps, refined = live[p.index]
            probs = [prob if j == p.index else all_p[j] for j in range(n_peers)] if exchanging else [prob]
            if m.objective == "cmd":  # Eq. (10)-(11); zero knowledge leaves the self-KD term alone
                own = self_kd_loss(m.self_kd, refined, prob, eps if m.self_kd in ("proselflc", "mconf") else eps_fixed)
                parts = (
                    cmd_peer_loss(p.index, own, prob, all_q, masks)
                    if masks is not None
                    else {"loss": own.mean(), "self_loss": own.mean(), "peer_loss": own.new_zeros(())}
                )
            elif m.objective in ("syncmkd", "asyncmkd"):
                parts = {"loss": sync_mkd_losses(refined, probs, m.kd_weight)[p.index]}
            elif m.objective == "kdcl":
                parts = {"loss": kdcl_losses(refined, probs, m.kd_weight)[p.index]}
            else:  # tfkd_reg: the virtual teacher replaces any peer
                parts = {"loss": tfkd_reg_loss(q, logits.float(), m.kd_weight)}
            loss = parts["loss"]
            a = acc[p.index]
            a["loss"] += loss.detach()
            for key in ("self_loss", "peer_loss"):
                if key in parts:
                    a[key] += parts[key].detach()
            pred = logits.detach().argmax(1)
            a["correct_noisy"] += (pred == yb).sum()
            a["correct_clean"] += (pred == cb).sum()
            a["epsilon"] += eps.mean()
            bad_step[p.index] = torch.where(
                (bad_step[p.index] < 0) & ~torch.isfinite(loss.detach()),
                torch.full_like(bad_step[p.index], step),
                bad_step[p.index],
            )
            if active is not None and p.index != active:
                continue
            stepping.append(p)
            total = loss if total is None else total + loss
        for p in stepping:
            p.optimizer.zero_grad(set_to_none=True)
        if total is not None:
            total.backward()
        for p in stepping:
            p.optimizer.step()
        if bar is not None:
            bar.update(1)
            if t.log_every and (step + 1) % t.log_every == 0 and hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(" ".join(f"{p.name} {float(acc[p.index]['loss']) / (step + 1):.3f}" for p in peers))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()

    result = EpochResult(chi=chi, images=n, seconds=seconds, distilled=distilled.tolist())
    for p in peers:
        a = {k: float(v) for k, v in acc[p.index].items()}
        result.rows[p.index] = {
            "train_loss": a["loss"] / steps,
            "train_self_loss": a["self_loss"] / steps,
            "train_peer_loss": a["peer_loss"] / steps,
            "train_acc_noisy": 100.0 * a["correct_noisy"] / n,
            "train_acc_clean": 100.0 * a["correct_clean"] / n,
            "epsilon_mean": a["epsilon"] / steps,
            "nonfinite_step": int(bad_step[p.index]),
        }
    return result


@torch.no_grad()
def evaluate(peer: Peer, x: torch.Tensor, y: torch.Tensor, data: PeerData, batch_size: int) -> float:
    """Top-1 accuracy (%) on a uint8 image tensor, in eval mode, batched; one host read at the end."""
    peer.model.eval()
    correct = torch.zeros((), device=x.device)
    for i in range(0, x.shape[0], batch_size):
        xb = normalize(x[i : i + batch_size], data.mean, data.std)
        if peer.fast:  # eager bf16: a compiled eval graph per batch shape is not worth its compile time
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                logits = peer.model(xb.contiguous(memory_format=torch.channels_last))
        else:
            logits = peer.model(xb)
        correct += (logits.argmax(1) == y[i : i + batch_size]).sum()
    return 100.0 * float(correct) / max(1, x.shape[0])


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
    staging = None if store.is_local else tempfile.TemporaryDirectory(prefix="cmd-run-")
    log_dir = store.local if store.is_local else Path(staging.name)
    monitor = None
    if monitor_factory and exchange.rank == 0:
        if staging is not None:  # the log so far, so that a resumed run appends to it (not to an empty file)
            store.download("metrics.jsonl", log_dir / "metrics.jsonl")
        monitor = monitor_factory(cfg, log_dir, start_epoch)

    for epoch in range(start_epoch, cfg.train.epochs):
        lr = peers[0].optimizer.param_groups[0]["lr"]
        res = train_one_epoch(
            cfg, peers, exchange, data, epoch, device, reporter.progress if exchange.rank == 0 else None
        )
        for p in peers:
            row = res.rows[p.index]
            row["eval_acc"] = evaluate(p, data.eval_x, data.eval_y, data, cfg.train.eval_batch_size)
            row["certainty_r"] = p.certainty.end_epoch() if cfg.method.self_kd == "mconf" else math.nan
            row["lr"] = p.optimizer.param_groups[0]["lr"]
            if row["eval_acc"] > p.best_eval_acc:
                p.best_eval_acc, p.best_epoch = row["eval_acc"], epoch + 1
            row["best_eval_acc"], row["best_epoch"] = p.best_eval_acc, p.best_epoch
            p.scheduler.step()
        gathered = exchange.gather_objects(res.rows)
        rows = {k: v for part in gathered for k, v in part.items()}
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
        states = {p.index: peer_state(p, epoch + 1) for p in peers}
        score = metrics[f"{data.eval_split}_acc"]
        if score > best_score:
            best_score = score
            _save_best(store, exchange, states, metrics, epoch + 1)
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
