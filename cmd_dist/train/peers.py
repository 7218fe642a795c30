"""A worker's peers: each one's network, optimiser and schedule, how its step runs (fast path, compile,
whole-step graph, replicas), and its state in a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cmd_dist.config import Config
from cmd_dist.method.dynamics import SampleDynamics
from cmd_dist.method.selfkd import ModelCertainty
from cmd_dist.models import build_model, load_weights
from cmd_dist.train.exchange import Exchange
from cmd_dist.train.step import Objective


@dataclass
class Peer:
    """One peer on this worker: ``index`` is its place among all the run's peers (``cfg.peers``)."""

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
    #: Per-sample record over training (issue 21): made by the Trainer, or restored from the checkpoint.
    dynamics: SampleDynamics | None = None


def fast_path_enabled(cfg: Config, device: torch.device) -> bool:
    mode = cfg.train.fast_path
    return device.type == "cuda" if mode == "auto" else mode == "true"


def cuda_graph_enabled(cfg: Config, device: torch.device, world_size: int, objective: Objective) -> bool:
    """Whole-step CUDA graph: a CUDA worker hosting every peer, with a step that is the same every time.

    An objective whose peers take turns (AsyncMKD changes the stepping peer every iteration) runs eagerly.
    """
    mode = cfg.train.cuda_graph
    if mode == "false":
        return False
    possible = device.type == "cuda" and world_size == 1 and not objective.alternates
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
    mode = cfg.ray.sync_batchnorm
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
    """
    if exchange.replicas == 1:
        return
    sync = sync_batchnorm_enabled(cfg, device, exchange.replicas)
    for p in peers:
        p.model, p.net = exchange.replicate(p.model, device, sync)


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


def peer_state(p: Peer, next_epoch: int) -> dict[str, Any]:
    """What a checkpoint holds of a peer after ``next_epoch`` epochs (tensors shared with the live peer)."""
    return {
        "model": p.model.state_dict(),
        "optimizer": p.optimizer.state_dict(),
        "scheduler": p.scheduler.state_dict(),
        "certainty": p.certainty.state_dict(),
        "epoch": next_epoch,
        "best_eval_acc": p.best_eval_acc,
        "best_epoch": p.best_epoch,
        "torch_rng": torch.get_rng_state(),
        **({"dynamics": p.dynamics.state_dict()} if p.dynamics is not None else {}),
    }


def load_into_peer(p: Peer, state: dict[str, Any]) -> int:
    """Restore a peer (and the process's torch RNG) from :func:`peer_state`; returns the epochs done."""
    p.model.load_state_dict(state["model"])
    p.optimizer.load_state_dict(state["optimizer"])
    p.scheduler.load_state_dict(state["scheduler"])
    p.certainty.load_state_dict(state["certainty"])
    p.best_eval_acc = float(state["best_eval_acc"])
    p.best_epoch = int(state["best_epoch"])
    torch.set_rng_state(state["torch_rng"])
    if "dynamics" in state:  # a checkpoint written before the record existed has none: it starts empty
        p.dynamics = SampleDynamics.from_state(state["dynamics"], next(p.model.parameters()).device)
    return int(state["epoch"])


def attach_dynamics(peers: list[Peer], num_train: int, device: torch.device) -> None:
    """Give every peer its per-sample record (an empty one unless a checkpoint restored it)."""
    for p in peers:
        if p.dynamics is None:
            p.dynamics = SampleDynamics(num_train, device)
        elif p.dynamics.num_train != num_train:
            raise ValueError(
                f"peer {p.name!r}: the checkpoint's per-sample record holds {p.dynamics.num_train} training samples, "
                f"this run's training set {num_train}; the data changed since the checkpoint was written"
            )
