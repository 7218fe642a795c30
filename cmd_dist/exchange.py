"""The one place that crosses process boundaries: peers' per-batch knowledge exchange.

Everything sent is detached (all_gather has no gradient): a peer's predictions, refined label and
entropy are *targets* for the other peers. With one process (all peers in one worker, or no
torch.distributed at all) the exchange is an in-process list; otherwise ``all_gather`` over the
default process group (NCCL across GPUs, gloo on CPU or when peers share one GPU).
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


class Exchange:
    """Gathers every peer's packed, detached knowledge tensor, in global peer order."""

    def __init__(self, num_peers: int) -> None:
        self.world_size = get_world_size()
        self.rank = get_rank()
        self.num_peers = num_peers
        self.local_peers = local_peer_indices(num_peers, self.world_size, self.rank)

    def all_gather(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        """Local peers' ``[batch, k]`` tensors in, all peers' tensors out (detached copies)."""
        if self.world_size == 1:
            return [t.detach() for t in local]
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
