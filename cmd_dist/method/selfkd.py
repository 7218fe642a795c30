"""Self knowledge distillation (paper Sec. 3, Table 2): trusts and refined labels.

Every function here is pure: tensors in, tensors out, no device moves, no host synchronisation.
Probabilities are rows of a ``[batch, classes]`` tensor.

Which terms carry gradient (the paper is silent; the authors' released ProSelfLC code decides,
``proselflc/slices/losses/proselflc.py`` of XinshaoAmosWang/ProSelfLC-AT): the trust epsilon is
computed under ``no_grad`` and is a constant; the prediction p *inside* a refined label
q~ = (1 - eps) q + eps p keeps its gradient. The self-KD loss H(q~, p) is then
(1 - eps) H(q, p) + eps H(p), cross entropy plus an entropy term pulling each sample towards the
model's own confident prediction (Reed et al.'s soft bootstrapping is the same). With p detached
(``grad=False``) the gradient w.r.t. the logits is (1 - eps)(p - q): plain cross entropy on the noisy
label, scaled down, which can never correct a label. See docs/method.md, "Gradients".
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


def ce_label(q: torch.Tensor, p: torch.Tensor, epsilon: torch.Tensor | float) -> torch.Tensor:
    """CE: q~ = q."""
    return q


def ls_label(q: torch.Tensor, p: torch.Tensor, epsilon: torch.Tensor | float) -> torch.Tensor:
    """LS: q~ = (1 - eps) q + eps u."""
    return (1.0 - epsilon) * q + epsilon / q.shape[1]


def cp_label(q: torch.Tensor, p: torch.Tensor, epsilon: torch.Tensor | float) -> torch.Tensor:
    """CP: q~ = (1 - eps) q - eps p."""
    return (1.0 - epsilon) * q - epsilon * p


def soft_label(q: torch.Tensor, p: torch.Tensor, epsilon: torch.Tensor | float) -> torch.Tensor:
    """Boot-soft, ProSelfLC, Mconf: q~ = (1 - eps) q + eps p."""
    return (1.0 - epsilon) * q + epsilon * p


#: Table 2's refined label per self-KD method, ``label(q, p, eps)``; apply it with :func:`refine`.
REFINED_LABELS = {
    "ce": ce_label,
    "ls": ls_label,
    "cp": cp_label,
    "bootsoft": soft_label,
    "proselflc": soft_label,
    "mconf": soft_label,
}


def refined_label(
    method: str,
    q: torch.Tensor,
    p: torch.Tensor,
    epsilon: torch.Tensor | float = 0.0,
    grad: bool = True,
) -> torch.Tensor:
    """Table 2: the refined label q~ of a self-KD method.

    ``q`` is the annotated (possibly noisy) label distribution, ``p`` the model's prediction and
    ``epsilon`` the self trust: a float (fixed, LS/CP/Boot-soft) or a per-sample ``[batch]``
    tensor (ProSelfLC, Mconf), always used as a constant. CE ignores epsilon. With ``grad=True``
    (the authors' code) the p inside q~ keeps its gradient; ``grad=False`` detaches it (ablation).
    """
    if method not in SELF_KD_METHODS:
        raise ValueError(f"unknown self-KD method {method!r}; choose one of {', '.join(SELF_KD_METHODS)}")
    return refine(REFINED_LABELS[method], q, p, epsilon, grad)


def refine(
    label: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | float], torch.Tensor],
    q: torch.Tensor,
    p: torch.Tensor,
    epsilon: torch.Tensor | float = 0.0,
    grad: bool = True,
) -> torch.Tensor:
    """One of :data:`REFINED_LABELS` applied as :func:`refined_label` applies it (the training step resolves
    ``label`` once): q and epsilon are constants, p keeps its gradient when ``grad``."""
    if q.shape != p.shape:
        raise ValueError(f"q and p must have the same shape, got {tuple(q.shape)} and {tuple(p.shape)}")
    q = q.detach()
    if not grad:
        p = p.detach()
    if isinstance(epsilon, torch.Tensor):
        epsilon = epsilon.detach()
        if epsilon.dim() == 1:
            epsilon = epsilon.unsqueeze(1)
    return label(q, p, epsilon)


def self_kd_loss(refined: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-sample self-KD loss H(q~, p) (Eq. 7 for Mconf; Table 2 for the others).

    Its gradient depends on how ``refined`` was built (:func:`refined_label`'s ``grad``): with the
    prediction's gradient kept, H((1-eps) q + eps p, p) = (1-eps) H(q, p) + eps H(p) for Boot-soft,
    ProSelfLC and Mconf, and (1-eps) H(q, p) - eps H(p) for CP (Pereyra et al.'s confidence penalty).
    """
    return cross_entropy(refined, p)


def own_target_grad(method: str, target_grad: bool) -> bool:
    """Whether a peer's own refined label keeps the gradient of its prediction (``method.target_grad``).

    CP always keeps it: with a detached target CP's loss degrades to (1-eps) CE, and its purpose is
    the entropy gradient (Pereyra et al. 2017; the authors' ConfidencePenalty detaches nothing).
    """
    return target_grad or method == "cp"


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

    def add_epoch_sum(self, entropy_sum: float, count: int) -> None:
        """Add summed entropies read once per epoch from the step's device accumulator."""
        total = torch.tensor(float(entropy_sum), dtype=torch.float64)
        self.entropy_sum = total if self.entropy_sum is None else self.entropy_sum + total
        self.count += int(count)

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
