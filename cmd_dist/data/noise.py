"""Synthetic label noise (paper Sec. 5.1) and the search/final split of appendix A.2.

Randomness comes from a private CPU ``torch.Generator`` seeded by the caller, so results depend
only on the seed: not on the device of the labels and not on global RNG state.
"""

from __future__ import annotations

import torch

#: Synthetic noise that :func:`corrupt_labels` draws.
NOISE_KINDS = ("symmetric", "pairflip")
#: Every ``noise.kind``: synthetic, ``none`` (labels as shipped, e.g. WebVision's real noise) and
#: ``human`` (CIFAR-N's human annotations, :mod:`cmd_dist.data.human_labels`).
LABEL_NOISE_KINDS = (*NOISE_KINDS, "none", "human")


def corrupt_labels(
    labels: torch.Tensor, num_classes: int, kind: str, rate: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 5.1: corrupt integer labels; returns ``(noisy_labels, is_noisy)`` on the input's device.

    ``symmetric``: with probability ``rate`` a label moves uniformly to one of the *other* C-1
    classes. ``pairflip``: with probability ``rate`` it moves to the adjacent class (y + 1) mod C.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(NOISE_KINDS)}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be a 1-D int64 tensor, got {labels.dim()}-D {labels.dtype}")
    cpu = labels.detach().cpu()
    if cpu.numel() and (int(cpu.min()) < 0 or int(cpu.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(cpu.min())}, {int(cpu.max())}]")
    gen = torch.Generator().manual_seed(int(seed))
    flip = torch.rand(cpu.shape[0], generator=gen) < rate
    if kind == "symmetric":
        shift = torch.randint(1, num_classes, (cpu.shape[0],), generator=gen)
    else:
        shift = torch.ones_like(cpu)
    noisy = torch.where(flip, (cpu + shift) % num_classes, cpu)
    return noisy.to(labels.device), flip.to(labels.device)


def split_train_val(num_samples: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Appendix A.2: a seeded split into ``(train_idx, val_idx)``, 90% / 10% by default.

    The validation part keeps its clean labels (the caller indexes clean labels with ``val_idx``).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, round(num_samples * val_fraction))
    if n_val >= num_samples:
        raise ValueError(f"cannot split {num_samples} samples with val_fraction {val_fraction}")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def noise_rate(noisy: torch.Tensor, clean: torch.Tensor) -> float:
    """The realised noise rate: the fraction of labels that differ from the clean ones.

    Clean labels of -1 (unknown, e.g. real-noise datasets without verification) are left out;
    NaN when no clean label is known.
    """
    if noisy.shape != clean.shape:
        raise ValueError(f"noisy and clean labels differ in shape: {tuple(noisy.shape)} vs {tuple(clean.shape)}")
    known = clean >= 0
    n = int(known.sum())
    return float(((noisy != clean) & known).sum()) / n if n else float("nan")
