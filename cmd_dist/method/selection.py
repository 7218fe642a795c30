"""Confident knowledge selection (paper Sec. 4.2): the entropy threshold chi of Eq. (12), its schedule per knowledge
mode (chosen once from the config), and the selection masks of Eq. (8)-(9)."""

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


class ChiSchedule:
    """chi per epoch for one knowledge mode (Sec. 4.2), chosen once from the config by :func:`chi_schedule`."""

    def __call__(self, epoch: float) -> float:
        raise NotImplementedError


class ZeroKnowledge(ChiSchedule):
    """No peer knowledge: chi = -inf, so not even a one-hot prediction passes Eq. (8)-(9)."""

    def __call__(self, epoch: float) -> float:  # noqa: D102
        return -math.inf


class AllKnowledge(ChiSchedule):
    """Every peer's knowledge: chi = +inf (SyncMKD's selection)."""

    def __call__(self, epoch: float) -> float:  # noqa: D102
        return math.inf


class StaticChi(ChiSchedule):
    """CMD-S: Eq. (12) with b2 = 0, so h(., 0) = 1/2 and chi = H(u)/eta in every epoch."""

    def __init__(self, total_epochs: float, num_classes: int, eta: float) -> None:
        self.total_epochs, self.num_classes, self.eta = total_epochs, num_classes, eta

    def __call__(self, epoch: float) -> float:  # noqa: D102
        return knowledge_threshold(epoch, self.total_epochs, self.num_classes, self.eta, 0.0)


class ProgressiveChi(ChiSchedule):
    """CMD-P: Eq. (12) with b2 != 0, chi = H(u)/eta * 2 h(t/Gamma - 0.5, b2) rising (b2 > 0) or falling (b2 < 0)."""

    def __init__(self, total_epochs: float, num_classes: int, eta: float, b2: float) -> None:
        self.total_epochs, self.num_classes, self.eta, self.b2 = total_epochs, num_classes, eta, b2

    def __call__(self, epoch: float) -> float:  # noqa: D102
        return knowledge_threshold(epoch, self.total_epochs, self.num_classes, self.eta, self.b2)


def chi_schedule(mode: str, total_epochs: float, num_classes: int, eta: float, b2: float) -> ChiSchedule:
    """The chi schedule of a knowledge mode: 'zero' (-inf), 'all' (+inf), 'cmd-s' (b2 = 0), 'cmd-p' (b2 != 0)."""
    if mode not in KNOWLEDGE_MODES:
        raise ValueError(f"unknown knowledge mode {mode!r}; choose one of {', '.join(KNOWLEDGE_MODES)}")
    if mode == "zero":
        return ZeroKnowledge()
    if mode == "all":
        return AllKnowledge()
    if mode == "cmd-s":
        if b2 != 0:
            raise ValueError(f"b2 must be 0 for knowledge mode 'cmd-s' (static chi), got {b2}; use 'cmd-p'")
        return StaticChi(total_epochs, num_classes, eta)
    if b2 == 0:
        raise ValueError("b2 must be non-zero for knowledge mode 'cmd-p' (progressive chi); use 'cmd-s' for b2 = 0")
    return ProgressiveChi(total_epochs, num_classes, eta, b2)


def threshold_for_mode(mode: str, epoch: float, total_epochs: float, num_classes: int, eta: float, b2: float) -> float:
    """chi of one epoch for a knowledge mode by name (see :func:`chi_schedule`)."""
    return chi_schedule(mode, total_epochs, num_classes, eta, b2)(epoch)


def confident_mask(p: torch.Tensor, chi: float | torch.Tensor) -> torch.Tensor:
    """Eq. (8)-(9) selection: a float mask, 1 where H(p) < chi (the peer's knowledge is confident)."""
    return (entropy(p.detach()) < chi).to(p.dtype)
