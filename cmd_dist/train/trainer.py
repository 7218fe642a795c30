"""One epoch of a worker's peers, and their evaluation.

Everything that depends on the config is resolved once, when the :class:`Trainer` is built: the self-KD
method and the objective (:mod:`cmd_dist.train.step`), chi's schedule (Eq. 12), the clock of ProSelfLC's
t/Gamma, whether the whole step is one CUDA graph. Each epoch then fills the step's per-epoch scalars, runs
the steps and reads the device counters back once. Nothing in a step reads a value back to the host (except
an optional progress read every ``train.log_every`` steps on CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cmd_dist.config import Config
from cmd_dist.data.types import WHOLE, Shard, TrainData
from cmd_dist.method.dynamics import epoch_weight
from cmd_dist.method.selection import chi_schedule
from cmd_dist.method.selfkd import uniform_entropy
from cmd_dist.train.exchange import Exchange
from cmd_dist.train.peers import (
    LocalForward,
    Peer,
    attach_dynamics,
    cuda_graph_enabled,
    resolved_compile_mode,
    wrap_replicas,
)
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
    #: Per local peer: Mconf's model certainty r (Eq. 6) after this epoch, used by the next; NaN for other methods.
    certainty: dict[int, float] = field(default_factory=dict)


def no_threshold(epoch: float) -> float:
    """chi of an objective that selects no knowledge by entropy (the baselines): NaN, every sample admitted."""
    return math.nan


def progress_clock(unit: str, epochs: int) -> Callable[[int, int, int], float]:
    """ProSelfLC's t/Gamma (Eq. 5) as ``clock(epoch, global_step, steps_per_epoch)``: counted in epochs, or in
    iterations (the authors' experiments)."""
    if unit == "epoch":
        return lambda epoch, global_step, steps: epoch / epochs
    return lambda epoch, global_step, steps: global_step / (epochs * steps)


class Trainer:
    """A worker's peers and their step, built once; ``train_one_epoch`` runs one epoch of it."""

    def __init__(self, cfg: Config, peers: list[Peer], exchange: Exchange, data: TrainData, device: torch.device):
        self.cfg, self.peers, self.exchange, self.data, self.device = cfg, peers, exchange, data, device
        m, t = cfg.method, cfg.train
        replicas = getattr(exchange, "replicas", 1)
        self.shard = Shard(exchange.replica, replicas) if replicas > 1 else WHOLE
        wrap_replicas(peers, exchange, cfg, device)
        self.selfkd, self.objective = SelfKD(m), build_objective(m)
        c = data.spec.num_classes
        #: chi of an epoch (Eq. 12 per knowledge mode), or NaN for an objective that selects nothing by entropy.
        self.chi = no_threshold
        if self.objective.uses_threshold:
            self.chi = chi_schedule(m.knowledge, t.epochs, c, m.eta, m.b2)
        self.progress = progress_clock(m.progress_unit, t.epochs)
        graphed = cuda_graph_enabled(cfg, device, exchange.world_size, self.objective)
        self.forward = LocalForward(peers, resolved_compile_mode(cfg, device, graphed, replicas))
        self.state = StepState(len(peers), len(cfg.peers), data.num_train, device)
        attach_dynamics(peers, data.num_train, device)  # before the step (and its graph) binds the buffers
        self.step = TrainStep(peers, len(cfg.peers), c, exchange, self.selfkd, self.objective, self.state, self.forward)
        self.graphed = GraphedStep(self.step, t.batch_size) if graphed else None
        self.extra_sets = extra_eval_sets(data)

    def train_one_epoch(self, epoch: int, progress: Callable[[int, str], Any] | None = None) -> EpochResult:
        """Train every local peer for one epoch; the epoch's rows (losses, accuracies, entropies) per peer."""
        st, n_peers = self.state, len(self.cfg.peers)
        chi = self.chi(epoch)
        st.reset()
        for p in self.peers:
            p.dynamics.begin_epoch()
        st.chi.fill_(chi if not math.isnan(chi) else math.inf)
        st.certainty.copy_(torch.tensor([p.certainty.r for p in self.peers], dtype=torch.float32))
        # Zero knowledge (chi = -inf, the same on every rank for the whole epoch) needs no exchange at all.
        self.step.exchanging = self.objective.exchanges and n_peers > 1 and chi != -math.inf
        for p in self.peers:
            (p.net if p.net is not None else p.model).train()
        start = time.perf_counter()
        steps = self._run_steps(epoch, progress)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self._sum_over_replicas()
        weight = epoch_weight(epoch, self.cfg.train.epochs)  # the late-weighted AUM's (method/dynamics.py)
        for p in self.peers:  # the per-sample record takes the whole epoch (every replica's slices)
            p.dynamics.end_epoch(weight)
        return self._epoch_result(chi, steps, seconds)

    def _run_steps(self, epoch: int, progress: Callable[[int, str], Any] | None) -> int:
        """The epoch's steps (progress bar on rank 0); returns the number of steps per epoch."""
        cfg, data, st, t = self.cfg, self.data, self.state, self.cfg.train
        steps = data.steps_per_epoch(t.batch_size)
        bar = progress(steps, f"epoch {epoch + 1}/{t.epochs}") if progress else None
        batches = data.epoch_batches(epoch, [p.index for p in self.peers], t.batch_size, cfg.seed, shard=self.shard)
        for step, batch in enumerate(batches):
            global_step = epoch * steps + step
            st.progress.fill_(self.progress(epoch, global_step, steps))
            st.step.fill_(step)
            self.step.active = self.objective.active_peer(global_step, len(cfg.peers))
            if self.graphed is not None:
                self.graphed(batch)
            else:
                self.step(batch.xs, batch.y, batch.clean, batch.ids, batch.share)
            if bar is not None:
                bar.update(1)
                if self.device.type != "cuda" and t.log_every and (step + 1) % t.log_every == 0:
                    if hasattr(bar, "set_postfix_str"):  # a host read: only on CPU, where it costs nothing
                        losses = (st.acc[:, 0] / (step + 1)).tolist()
                        bar.set_postfix_str(" ".join(f"{p.name} {v:.3f}" for p, v in zip(self.peers, losses)))
        if bar is not None:
            bar.close()
        return steps

    def _epoch_result(self, chi: float, steps: int, seconds: float) -> EpochResult:
        """The device counters, read once: one row per local peer, its entropy histogram, Mconf's new r."""
        st, c, n = self.state, self.data.spec.num_classes, self.data.num_train
        acc = st.acc.tolist()
        bad = nonfinite_first_step(st.bad_step)
        result = EpochResult(chi=chi, images=n, seconds=seconds, distilled=st.distilled.tolist())
        h_u = uniform_entropy(c)
        for slot, p in enumerate(self.peers):
            a = dict(zip(ACC_COLUMNS, acc[slot]))
            result.certainty[p.index] = self.selfkd.end_epoch(p.certainty, a["entropy"], n)
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
        replica's row, zeros elsewhere; the same for each peer's per-sample record of the epoch,
        :class:`~cmd_dist.method.dynamics.SampleDynamics`); the first non-finite step is the minimum over the replicas.
        """
        ex, st = self.exchange, self.state
        if getattr(ex, "replicas", 1) == 1:
            return
        ex.sum_over_replicas(st.acc)
        ex.sum_over_replicas(st.distilled)
        ex.sum_over_replicas(st.entropies)
        for p in self.peers:  # each sample is in one replica's buffer per epoch (zeros in the others)
            ex.sum_over_replicas(p.dynamics.epoch)
        never = torch.iinfo(torch.long).max
        first = torch.where(st.bad_step < 0, torch.full_like(st.bad_step, never), st.bad_step)
        ex.min_over_replicas(first)
        st.bad_step.copy_(torch.where(first == never, torch.full_like(first, -1), first))

    def evaluate_peers(self, epoch: int, res: EpochResult) -> None:
        """After training epoch ``epoch``: score every local peer on the eval split (and the extra sets),
        complete its row (timings, Mconf's r, lr, best so far) and step its learning-rate schedule."""
        batch_size = self.cfg.train.eval_batch_size
        for p in self.peers:
            row = res.rows[p.index]
            t_eval = time.perf_counter()
            row["eval_acc"] = evaluate(p, self.data, batch_size, self.exchange)
            for name in self.extra_sets:  # e.g. mini-WebVision: ImageNet val is the test set, WebVision val beside it
                row[f"{name}_acc"] = evaluate(p, self.data, batch_size, self.exchange, split=name)
            row["train_s"], row["eval_s"] = res.seconds, time.perf_counter() - t_eval
            row["certainty_r"] = res.certainty[p.index]
            row["lr"] = p.optimizer.param_groups[0]["lr"]
            row["images_per_s"] = res.images / max(res.seconds, 1e-9)  # this peer's training images / train time
            if row["eval_acc"] > p.best_eval_acc:
                p.best_eval_acc, p.best_epoch = row["eval_acc"], epoch + 1
            row["best_eval_acc"], row["best_epoch"] = p.best_eval_acc, p.best_epoch
            p.scheduler.step()


def train_one_epoch(
    cfg: Config,
    peers: list[Peer],
    exchange: Exchange,
    data: TrainData,
    epoch: int,
    device: torch.device,
    progress: Callable[[int, str], Any] | None = None,
) -> EpochResult:
    """One epoch with a freshly built :class:`Trainer` (tests; the worker keeps one Trainer for all epochs)."""
    return Trainer(cfg, peers, exchange, data, device).train_one_epoch(epoch, progress)


def extra_eval_sets(data: Any) -> list[str]:
    """Evaluation sets scored every epoch besides ``eval_split`` (streamed data may have some; never selects)."""
    return [s for s in data.eval_sets[1:] if s != data.eval_split]


@torch.no_grad()
def evaluate(
    peer: Peer, data: TrainData, batch_size: int, exchange: Exchange | None = None, split: str | None = None
) -> float:
    """Top-1 accuracy (%) on the eval split, in eval mode, batched; one host read at the end.

    On the fast path in eager bf16: a compiled eval graph per batch shape is not worth its compile time.
    With replicas each scores every R-th batch with replica 0's BatchNorm statistics (copied first)
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


def _evaluate_sharded(peer: Peer, data: TrainData, batch_size: int, exchange: Exchange, which: dict) -> float:
    # Per-replica BatchNorm statistics differ (no SyncBatchNorm): every replica scores with replica 0's.
    exchange.copy_from_first_replica(peer.model.buffers())
    device = next(peer.model.parameters()).device
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in data.eval_batches(batch_size, shard=Shard(exchange.replica, exchange.replicas), **which):
        counts[0] += (_eval_logits(peer, x).argmax(1) == y).sum()
        counts[1] += y.shape[0]
    exchange.sum_over_replicas(counts)
    correct, total = counts.tolist()
    return 100.0 * correct / total if total else 0.0
