"""The one place that crosses process boundaries: peers' per-batch knowledge exchange.

By default everything sent is detached (a plain all_gather has no gradient): a peer's predictions,
refined label and entropy are *targets* for the other peers. With ``grad=True`` the gather is
differentiable (``method.peer_target_grad``): in its backward every rank receives the sum, over all
ranks, of the gradients their losses sent to its tensors, so a peer's refined label q~_j = (1-eps) q
+ eps p_j sends gradient into peer j from every peer that distils it, exactly as autograd does when
all peers share one process. With one process (all peers in one worker, or no torch.distributed at
all) the exchange is an in-process list; otherwise ``all_gather`` over the default process group
(NCCL across GPUs, gloo on CPU or when peers share one GPU).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


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
    def forward(ctx, stacked: torch.Tensor) -> torch.Tensor:  # noqa: D102
        world = dist.get_world_size()
        out = [torch.empty_like(stacked) for _ in range(world)]
        dist.all_gather(out, stacked.contiguous())
        ctx.rank = dist.get_rank()
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum over ranks of d(loss_r)/d(gathered)
        return grad[ctx.rank]


class Exchange:
    """Gathers every peer's packed, detached knowledge tensor, in global peer order."""

    def __init__(self, num_peers: int) -> None:
        self.world_size = get_world_size()
        self.rank = get_rank()
        self.num_peers = num_peers
        self.local_peers = local_peer_indices(num_peers, self.world_size, self.rank)

    def all_gather(self, local: list[torch.Tensor], grad: bool = False) -> list[torch.Tensor]:
        """Local peers' ``[batch, k]`` tensors in, all peers' tensors out, in global peer order.

        ``grad=False``: detached copies. ``grad=True``: differentiable (see the module docstring);
        then every rank must run the backward of every step, as the CMD step does.
        """
        if self.world_size == 1:
            return list(local) if grad else [t.detach() for t in local]
        if grad:
            gathered = _GatherWithGrad.apply(torch.stack(local))
            return [t for chunk in gathered.unbind(0) for t in chunk.unbind(0)]
        stacked = torch.stack([t.detach() for t in local]).contiguous()
        out = [torch.empty_like(stacked) for _ in range(self.world_size)]
        dist.all_gather(out, stacked)
        return [t for chunk in out for t in chunk.unbind(0)]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's small Python object (per-epoch metrics), on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
