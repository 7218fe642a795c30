"""The training step: every local peer's forward, self-KD targets, exchange, objective, one backward.

Everything that depends on the config is resolved once, before the loop: a :class:`SelfKD` (Table 2:
trust and refined label of the chosen method) and an :class:`Objective` (CMD, Eq. 10-11, or a baseline).
The step is then a straight line and never branches on a name:

    forward every local peer -> trusts and refined labels -> exchange -> objective -> backward -> steps

It reads nothing back to the host. Per-step numbers, and each peer's per-sample record at the batch's ids
(:class:`~cmd_dist.method.dynamics.SampleDynamics`, issue 21), are added in place into device accumulators
(read once per epoch), the per-epoch scalars (chi, Mconf's r, t/Gamma, the step index) live in
device tensors filled before each step, so the very same step can be captured as one CUDA graph
(:class:`GraphedStep`) when a worker hosts every peer on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cmd_dist.data.types import Batch
from cmd_dist.method.objectives import (
    async_mkd_active_peer,
    cmd_peer_loss,
    kdcl_losses,
    sync_mkd_losses,
    tfkd_reg_loss,
)
from cmd_dist.method.selfkd import (
    DEFAULT_FIXED_EPSILON,
    REFINED_LABELS,
    ModelCertainty,
    entropy,
    mconf_trust,
    own_target_grad,
    proselflc_trust,
    refine,
    self_kd_loss,
)
from cmd_dist.train.exchange import Exchange

#: Columns of the per-peer accumulator (sums over the epoch's steps or samples).
ACC_COLUMNS = ("loss", "self_loss", "peer_loss", "correct_noisy", "correct_clean", "clean_known", "epsilon", "entropy")


class SelfKD:
    """A Table 2 method resolved from the config: its trust epsilon, its refined labels and, for Mconf, the
    model certainty r of Eq. (6) carried from one epoch to the next."""

    def __init__(self, method_cfg: Any) -> None:
        m = method_cfg
        self.name = m.self_kd
        if self.name not in REFINED_LABELS:
            raise ValueError(f"unknown self-KD method {self.name!r}; choose one of {', '.join(REFINED_LABELS)}")
        self.b1, self.rho = m.b1, m.rho
        self.fixed = m.epsilon if m.epsilon is not None else DEFAULT_FIXED_EPSILON.get(m.self_kd, 0.0)
        if self.name == "ce":
            self.fixed = 0.0
        #: The own target keeps p's gradient (Sec. "Gradients" in docs/method.md).
        self.own_grad = own_target_grad(self.name, m.target_grad)
        #: The label sent to the other peers keeps it (gradient into this peer from their losses).
        self.sent_grad = bool(m.peer_target_grad) and self.name not in ("ce", "ls")
        trusts = {"proselflc": self._proselflc_trust, "mconf": self._mconf_trust}
        self._trust = trusts.get(self.name, self._fixed_trust)
        self._label = REFINED_LABELS[self.name]
        #: Mconf's trust reads the model certainty r, estimated from each epoch's entropies (Eq. 6).
        self.uses_certainty = self.name == "mconf"

    def trust(self, p: torch.Tensor, h: torch.Tensor, progress: torch.Tensor, certainty: torch.Tensor) -> torch.Tensor:
        """Per-sample epsilon, [batch], without gradient: Eq. (5) ProSelfLC, Eq. (6) Mconf, else fixed."""
        return self._trust(p, h, progress, certainty)

    def _proselflc_trust(self, p, h, progress, certainty):
        return proselflc_trust(p, progress, self.b1, entropies=h)

    def _mconf_trust(self, p, h, progress, certainty):
        return mconf_trust(p, certainty, self.b1, self.rho, entropies=h)

    def _fixed_trust(self, p, h, progress, certainty):
        return torch.full_like(h, self.fixed)

    def targets(self, q: torch.Tensor, p: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(own refined label, refined label sent to the peers); the same tensor when their gradients agree."""
        own = refine(self._label, q, p, eps, grad=self.own_grad)
        sent = own if self.sent_grad == self.own_grad else refine(self._label, q, p, eps, grad=self.sent_grad)
        return own, sent

    def end_epoch(self, certainty: ModelCertainty, entropy_sum: float, count: int) -> float:
        """After an epoch: Mconf's r of Eq. (6) from the epoch's summed entropies over ``count`` samples (used
        by the next epoch's trusts); NaN for the methods without a model certainty."""
        if not self.uses_certainty:
            return math.nan
        certainty.add_epoch_sum(entropy_sum, count)
        return certainty.end_epoch()


@dataclass
class Knowledge:
    """Every peer's knowledge after the exchange, in global peer order (targets for the others)."""

    probs: list[torch.Tensor]  # detached predictions
    refined: list[torch.Tensor]  # refined labels (with their graph when method.peer_target_grad)
    entropies: list[torch.Tensor]  # H(p), detached


class Objective:
    """How a peer's loss is built from its own targets and the exchanged knowledge."""

    #: Whether the step needs the other peers' knowledge at all.
    exchanges = True
    #: Whether the peers' knowledge is selected by the entropy threshold chi (Eq. 8-9, 12): CMD only.
    uses_threshold = False
    #: Whether the peers take turns, one stepping per iteration (AsyncMKD): such a step is never graphed.
    alternates = False

    def active_peer(self, global_step: int, num_peers: int) -> int | None:
        """The only peer that steps at this (0-based) iteration, or None when every peer steps."""
        return None

    def loss(
        self,
        k: int,
        logits: torch.Tensor,
        p: torch.Tensor,
        q: torch.Tensor,
        own: torch.Tensor,
        kn: Knowledge | None,
        masks: list[torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class CMDObjective(Objective):
    """Eq. (10)-(11): own self-KD loss + confident peers' refined labels (masks of Eq. 8-9, chi of Eq. 12)."""

    uses_threshold = True

    def loss(self, k, logits, p, q, own, kn, masks):  # noqa: D102
        own_loss = self_kd_loss(own, p)
        if kn is None:  # zero knowledge: nothing is exchanged, the self-KD term stands alone
            mean = own_loss.mean()
            return {"loss": mean, "self_loss": mean, "peer_loss": mean.new_zeros(())}
        return cmd_peer_loss(k, own_loss, p, kn.refined, masks)


class SyncMKDObjective(Objective):
    """Eq. (3) (and Eq. (2)'s per-step loss): (1-eps) H(q~, p_k) + eps KL(p_j || p_k)."""

    def __init__(self, kd_weight: float) -> None:
        self.kd_weight = kd_weight

    def loss(self, k, logits, p, q, own, kn, masks):  # noqa: D102
        probs = [p if j == k else kn.probs[j] for j in range(len(kn.probs))]
        return {"loss": sync_mkd_losses(own, probs, self.kd_weight)[k]}


class AsyncMKDObjective(SyncMKDObjective):
    """Eq. (2): SyncMKD's loss, but only one peer steps per iteration, in turn."""

    alternates = True

    def active_peer(self, global_step: int, num_peers: int) -> int | None:  # noqa: D102
        return async_mkd_active_peer(global_step + 1, num_peers)  # Eq. (2) counts iterations t from 1


class KDCLObjective(SyncMKDObjective):
    """KDCL: every peer distils the ensemble teacher of all peers."""

    def loss(self, k, logits, p, q, own, kn, masks):  # noqa: D102
        probs = [p if j == k else kn.probs[j] for j in range(len(kn.probs))]
        return {"loss": kdcl_losses(own, probs, self.kd_weight)[k]}


class TfKDRegObjective(SyncMKDObjective):
    """Tf-KD_reg: a hand-designed virtual teacher replaces any peer."""

    exchanges = False

    def loss(self, k, logits, p, q, own, kn, masks):  # noqa: D102
        return {"loss": tfkd_reg_loss(q, logits.float(), self.kd_weight)}


#: ``method.objective`` -> the objective's class (CMD takes no weight; the baselines take ``method.kd_weight``).
OBJECTIVE_CLASSES = {
    "cmd": CMDObjective,
    "syncmkd": SyncMKDObjective,
    "asyncmkd": AsyncMKDObjective,
    "kdcl": KDCLObjective,
    "tfkd_reg": TfKDRegObjective,
}


def build_objective(method_cfg: Any) -> Objective:
    """The objective named by ``method.objective``, built once before the loop."""
    name = method_cfg.objective
    if name not in OBJECTIVE_CLASSES:
        raise ValueError(f"unknown objective {name!r}")
    return CMDObjective() if name == "cmd" else OBJECTIVE_CLASSES[name](method_cfg.kd_weight)


class StepState:
    """Device tensors the step reads (per-epoch scalars) and writes (accumulators), at fixed addresses."""

    def __init__(self, num_local: int, num_peers: int, num_train: int, device: torch.device) -> None:
        f32 = dict(device=device, dtype=torch.float32)
        self.chi = torch.zeros((), **f32)
        self.progress = torch.zeros((), **f32)
        self.certainty = torch.zeros(num_local, **f32)
        self.step = torch.zeros((), device=device, dtype=torch.long)
        self.acc = torch.zeros(num_local, len(ACC_COLUMNS), **f32)
        self.distilled = torch.zeros(num_peers, **f32)
        self.bad_step = torch.full((num_local,), -1, device=device, dtype=torch.long)
        #: H(p) of every training sample this epoch, per local peer (entropy quantiles, histogram).
        self.entropies = torch.zeros(num_local, num_train, **f32)

    def reset(self) -> None:
        self.acc.zero_()
        self.distilled.zero_()
        self.bad_step.fill_(-1)
        self.entropies.zero_()


class TrainStep:
    """The step for this worker's peers; ``__call__`` runs one batch eagerly."""

    def __init__(
        self,
        peers: Sequence[Any],
        num_peers: int,
        num_classes: int,
        exchange: Exchange,
        selfkd: SelfKD,
        objective: Objective,
        state: StepState,
        forward: Any,
    ) -> None:
        self.peers = list(peers)
        self.num_peers = num_peers
        self.num_classes = num_classes
        self.exchange = exchange
        self.selfkd = selfkd
        self.objective = objective
        self.state = state
        #: forward(list of inputs) -> list of logits, one per local peer (see cmd_dist.train.peers.LocalForward).
        self.forward = forward
        #: Set per epoch: False when chi = -inf (zero knowledge) or the objective needs no peer.
        self.exchanging = objective.exchanges and num_peers > 1
        #: AsyncMKD (Eq. 2): the global index of the only peer that steps, or None for all.
        self.active: int | None = None
        #: Data-parallel replicas of each peer (DDP averages their gradients; see ``__call__``).
        self.replicas = getattr(exchange, "replicas", 1)

    def __call__(
        self, xs: Sequence[torch.Tensor], y: torch.Tensor, clean: torch.Tensor, ids: torch.Tensor, share: float = 1.0
    ) -> None:
        """One batch. ``share``: this replica's fraction of the global batch (1.0 without replicas).

        With R replicas of each peer, DDP averages the replicas' gradients; scaling each replica's loss by
        ``share * R`` makes that average the gradient of the mean over the whole global batch even when
        the slices differ in size (Sum_j share_j * grad(mean_j) = grad(global mean)). The counters get
        ``share`` so their sum over the replicas is the global batch's mean loss.
        """
        st, c = self.state, self.num_classes
        q = F.one_hot(y, c).float()
        logits_all = self.forward(list(xs))
        live, packs = [], []
        for slot, logits in enumerate(logits_all):
            prob = torch.softmax(logits.float(), dim=1)
            h = entropy(prob.detach())
            eps = self.selfkd.trust(prob, h, st.progress, st.certainty[slot])
            own, sent = self.selfkd.targets(q, prob, eps)
            live.append((logits, prob, h, eps, own))
            packs.append(torch.cat([prob.detach(), sent, h[:, None]], dim=1))

        kn, masks = self._exchange(packs) if self.exchanging else (None, None)
        total = None
        rows = []
        for slot, p in enumerate(self.peers):
            logits, prob, h, eps, own = live[slot]
            parts = self.objective.loss(p.index, logits, prob, q, own, kn, masks)
            loss = parts["loss"]
            pred = logits.detach().argmax(1)
            zero = loss.new_zeros(())
            rows.append(
                torch.stack(
                    [
                        loss.detach() * share,
                        parts.get("self_loss", zero).detach() * share,
                        parts.get("peer_loss", zero).detach() * share,
                        (pred == y).sum().float(),
                        (pred == clean).sum().float(),
                        (clean >= 0).sum().float(),  # real-noise datasets may not know every clean label (-1)
                        eps.sum(),
                        h.sum(),
                    ]
                )
            )
            bad = ~torch.isfinite(loss.detach()) & (st.bad_step[slot] < 0)
            st.bad_step[slot].copy_(torch.where(bad, st.step, st.bad_step[slot]))
            st.entropies[slot].index_copy_(0, ids, h)
            if p.dynamics is not None:  # per-sample record (issue 21): in place at ids, graph-safe
                p.dynamics.record(ids, logits, prob, h, y, st.chi)
            if self.active is None or p.index == self.active:
                total = loss if total is None else total + loss
        st.acc.add_(torch.stack(rows))

        stepping = [p for p in self.peers if self.active is None or p.index == self.active]
        for p in stepping:
            p.optimizer.zero_grad(set_to_none=True)
        if total is not None:
            (total * (share * self.replicas) if self.replicas > 1 else total).backward()
        for p in stepping:
            p.optimizer.step()

    def _exchange(self, packs: list[torch.Tensor]) -> tuple[Knowledge, list[torch.Tensor]]:
        """The knowledge exchange: every peer's knowledge in global order, and its selection masks."""
        st, c = self.state, self.num_classes
        gathered = self.exchange.all_gather(packs, grad=self.selfkd.sent_grad)
        kn = Knowledge(
            probs=[g[:, :c].detach() for g in gathered],
            refined=[g[:, c : 2 * c] for g in gathered],
            entropies=[g[:, 2 * c].detach() for g in gathered],
        )
        masks = [(h < st.chi).float() for h in kn.entropies]  # Eq. (8)-(9): H(p_j) < chi
        st.distilled.add_(torch.stack([mk.sum() for mk in masks]))
        return kn, masks


class GraphedStep:
    """The whole :class:`TrainStep` (all local peers) captured once as a CUDA graph and replayed.

    The first ``warmup`` full batches run eagerly on a side stream (lazy state such as SGD's momentum
    buffers and cuDNN's algorithm choice must exist before capture), then the step is captured with
    its inputs in static buffers; every later full batch is copied into those buffers and replayed.
    A CUDA graph bakes in Python floats such as each optimizer's learning rate, so the graph is
    recaptured whenever the learning rates or the exchange on/off state change (twice in the paper's
    step schedule). A last, smaller batch runs eagerly. Outputs are never read from the graph: the
    step writes only in place into :class:`StepState` and each peer's per-sample record buffer (the batch ids
    are a static input: copied in before every replay), so nothing can be overwritten by a replay.
    """

    def __init__(self, step: TrainStep, batch_size: int, warmup: int = 3) -> None:
        self.step = step
        self.batch_size = batch_size
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.static: dict[str, Any] | None = None
        self.pool = None
        self.captures = 0
        self.replays = 0

    def _key(self) -> tuple:
        lrs = tuple(g["lr"] for p in self.step.peers for g in p.optimizer.param_groups)
        return (lrs, self.step.exchanging, self.step.active)

    def _eager_side_stream(self, batch: Batch) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(batch.xs, batch.y, batch.clean, batch.ids)
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, batch: Batch) -> None:
        self.static = {
            "xs": [x.clone() for x in batch.xs],
            "y": batch.y.clone(),
            "clean": batch.clean.clone(),
            "ids": batch.ids.clone(),
        }
        self.graph = None  # free the old graph (its pool is reused through self.pool)
        graph = torch.cuda.CUDAGraph()
        for p in self.step.peers:
            p.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, pool=self.pool):
            s = self.static
            self.step(s["xs"], s["y"], s["clean"], s["ids"])
        self.pool = graph.pool()
        self.graph = graph
        self.captures += 1

    def __call__(self, batch: Batch) -> None:
        if batch.y.shape[0] != self.batch_size:  # the epoch's last, smaller batch
            self.step(batch.xs, batch.y, batch.clean, batch.ids)
            return
        if self.warmup > 0:
            self.warmup -= 1
            self._eager_side_stream(batch)
            return
        key = self._key()
        if self.graph is None or key != self.key:
            self._capture(batch)  # records, does not run: the replay below does this step's work
            self.key = key
        else:
            s = self.static
            for dst, src in zip(s["xs"], batch.xs):
                dst.copy_(src)
            s["y"].copy_(batch.y)
            s["clean"].copy_(batch.clean)
            s["ids"].copy_(batch.ids)
        self.graph.replay()
        self.replays += 1


def nonfinite_first_step(bad_step: torch.Tensor) -> list[int]:
    """Host-side list of the first non-finite step per local peer (-1 = none)."""
    return [int(v) for v in bad_step.tolist()]


def entropy_quantiles(entropies: torch.Tensor, qs: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)) -> list[float]:
    """Quantiles of one peer's per-sample entropies (a 1-D tensor), as floats."""
    if entropies.numel() == 0:
        return [math.nan] * len(qs)
    return torch.quantile(entropies.float(), torch.tensor(list(qs), device=entropies.device)).tolist()
