"""The one place that crosses process boundaries: peers' per-batch knowledge exchange.

By default everything sent is detached (a plain all_gather has no gradient): a peer's predictions,
refined label and entropy are *targets* for the other peers. With ``grad=True`` the gather is
differentiable (``method.peer_target_grad``): in its backward every rank receives the sum, over all
ranks, of the gradients their losses sent to its tensors, so a peer's refined label q~_j = (1-eps) q
+ eps p_j sends gradient into peer j from every peer that distils it, exactly as autograd does when
all peers share one process. With one process (all peers in one worker, or no torch.distributed at
all) the exchange is an in-process list; otherwise ``all_gather`` over the default process group
(NCCL across GPUs, gloo on CPU or when peers share one GPU). Every ``torch.distributed`` call of the
package is in this module.

With replicas (``ray.replicas_per_peer`` R > 1, issue 12) the world is R x W ranks, W the workers that
hold the peers once. Rank r is replica ``j = r // W`` of peer-worker ``w = r % W`` (replica-major, so
ranks 0..W-1 are the layout without replicas). Two kinds of process groups then exist: the
*exchange group* of replica j (ranks j*W .. j*W+W-1: every peer once, the same slice of each batch),
over which knowledge is gathered, and the *peer group* of worker w (ranks w, W+w, ..., the replicas of
the same peers), over which DDP averages gradients and the epoch's counters are summed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_peer_indices(num_peers: int, world_size: int, rank: int) -> list[int]:
    """Peers hosted by ``rank``: contiguous, equal shares (num_peers must divide evenly)."""
    if num_peers % world_size:
        raise ValueError(f"{num_peers} peers cannot be shared evenly by {world_size} workers")
    per = num_peers // world_size
    return list(range(rank * per, (rank + 1) * per))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces the gradients and returns this rank's share.

    torch.distributed.nn's differentiable all_gather does the same with reduce_scatter (NCCL) or
    all_to_all (others); all_reduce is used here because it runs on every backend and device
    (gloo on CUDA tensors included, the fractional-GPU placement), and the tensors are tiny.
    """

    @staticmethod
    def forward(ctx, stacked: torch.Tensor, group: Any) -> torch.Tensor:  # noqa: D102
        world = dist.get_world_size(group)
        out = [torch.empty_like(stacked) for _ in range(world)]
        dist.all_gather(out, stacked.contiguous(), group=group)
        ctx.rank = dist.get_rank(group)
        ctx.group = group
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # sum over ranks of d(loss_r)/d(gathered)
        return grad[ctx.rank], None


class Exchange:
    """Gathers every peer's packed knowledge tensor, in global peer order; knows this rank's place.

    ``world_size`` and ``rank`` are global (all replicas); ``group_size`` is the number of ranks that
    exchange knowledge with each other (the peer-workers W), ``replicas`` and ``replica`` say which
    data-parallel copy of its peers this rank is.
    """

    def __init__(self, num_peers: int, replicas: int = 1) -> None:
        self.world_size = get_world_size()
        self.rank = get_rank()
        self.num_peers = num_peers
        if replicas < 1 or self.world_size % replicas:
            raise ValueError(f"{self.world_size} workers cannot hold {replicas} replicas of every peer")
        self.replicas = replicas
        self.group_size = self.world_size // replicas  # W: workers that hold every peer once
        self.replica = self.rank // self.group_size
        self.worker = self.rank % self.group_size
        self.local_peers = local_peer_indices(num_peers, self.group_size, self.worker)
        #: Replica 0 of each peer writes its checkpoint files; the other replicas hold the same weights.
        self.primary = self.replica == 0
        self.exchange_group: Any = None  # None: the default group (no replicas) or in-process (W = 1)
        self.peer_group: Any = None  # DDP's group: this worker's replicas (None without replicas)
        if replicas > 1:
            w_count = self.group_size
            # Every rank creates every group, in the same order (torch.distributed.new_group's contract).
            for j in range(replicas):
                g = dist.new_group([j * w_count + w for w in range(w_count)])
                if j == self.replica:
                    self.exchange_group = g
            for w in range(w_count):
                g = dist.new_group([j * w_count + w for j in range(replicas)])
                if w == self.worker:
                    self.peer_group = g

    def all_gather(self, local: list[torch.Tensor], grad: bool = False) -> list[torch.Tensor]:
        """Local peers' ``[batch, k]`` tensors in, all peers' tensors out, in global peer order.

        ``grad=False``: detached copies. ``grad=True``: differentiable (see the module docstring);
        then every rank must run the backward of every step, as the CMD step does.
        """
        if self.group_size == 1:
            return list(local) if grad else [t.detach() for t in local]
        if grad:
            gathered = _GatherWithGrad.apply(torch.stack(local), self.exchange_group)
            return [t for chunk in gathered.unbind(0) for t in chunk.unbind(0)]
        stacked = torch.stack([t.detach() for t in local]).contiguous()
        out = [torch.empty_like(stacked) for _ in range(self.group_size)]
        dist.all_gather(out, stacked, group=self.exchange_group)
        return [t for chunk in out for t in chunk.unbind(0)]

    def sum_over_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """In place: ``t`` summed over this peer's replicas (the epoch's counters); a no-op without replicas."""
        if self.replicas > 1:
            dist.all_reduce(t, group=self.peer_group)
        return t

    def min_over_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the element-wise minimum over this peer's replicas; a no-op without replicas."""
        if self.replicas > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.peer_group)
        return t

    def replicate(self, model: nn.Module, device: torch.device, sync_batchnorm: bool) -> tuple[nn.Module, nn.Module]:
        """``(model, net)`` for one of this worker's peers with replicas: ``model`` with SyncBatchNorm over the
        peer group where ``sync_batchnorm`` (the same parameter and buffer tensors, so the optimizer and
        checkpoints are unaffected), and ``net``, its DDP wrapper over the peer group, which starts every
        replica from replica 0's weights and averages the gradients in its backward."""
        if sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=self.peer_group)
        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" and device.index is not None else None,
            process_group=self.peer_group,
        )
        return model, net

    def copy_from_first_replica(self, tensors: Iterable[torch.Tensor]) -> None:
        """In place: every tensor replaced by replica 0's copy of it (e.g. BatchNorm statistics before an
        evaluation); a no-op without replicas."""
        if self.replicas == 1:
            return
        for t in tensors:
            dist.broadcast(t, src=self.worker, group=self.peer_group)  # global rank of replica 0 of this worker

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's small Python object (per-epoch metrics), on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
