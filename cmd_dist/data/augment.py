"""Whole-batch augmentation on the training device (no per-image Python) and the seeded sample order."""

from __future__ import annotations

import torch


def epoch_order(seed: int, epoch: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The sample order of an epoch: the same for every peer and every worker, a function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def augment_generator(seed: int, peer: int, epoch: int, device: torch.device | str) -> torch.Generator:
    """Peer k's augmentation randomness for an epoch (peers see the same samples, cropped differently)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 1009 + peer)


def normalize(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() / 255.0 - mean) / std


def augment_params(
    b: int, pad: int, flip: bool, generator: torch.Generator, device: torch.device | str
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The random draws of :func:`augment` for a batch of ``b`` (crop offsets y, x; flip), in its order."""
    oy = ox = f = None
    if pad:
        oy = torch.randint(0, 2 * pad + 1, (b,), device=device, generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (b,), device=device, generator=generator)
    if flip:
        f = torch.rand(b, device=device, generator=generator) < 0.5
    return oy, ox, f


def apply_augment(
    x: torch.Tensor, pad: int, oy: torch.Tensor | None, ox: torch.Tensor | None, f: torch.Tensor | None
) -> torch.Tensor:
    """Crop after zero padding at offsets (oy, ox) and flip where ``f``, with one gather for the batch."""
    b, _, h, w = x.shape
    dev = x.device
    if pad:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]  # [B,1,H,1]
        cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]  # [B,1,1,W]
        bidx = torch.arange(b, device=dev)[:, None, None, None]
        cidx = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        x = xp[bidx, cidx, rows, cols]
    if f is not None:
        x = torch.where(f[:, None, None, None], x.flip(3), x)
    return x


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop after zero padding (and horizontal flip), batched on x's device.

    No per-image Python: offsets are drawn for the whole batch and applied with one gather.
    """
    return apply_augment(x, pad, *augment_params(x.shape[0], pad, flip, generator, x.device))
