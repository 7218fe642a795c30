"""Confident knowledge selection (paper Sec. 4.2): the entropy threshold chi of Eq. (12)."""

from __future__ import annotations

import math

import torch

from cmd_dist.method.selfkd import entropy, logistic, uniform_entropy

#: Knowledge modes (Sec. 4.2): zero knowledge, all knowledge, static (CMD-S), progressive (CMD-P).
KNOWLEDGE_MODES = ("zero", "all", "cmd-s", "cmd-p")


def knowledge_threshold(epoch: float, total_epochs: float, num_classes: int, eta: float, b2: float) -> float:
    """Eq. (12): entropy threshold chi = H(u)/eta * 2 h(t/Gamma - 0.5, b2) for knowledge selection.

    Special cases of Sec. 4.2: eta in (0, 1] with b2 = 0 gives chi >= H(u) (all knowledge, SyncMKD's
    selection); eta < 0 or eta = +inf gives zero knowledge, returned as chi = -inf so that not even a
    one-hot prediction passes (its reference entropy is about -1e-6, below the formula's chi = 0).
    eta = 0 is undefined.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if eta == 0 or math.isnan(eta):
        raise ValueError(
            f"eta must be non-zero (chi = H(u)/eta), got {eta}; use eta=inf or mode 'zero' for no knowledge"
        )
    if total_epochs <= 0:
        raise ValueError(f"total_epochs must be > 0, got {total_epochs}")
    if eta < 0 or math.isinf(eta):
        return -math.inf
    return uniform_entropy(num_classes) / eta * 2.0 * logistic(epoch / total_epochs - 0.5, b2)


def threshold_for_mode(mode: str, epoch: float, total_epochs: float, num_classes: int, eta: float, b2: float) -> float:
    """chi for a knowledge mode by name: 'zero' (-inf), 'all' (+inf), 'cmd-s' (b2 = 0), 'cmd-p' (b2 != 0)."""
    if mode not in KNOWLEDGE_MODES:
        raise ValueError(f"unknown knowledge mode {mode!r}; choose one of {', '.join(KNOWLEDGE_MODES)}")
    if mode == "zero":
        return -math.inf
    if mode == "all":
        return math.inf
    if mode == "cmd-s":
        if b2 != 0:
            raise ValueError(f"b2 must be 0 for knowledge mode 'cmd-s' (static chi), got {b2}; use 'cmd-p'")
        return knowledge_threshold(epoch, total_epochs, num_classes, eta, 0.0)
    if b2 == 0:
        raise ValueError("b2 must be non-zero for knowledge mode 'cmd-p' (progressive chi); use 'cmd-s' for b2 = 0")
    return knowledge_threshold(epoch, total_epochs, num_classes, eta, b2)


def confident_mask(p: torch.Tensor, chi: float | torch.Tensor) -> torch.Tensor:
    """Eq. (8)-(9) selection: a float mask, 1 where H(p) < chi (the peer's knowledge is confident)."""
    return (entropy(p.detach()) < chi).to(p.dtype)
