"""Distillation objectives: CMD (paper Sec. 4.1, Eq. 8-11) and the baselines of Sec. 2.1-2.2.

All functions are pure tensor code. Batch reductions follow the paper's reference code (appendix C):
sum over samples / batch size. The CMD losses detach nothing, like appendix C: whether a peer's refined
label q~_j sends gradient into peer j (through the p_j inside it, ``method.peer_target_grad``) is
decided by the caller, who passes q~_j with or without its graph. The selection masks never carry
gradient. The baselines' peer predictions (KL targets, KDCL's teacher) are detached, as in their papers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cmd_dist.method.selfkd import LOG_EPS, check_probabilities, cross_entropy, entropy

#: Objectives a run can use (``method.objective``): CMD (with any knowledge mode) or a baseline.
OBJECTIVES = ("cmd", "syncmkd", "asyncmkd", "kdcl", "tfkd_reg")


def _check_pair(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    shape = tensors[0].shape
    for name, t in zip(names, tensors):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like {names[0]}")


def kl_divergence(p_target: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """D_KL(p_target || p) per row, with the reference code's log(. + 1e-6)."""
    p_target = p_target.detach()
    return (p_target * (torch.log(p_target + LOG_EPS) - torch.log(p + LOG_EPS))).sum(dim=1)


def cmd_losses(
    q_a: torch.Tensor,
    q_b: torch.Tensor,
    p_a: torch.Tensor,
    p_b: torch.Tensor,
    chi: float | torch.Tensor,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (8)-(9): confident cross-distillation losses (L_B2A, L_A2B) for two peers A and B.

    L_B2A = sum over samples with H(p_B) < chi of H(q~_B, p_A), divided by the full batch size
    (the reduction of appendix C); L_A2B symmetric. ``q_*`` are refined labels, ``p_*`` predicted
    probabilities. Selection uses masks (no index lists), so no host synchronisation. Gradient flows
    into p_A (and into q~_B when q~_B carries a graph, as in appendix C where nothing is detached).
    ``validate`` checks shapes and distributions (a host sync); the training step turns it off.
    """
    if validate:
        _check_pair(("q_a", "q_b", "p_a", "p_b"), (q_a, q_b, p_a, p_b))
        check_probabilities(p_a, "p_a")
        check_probabilities(p_b, "p_b")
    batch = p_a.shape[0]
    mask_into_a = (entropy(p_b.detach()) < chi).to(p_a.dtype)  # B's confident knowledge
    mask_into_b = (entropy(p_a.detach()) < chi).to(p_b.dtype)
    loss_b2a = (mask_into_a * cross_entropy(q_b, p_a)).sum() / batch
    loss_a2b = (mask_into_b * cross_entropy(q_a, p_b)).sum() / batch
    return loss_b2a, loss_a2b


def cmd_peer_loss(
    peer: int,
    self_loss: torch.Tensor,
    p_self: torch.Tensor,
    refined_labels: Sequence[torch.Tensor],
    peer_masks: Sequence[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Eq. (10)-(11) generalised to N >= 2 peers: the full objective of peer ``peer``.

    L_k = mean_b self_loss_k + 1/(N-1) * sum_{j != k} [sum_b m_j(b) H(q~_j(b), p_k(b))] / batch

    where ``self_loss`` is peer k's per-sample self-KD loss H(q~_k, p_k), ``refined_labels[j]`` is
    peer j's refined label q~_j and ``peer_masks[j]`` = 1[H(p_j) < chi] (see
    :func:`cmd_dist.method.selection.confident_mask`). With N > 2 the confident peers are averaged with
    equal weight 1/(N-1), so the peer term keeps the scale of the two-peer case and adding peers
    does not drown a peer's own label; at N = 2 the weight is 1 and this is exactly Eq. (10)/(11).
    ``refined_labels[j]`` is used as given: with its graph it sends gradient into peer j too.
    Returns ``{"loss", "self_loss", "peer_loss"}`` (scalars).
    """
    n = len(refined_labels)
    if n < 2 or len(peer_masks) != n:
        raise ValueError(f"need refined_labels and peer_masks for N >= 2 peers, got {n} and {len(peer_masks)}")
    if not 0 <= peer < n:
        raise ValueError(f"peer must be in [0, {n}), got {peer}")
    batch = p_self.shape[0]
    peer_loss = p_self.new_zeros(())
    for j in range(n):
        if j != peer:
            peer_loss = peer_loss + (peer_masks[j] * cross_entropy(refined_labels[j], p_self)).sum() / batch
    peer_loss = peer_loss / (n - 1)
    self_mean = self_loss.mean()
    return {"loss": self_mean + peer_loss, "self_loss": self_mean, "peer_loss": peer_loss}


def t2s_kd_loss(q: torch.Tensor, p: torch.Tensor, p_t: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eq. (1): teacher-to-student KD, (1-eps) H(q, p) + eps D_KL(p_t, p), batch mean; p_t detached."""
    return ((1.0 - epsilon) * cross_entropy(q, p) + epsilon * kl_divergence(p_t, p)).mean()


def sync_mkd_losses(q: torch.Tensor, probs: Sequence[torch.Tensor], epsilon: float) -> list[torch.Tensor]:
    """Eq. (3): SyncMKD, every peer k trained at once on L_k = (1-eps)H(q,p_k) + eps D_KL(p_j, p_k).

    For N > 2 peers the KL term averages over the other peers (Deep Mutual Learning's choice).
    The sum of the returned losses is L_SyncMKD.
    """
    n = len(probs)
    return [
        (
            (1.0 - epsilon) * cross_entropy(q, probs[k])
            + epsilon * sum(kl_divergence(probs[j], probs[k]) for j in range(n) if j != k) / (n - 1)
        ).mean()
        for k in range(n)
    ]


def async_mkd_active_peer(step: int, num_peers: int) -> int:
    """Eq. (2): AsyncMKD trains one peer per iteration: A when t % 2 = 1, B when t % 2 = 0.

    Generalised to N peers as round robin (peer (t - 1) mod N), which is Eq. (2) at N = 2 with
    A = peer 0. The losses are those of :func:`sync_mkd_losses`; only the active peer steps.
    """
    return (step - 1) % num_peers


def kdcl_teacher(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """KDCL-naive teacher (Guo et al. 2020): softmax of the peers' averaged logits, detached.

    From probabilities, mean_j log p_j equals the mean logits up to a per-row constant, so the
    softmax is the same.
    """
    logp = torch.stack([torch.log(p.detach() + LOG_EPS) for p in probs]).mean(0)
    return torch.softmax(logp, dim=1)


def kdcl_losses(q: torch.Tensor, probs: Sequence[torch.Tensor], epsilon: float) -> list[torch.Tensor]:
    """KDCL: every peer distils the ensemble teacher, (1-eps)H(q,p_k) + eps D_KL(teacher, p_k)."""
    teacher = kdcl_teacher(probs)
    return [t2s_kd_loss(q, p, teacher, epsilon) for p in probs]


def tfkd_reg_loss(
    q: torch.Tensor, logits: torch.Tensor, epsilon: float, correct_prob: float = 0.99, temperature: float = 20.0
) -> torch.Tensor:
    """Tf-KD_reg (Yuan et al. 2020): KD from a hand-designed teacher, no peer needed.

    The virtual teacher puts ``correct_prob`` on the labelled class and spreads the rest uniformly;
    loss = (1-eps) H(q, p) + eps T^2 D_KL(softmax(teacher/T), softmax(z/T)), batch mean. As in the
    authors' released code, the teacher's probabilities are softened as if they were logits.
    """
    c = q.shape[1]
    teacher = q * correct_prob + (1.0 - q) * (1.0 - correct_prob) / (c - 1)
    teacher_t = torch.softmax(teacher / temperature, dim=1)
    log_p_t = F.log_softmax(logits / temperature, dim=1)
    kl = (teacher_t * (torch.log(teacher_t) - log_p_t)).sum(1)
    p = torch.softmax(logits, dim=1)
    return ((1.0 - epsilon) * cross_entropy(q, p) + epsilon * temperature**2 * kl).mean()
