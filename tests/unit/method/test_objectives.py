"""Unit tests of the objectives: CMD's losses (Eq. 8-11) against the paper's reference code (appendix C), the
baselines of Sec. 2, and argument validation.

Expected values are computed independently of the library: by hand with the ``math`` module, with
explicit loops over plain Python floats, or with the paper's reference code of appendix C.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cmd_dist
from cmd_dist import (
    async_mkd_active_peer,
    cmd_losses,
    cmd_peer_loss,
    confident_mask,
    cross_entropy,
    entropy,
    kdcl_losses,
    kdcl_teacher,
    refined_label,
    sync_mkd_losses,
    t2s_kd_loss,
    tfkd_reg_loss,
    threshold_for_mode,
)
from tests.unit.method.hand import DELTA, F64, P, Q, ent, kl, random_probs, t64, xent

# --------------------------------------------------------------------------------------------------
# 5. CMD losses (Eq. 8-11) against the paper's reference code (appendix C)
# --------------------------------------------------------------------------------------------------


class CMDWithLoss(nn.Module):
    """Appendix C verbatim, with ``.cuda()`` removed (and ``super()`` in Python 3 form)."""

    def __init__(self):
        super().__init__()

    def forward(self, qA, qB, pA, pB, threshold):
        # qA, corrected label from model A
        # qB, corrected label from model B
        # pA, knowledge from model A
        # pB, knowledge from model B

        # calculate the entropy of pA
        hpA = torch.sum(-pA * torch.log(pA + 1e-6), 1)
        # calculate the entropy of pB
        hpB = torch.sum(-pB * torch.log(pB + 1e-6), 1)

        threshold_l = threshold * torch.ones(len(hpA))

        # select the low entropy sample from model B
        indexA = (hpB < threshold_l).nonzero()
        # select the low entropy sample from model A
        indexB = (hpA < threshold_l).nonzero()

        # distill knowledge from model B to model A
        lossB2A = torch.sum(qB[indexA].squeeze(1) * (-torch.log(pA[indexA].squeeze(1) + 1e-6)), 1)
        # distill knowledge from model A to model B
        lossA2B = torch.sum(qA[indexB].squeeze(1) * (-torch.log(pB[indexB].squeeze(1) + 1e-6)), 1)

        lossB2A = sum(lossB2A) / len(hpA)
        lossA2B = sum(lossA2B) / len(hpB)

        return lossB2A, lossA2B


def _reference(q_a, q_b, p_a, p_b, chi) -> tuple[float, float]:
    # sum() over an empty tensor is the int 0, so convert both results to float
    b2a, a2b = CMDWithLoss()(q_a, q_b, p_a, p_b, chi)
    return float(b2a), float(a2b)


def _cmd_inputs(seed: int, batch: int = 16, classes: int = 6, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    p_a = random_probs(gen, batch, classes, dtype=dtype)
    p_b = random_probs(gen, batch, classes, dtype=dtype)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    q = torch.nn.functional.one_hot(labels, classes).to(dtype)
    if seed % 2:
        # CP refined labels: not distributions (negative entries)
        q_a, q_b = refined_label("cp", q, p_a, 0.1), refined_label("cp", q, p_b, 0.1)
    else:
        q_a = random_probs(gen, batch, classes, scale=1.0, dtype=dtype)
        q_b = random_probs(gen, batch, classes, scale=1.0, dtype=dtype)
    return q_a, q_b, p_a, p_b


def _mixed_chi(p: torch.Tensor) -> float:
    h_sorted = entropy(p).sort().values.tolist()
    mid = len(h_sorted) // 2
    return 0.5 * (h_sorted[mid - 1] + h_sorted[mid])


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("case", ["none", "all", "mixed"])
def test_cmd_losses_match_reference(seed, case):
    q_a, q_b, p_a, p_b = _cmd_inputs(seed)
    chi = {"none": 0.0, "all": 1e9, "mixed": None}[case]
    if chi is None:
        chi = _mixed_chi(p_b)
        n_b = int((entropy(p_b) < chi).sum())
        assert 0 < n_b < p_b.shape[0]
    b2a, a2b = cmd_losses(q_a, q_b, p_a, p_b, chi)
    ref_b2a, ref_a2b = _reference(q_a, q_b, p_a, p_b, chi)
    assert b2a.dim() == 0 and a2b.dim() == 0
    assert b2a.item() == pytest.approx(ref_b2a, abs=1e-6)
    assert a2b.item() == pytest.approx(ref_a2b, abs=1e-6)
    if case == "none":
        assert b2a.item() == 0.0 and a2b.item() == 0.0
    elif case == "all":
        assert b2a.item() != 0.0 and a2b.item() != 0.0
    else:
        assert b2a.item() != 0.0


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_cmd_losses_match_reference_float32(seed):
    q_a, q_b, p_a, p_b = _cmd_inputs(seed, batch=32, classes=10, dtype=torch.float32)
    chi = _mixed_chi(p_a)
    b2a, a2b = cmd_losses(q_a, q_b, p_a, p_b, chi)
    ref_b2a, ref_a2b = _reference(q_a, q_b, p_a, p_b, chi)
    assert b2a.item() == pytest.approx(ref_b2a, abs=1e-5)
    assert a2b.item() == pytest.approx(ref_a2b, abs=1e-5)


def test_cmd_losses_hand_value():
    # B = 2, C = 2: only B's first sample is confident at chi = 0.5; only A's second one.
    p_a = t64([[0.5, 0.5], [0.95, 0.05]])
    p_b = t64([[0.9, 0.1], [0.6, 0.4]])
    q_a = t64([[0.2, 0.8], [1.0, 0.0]])
    q_b = t64([[0.7, 0.3], [0.0, 1.0]])
    chi = 0.5
    assert [ent(r) < chi for r in p_b.tolist()] == [True, False]
    assert [ent(r) < chi for r in p_a.tolist()] == [False, True]
    b2a, a2b = cmd_losses(q_a, q_b, p_a, p_b, chi)
    assert b2a.item() == pytest.approx(xent([0.7, 0.3], [0.5, 0.5]) / 2, abs=1e-12)
    assert a2b.item() == pytest.approx(xent([1.0, 0.0], [0.6, 0.4]) / 2, abs=1e-12)


def test_cmd_losses_zero_knowledge_on_one_hot_predictions():
    p = torch.eye(4, dtype=F64)
    q = torch.eye(4, dtype=F64)
    b2a, a2b = cmd_losses(q, q, p, p, threshold_for_mode("zero", 0, 10, 4, 2.0, 0.0))
    assert b2a.item() == 0.0 and a2b.item() == 0.0


def test_cmd_losses_gradients_into_student_and_into_refined_label_where_selected():
    """Appendix C detaches nothing: dL_B2A/dp_A = -m_B q_B/(p_A+d)/B and dL_B2A/dq_B = -m_B log(p_A+d)/B."""
    q_a, q_b, p_a, p_b = _cmd_inputs(0, batch=8, classes=5)
    q_a, q_b, p_a, p_b = (t.clone().requires_grad_() for t in (q_a, q_b, p_a, p_b))
    chi = _mixed_chi(p_b.detach())
    b2a, _ = cmd_losses(q_a, q_b, p_a, p_b, chi)
    b2a.backward()
    mask = (entropy(p_b.detach()) < chi).to(F64).unsqueeze(1)
    assert 0 < int(mask.sum()) < 8  # a threshold that selects part of the batch
    expected = -mask * q_b.detach() / (p_a.detach() + DELTA) / p_a.shape[0]
    torch.testing.assert_close(p_a.grad, expected, rtol=0, atol=1e-10)
    assert bool((p_a.grad[mask.squeeze(1) == 0] == 0).all())
    torch.testing.assert_close(q_b.grad, -mask * torch.log(p_a.detach() + DELTA) / 8, rtol=0, atol=1e-10)
    # the selection itself carries no gradient, and A's own label is not part of L_B2A
    for t in (p_b, q_a):
        assert t.grad is None or bool((t.grad == 0).all())


def test_cmd_losses_detached_refined_labels_send_no_gradient():
    q_a, q_b, p_a, p_b = _cmd_inputs(2, batch=8, classes=5)
    p_a, p_b = p_a.clone().requires_grad_(), p_b.clone().requires_grad_()
    _, a2b = cmd_losses(q_a.detach(), q_b.detach(), p_a, p_b, 1e9)
    a2b.backward()
    assert p_b.grad is not None and bool((p_b.grad != 0).any())
    assert p_a.grad is None or bool((p_a.grad == 0).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cmd_peer_loss_two_peers_is_eq_10_and_11(seed):
    q_a, q_b, p_a, p_b = _cmd_inputs(seed, batch=12, classes=5)
    chi = _mixed_chi(p_b)
    masks = [confident_mask(p_a, chi), confident_mask(p_b, chi)]
    b2a, a2b = cmd_losses(q_a, q_b, p_a, p_b, chi)
    self_a, self_b = cross_entropy(q_a, p_a), cross_entropy(q_b, p_b)
    out_a = cmd_peer_loss(0, self_a, p_a, [q_a, q_b], masks)
    out_b = cmd_peer_loss(1, self_b, p_b, [q_a, q_b], masks)
    torch.testing.assert_close(out_a["loss"], self_a.mean() + b2a, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_b["loss"], self_b.mean() + a2b, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_a["self_loss"], self_a.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(out_a["peer_loss"], b2a, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_b["peer_loss"], a2b, rtol=0, atol=1e-12)


def test_cmd_peer_loss_two_peers_hand_value_and_label_correction_form():
    # Eq. (10): where B is confident, L_A = 2 E_{(q~A + q~B)/2}(-log p_A); elsewhere E_{q~A}(-log p_A).
    p_a = t64([[0.5, 0.5], [0.95, 0.05]])
    p_b = t64([[0.9, 0.1], [0.6, 0.4]])
    q_a = t64([[0.2, 0.8], [1.0, 0.0]])
    q_b = t64([[0.7, 0.3], [0.0, 1.0]])
    masks = [confident_mask(p_a, 0.5), confident_mask(p_b, 0.5)]
    out = cmd_peer_loss(0, cross_entropy(q_a, p_a), p_a, [q_a, q_b], masks)
    row0 = 2 * xent([0.45, 0.55], [0.5, 0.5])  # B confident on sample 0
    row1 = xent([1.0, 0.0], [0.95, 0.05])  # B not confident on sample 1
    assert out["loss"].item() == pytest.approx((row0 + row1) / 2, abs=1e-12)


def test_cmd_peer_loss_three_peers_averages_other_peers():
    gen = torch.Generator().manual_seed(7)
    batch, classes = 10, 4
    probs = [random_probs(gen, batch, classes) for _ in range(3)]
    refined = [random_probs(gen, batch, classes, scale=1.0) for _ in range(3)]
    chi = _mixed_chi(torch.cat(probs))
    masks = [confident_mask(p, chi) for p in probs]
    for k in range(3):
        self_loss = cross_entropy(refined[k], probs[k])
        out = cmd_peer_loss(k, self_loss, probs[k], refined, masks)
        terms = []
        for j in range(3):
            if j == k:
                continue
            total = 0.0
            for b in range(batch):
                if ent(probs[j][b].tolist()) < chi:
                    total += xent(refined[j][b].tolist(), probs[k][b].tolist())
            terms.append(total / batch)
        expected_peer = sum(terms) / 2
        assert out["peer_loss"].item() == pytest.approx(expected_peer, abs=1e-10)
        assert out["loss"].item() == pytest.approx(self_loss.mean().item() + expected_peer, abs=1e-10)
        # equivalently: the average of the pairwise CMD losses into peer k
        pair = [cmd_losses(refined[k], refined[j], probs[k], probs[j], chi)[0] for j in range(3) if j != k]
        assert out["peer_loss"].item() == pytest.approx(sum(x.item() for x in pair) / 2, abs=1e-10)


def test_cmd_peer_loss_gradient_into_peer_refined_labels_follows_the_caller():
    gen = torch.Generator().manual_seed(1)
    probs = [random_probs(gen, 6, 3).requires_grad_() for _ in range(2)]
    refined = [random_probs(gen, 6, 3).requires_grad_() for _ in range(2)]
    masks = [confident_mask(p, 1e9) for p in probs]
    out = cmd_peer_loss(0, cross_entropy(refined[0].detach(), probs[0]), probs[0], refined, masks)
    out["loss"].backward()
    assert probs[0].grad is not None and probs[1].grad is None
    assert refined[0].grad is None  # the own label enters only through self_loss (given detached here)
    torch.testing.assert_close(refined[1].grad, -torch.log(probs[0].detach() + DELTA) / 6, rtol=0, atol=1e-10)
    detached = [r.detach() for r in refined]
    out = cmd_peer_loss(0, cross_entropy(detached[0], probs[0]), probs[0], detached, masks)
    assert not any(r.requires_grad for r in detached)


def test_cmd_peer_loss_errors():
    p = t64(P)
    with pytest.raises(ValueError):
        cmd_peer_loss(0, cross_entropy(p, p), p, [p], [torch.ones(3, dtype=F64)])
    with pytest.raises(ValueError, match="peer"):
        cmd_peer_loss(2, cross_entropy(p, p), p, [p, p], [torch.ones(3, dtype=F64)] * 2)


# --------------------------------------------------------------------------------------------------
# 6. Baselines (Sec. 2.1-2.2)
# --------------------------------------------------------------------------------------------------

QB = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
PA = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]
PB = [[0.5, 0.4, 0.1], [0.2, 0.2, 0.6]]


def test_t2s_kd_loss_hand_value():
    eps = 0.3
    got = t2s_kd_loss(t64(QB), t64(PA), t64(PB), eps)
    rows = [(1 - eps) * xent(q, p) + eps * kl(t, p) for q, p, t in zip(QB, PA, PB)]
    assert got.dim() == 0
    assert got.item() == pytest.approx(sum(rows) / 2, abs=1e-12)


def test_t2s_kd_loss_no_gradient_into_teacher():
    p = t64(PA).requires_grad_()
    p_t = t64(PB).requires_grad_()
    t2s_kd_loss(t64(QB), p, p_t, 0.5).backward()
    assert p.grad is not None
    assert p_t.grad is None or bool((p_t.grad == 0).all())


def test_sync_mkd_two_peers_hand_value():
    eps = 0.4
    losses = sync_mkd_losses(t64(QB), [t64(PA), t64(PB)], eps)
    assert len(losses) == 2
    exp_a = sum((1 - eps) * xent(q, a) + eps * kl(b, a) for q, a, b in zip(QB, PA, PB)) / 2
    exp_b = sum((1 - eps) * xent(q, b) + eps * kl(a, b) for q, a, b in zip(QB, PA, PB)) / 2
    assert losses[0].item() == pytest.approx(exp_a, abs=1e-12)
    assert losses[1].item() == pytest.approx(exp_b, abs=1e-12)


def test_sync_mkd_three_peers_averages_kl():
    gen = torch.Generator().manual_seed(5)
    probs = [random_probs(gen, 4, 3) for _ in range(3)]
    q = t64(QB + QB)
    eps = 0.25
    losses = sync_mkd_losses(q, probs, eps)
    rows = [p.tolist() for p in probs]
    for k in range(3):
        per = []
        for b in range(4):
            kls = [kl(rows[j][b], rows[k][b]) for j in range(3) if j != k]
            per.append((1 - eps) * xent(q[b].tolist(), rows[k][b]) + eps * sum(kls) / 2)
        assert losses[k].item() == pytest.approx(sum(per) / 4, abs=1e-12)


def test_sync_mkd_no_gradient_into_peer_targets():
    probs = [t64(PA).requires_grad_(), t64(PB).requires_grad_()]
    losses = sync_mkd_losses(t64(QB), probs, 0.5)
    losses[0].backward()
    assert probs[0].grad is not None and bool((probs[0].grad != 0).any())
    assert probs[1].grad is None or bool((probs[1].grad == 0).all())


def test_async_mkd_active_peer():
    # Eq. (2): A (peer 0) when t % 2 = 1, B (peer 1) when t % 2 = 0
    for t in range(1, 21):
        assert async_mkd_active_peer(t, 2) == (0 if t % 2 == 1 else 1)
    assert [async_mkd_active_peer(t, 3) for t in range(1, 7)] == [0, 1, 2, 0, 1, 2]


def test_kdcl_teacher_is_softmax_of_mean_logits():
    gen = torch.Generator().manual_seed(9)
    logits = [2.0 * torch.randn(5, 4, generator=gen, dtype=F64) for _ in range(3)]
    probs = [torch.softmax(z, dim=1).requires_grad_() for z in logits]
    teacher = kdcl_teacher(probs)
    expected = torch.softmax(torch.stack(logits).mean(0), dim=1)
    torch.testing.assert_close(teacher, expected, rtol=0, atol=1e-4)
    assert not teacher.requires_grad


def test_kdcl_losses_value_and_no_gradient_into_peers():
    gen = torch.Generator().manual_seed(4)
    probs = [random_probs(gen, 6, 3, scale=1.5).requires_grad_() for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    q = torch.nn.functional.one_hot(labels, 3).to(F64)
    eps = 0.6
    losses = kdcl_losses(q, probs, eps)
    # teacher by hand: normalised geometric mean of (p + 1e-6)
    rows = [p.tolist() for p in probs]
    for k in range(2):
        per = []
        for b in range(6):
            geo = [math.sqrt((rows[0][b][c] + DELTA) * (rows[1][b][c] + DELTA)) for c in range(3)]
            teacher = [g / sum(geo) for g in geo]
            per.append((1 - eps) * xent(q[b].tolist(), rows[k][b]) + eps * kl(teacher, rows[k][b]))
        assert losses[k].item() == pytest.approx(sum(per) / 6, abs=1e-10)
    losses[0].backward()
    assert probs[0].grad is not None
    assert probs[1].grad is None or bool((probs[1].grad == 0).all())


def test_tfkd_reg_loss_epsilon_zero_is_cross_entropy():
    logits = t64([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    q = t64(QB)
    got = tfkd_reg_loss(q, logits, 0.0)
    rows = torch.softmax(logits, dim=1).tolist()
    assert got.item() == pytest.approx(sum(xent(a, b) for a, b in zip(QB, rows)) / 2, abs=1e-12)


@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0])
def test_tfkd_reg_loss_finite_with_gradient(eps):
    logits = (5.0 * torch.randn(8, 10, generator=torch.Generator().manual_seed(2), dtype=F64)).requires_grad_()
    q = torch.nn.functional.one_hot(torch.arange(8) % 10, 10).to(F64)
    loss = tfkd_reg_loss(q, logits, eps)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert bool((logits.grad != 0).any())


# --------------------------------------------------------------------------------------------------
# 7. Argument validation
# --------------------------------------------------------------------------------------------------


def test_cmd_losses_shape_mismatch_names_argument():
    q_a, q_b, p_a, p_b = _cmd_inputs(0, batch=4, classes=3)
    with pytest.raises(ValueError, match="q_b"):
        cmd_losses(q_a, q_b[:3], p_a, p_b, 1.0)
    with pytest.raises(ValueError, match="p_b"):
        cmd_losses(q_a, q_b, p_a, torch.cat([p_b, p_b[:1]]), 1.0)


def test_cmd_losses_rejects_non_distributions():
    q_a, q_b, p_a, p_b = _cmd_inputs(1, batch=4, classes=3)
    with pytest.raises(ValueError, match="p_a"):
        cmd_losses(q_a, q_b, p_a * 2.0, p_b, 1.0)  # rows sum to 2
    logits = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="p_b"):
        cmd_losses(q_a, q_b, p_a, logits, 1.0)  # logits, not probabilities
    with pytest.raises(ValueError, match="p_b"):
        cmd_losses(q_a, q_b, p_a, t64([[1.5, -0.5, 0.0]] * 4), 1.0)  # sums to 1 but negative


def test_cmd_losses_rejects_single_class_and_wrong_rank():
    p = torch.ones(4, 1, dtype=F64)
    with pytest.raises(ValueError, match="p_a"):
        cmd_losses(p, p, p, p, 1.0)
    v = torch.full((3,), 1 / 3, dtype=F64)
    with pytest.raises(ValueError, match="p_a"):
        cmd_losses(v, v, v, v, 1.0)


def test_refined_label_unknown_method_names_it():
    with pytest.raises(ValueError, match="bogus"):
        refined_label("bogus", t64(Q), t64(P), 0.1)


def test_refined_label_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        refined_label("ls", t64(Q), t64(P)[:2], 0.1)


def test_trusts_accept_precomputed_entropies():
    """The training step passes the entropies it already has; the trusts must not change."""
    p = torch.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(3)), dim=1)
    h = cmd_dist.entropy(p)
    assert torch.equal(cmd_dist.mconf_trust(p, 0.7, 8.0, entropies=h), cmd_dist.mconf_trust(p, 0.7, 8.0))
    assert torch.equal(cmd_dist.proselflc_trust(p, 0.3, 8.0, entropies=h), cmd_dist.proselflc_trust(p, 0.3, 8.0))
