"""Self knowledge distillation (paper Sec. 3, Table 2): trusts and refined labels.

Every function here is pure: tensors in, tensors out, no device moves, no host synchronisation.
Probabilities are rows of a ``[batch, classes]`` tensor. Refined labels and trusts are detached:
they are learning *targets* and carry no gradient (Sec. 2.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: The reference code's log offset (appendix C): ``log(p + 1e-6)``.
LOG_EPS = 1e-6

SELF_KD_METHODS = ("ce", "ls", "cp", "bootsoft", "proselflc", "mconf")

#: Fixed epsilon per method when the config leaves ``method.epsilon`` unset (Table 2, "Fixed").
#: LS 0.1 (Szegedy et al.), CP 0.1, Boot-soft 0.05 (Reed et al.'s soft beta = 0.95).
DEFAULT_FIXED_EPSILON = {"ls": 0.1, "cp": 0.1, "bootsoft": 0.05}


def check_probabilities(p: torch.Tensor, name: str = "p", atol: float = 1e-3) -> None:
    """Raise ValueError unless ``p`` is a 2-D tensor of probability rows.

    This reads values back to the host; call it at API boundaries, never inside a training step.
    """
    if p.dim() != 2:
        raise ValueError(f"{name} must be [batch, classes], got shape {tuple(p.shape)}")
    if p.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes, got {p.shape[1]}")
    if p.numel() and (bool((p < -atol).any()) or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=atol)):
        raise ValueError(f"{name} is not a probability distribution per row (softmax your logits first)")


def uniform_entropy(num_classes: int) -> float:
    """H(u) = log C, the entropy of the uniform distribution over C classes."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return math.log(num_classes)


def logistic(lam: torch.Tensor | float, b: float) -> torch.Tensor | float:
    """h(lambda, b) = 1 / (1 + exp(-lambda * b)) of Eq. (5), (6) and (12)."""
    if isinstance(lam, torch.Tensor):
        return torch.sigmoid(lam * b)
    x = -lam * b
    # Numerically safe scalar logistic (b may be large, e.g. |b2| = 100).
    if x >= 0:
        e = math.exp(-x)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(x))


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum p log(p + 1e-6) per row, exactly as in the paper's reference code (appendix C)."""
    return -(p * torch.log(p + LOG_EPS)).sum(dim=1)


def cross_entropy(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """H(q, p) = -sum q log(p + 1e-6) per row (appendix C's form of the cross entropy)."""
    return -(q * torch.log(p + LOG_EPS)).sum(dim=1)


def sample_confidence(p: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor:
    """l(p) = 1 - H(p)/H(u) of Eq. (5), clamped to [0, 1] (the +1e-6 entropy can dip below 0).

    ``entropies`` = entropy(p) when the caller already has it (the training step does).
    """
    h_u = uniform_entropy(p.shape[1])
    h = entropy(p) if entropies is None else entropies
    return (1.0 - h / h_u).clamp(0.0, 1.0)


def proselflc_trust(
    p: torch.Tensor, progress: float | torch.Tensor, b1: float, entropies: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. (5): ProSelfLC's per-sample trust epsilon = g(t) * l(p), g(t) = h(t/Gamma - 0.5, b1).

    ``progress`` is t/Gamma in [0, 1], counted in iterations or epochs as the caller chooses.
    """
    p = p.detach()
    return (logistic(progress - 0.5, b1) * sample_confidence(p, entropies)).detach()


def mconf_trust(
    p: torch.Tensor,
    certainty: float | torch.Tensor,
    b1: float,
    rho: float = 0.5,
    entropies: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. (6): Mconf's per-sample trust epsilon = g(r) * l(p), g(r) = h(r - rho, b1).

    ``certainty`` is the model certainty r = 1 - sum_i H(p_i) / (n H(u)) over the training set
    (see :class:`ModelCertainty`).
    """
    p = p.detach()
    return (logistic(certainty - rho, b1) * sample_confidence(p, entropies)).detach()


def refined_label(
    method: str,
    q: torch.Tensor,
    p: torch.Tensor,
    epsilon: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Table 2: the refined label q~ of a self-KD method, detached.

    ``q`` is the annotated (possibly noisy) label distribution, ``p`` the model's prediction and
    ``epsilon`` the self trust: a float (fixed, LS/CP/Boot-soft) or a per-sample ``[batch]``
    tensor (ProSelfLC, Mconf). CE ignores epsilon.
    """
    if method not in SELF_KD_METHODS:
        raise ValueError(f"unknown self-KD method {method!r}; choose one of {', '.join(SELF_KD_METHODS)}")
    if q.shape != p.shape:
        raise ValueError(f"q and p must have the same shape, got {tuple(q.shape)} and {tuple(p.shape)}")
    p = p.detach()
    if isinstance(epsilon, torch.Tensor) and epsilon.dim() == 1:
        epsilon = epsilon.detach().unsqueeze(1)
    if method == "ce":
        return q.detach()
    if method == "ls":
        return ((1.0 - epsilon) * q + epsilon / q.shape[1]).detach()
    if method == "cp":
        return ((1.0 - epsilon) * q - epsilon * p).detach()
    return ((1.0 - epsilon) * q + epsilon * p).detach()


def self_kd_loss(
    method: str, refined: torch.Tensor, p: torch.Tensor, epsilon: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Per-sample self-KD loss H(q~, p) (Eq. 7 for Mconf; Table 2 for the others).

    For CP the refined label (1-eps)q - eps*p is a target with no gradient, which would leave
    only (1-eps)CE to optimise (the gradient of -eps*sum(p_detached * log p) is zero at p).
    Confidence penalty's purpose is the entropy gradient, so for CP this returns
    (1-eps)H(q, p) - eps*H(p) with H(p) differentiable (Pereyra et al.), whose value equals
    H(q~, p) and whose gradient penalises confident predictions.
    """
    if method == "cp":
        per_row = epsilon  # scalar, 0-d or [batch]
        column = epsilon.unsqueeze(1) if isinstance(epsilon, torch.Tensor) and epsilon.dim() == 1 else epsilon
        q_part = refined + column * p.detach()  # (1-eps) q, recovered without another argument
        return cross_entropy(q_part, p) - per_row * entropy(p)
    return cross_entropy(refined, p)


@dataclass
class ModelCertainty:
    """Mconf's running model certainty r of Eq. (6), as explicit state (checkpointed by the loop).

    r is defined over the whole training set. Instead of a second pass over the data, the entropies
    the training step already computes are summed during epoch e (``accumulate``, a device-side add,
    no host sync); ``end_epoch`` turns the sum into r. Epoch e's steps use the r of epoch e-1;
    epoch 0 uses ``initial`` = 0.0, the certainty of a uniform predictor (an untrained network's
    predictions are close to uniform, so H(p) ~ H(u) and r ~ 0).
    """

    num_classes: int
    r: float = 0.0
    entropy_sum: torch.Tensor | None = None
    count: int = 0

    def accumulate(self, entropies: torch.Tensor) -> None:
        s = entropies.detach().sum()
        self.entropy_sum = s if self.entropy_sum is None else self.entropy_sum + s
        self.count += int(entropies.shape[0])

    def end_epoch(self) -> float:
        if self.count:
            mean_h = float(self.entropy_sum) / self.count
            self.r = 1.0 - mean_h / uniform_entropy(self.num_classes)
        self.entropy_sum, self.count = None, 0
        return self.r

    def state_dict(self) -> dict:
        return {"r": self.r}

    def load_state_dict(self, state: dict) -> None:
        self.r = float(state["r"])
        self.entropy_sum, self.count = None, 0
