"""Unit tests of the paper's equations: self KD (Sec. 3, Table 2), CMD (Sec. 4, appendix C) and baselines (Sec. 2).

Expected values are computed independently of the library: by hand with the ``math`` module, with
explicit loops over plain Python floats, or with the paper's reference code of appendix C.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import cmd_dist
from cmd_dist import (
    ModelCertainty,
    async_mkd_active_peer,
    cmd_losses,
    cmd_peer_loss,
    confident_mask,
    cross_entropy,
    entropy,
    kdcl_losses,
    kdcl_teacher,
    knowledge_threshold,
    mconf_trust,
    proselflc_trust,
    refined_label,
    self_kd_loss,
    sync_mkd_losses,
    t2s_kd_loss,
    tfkd_reg_loss,
    threshold_for_mode,
    uniform_entropy,
)

DELTA = 1e-6  # the reference code's log offset, log(p + 1e-6)
F64 = torch.float64


# --------------------------------------------------------------------------------------------------
# Hand-computation helpers (plain Python floats, no library code)
# --------------------------------------------------------------------------------------------------


def h(lam: float, b: float) -> float:
    """The logistic h(lambda, b) = 1 / (1 + exp(-lambda * b)) of Eq. (5), (6), (12)."""
    return 1.0 / (1.0 + math.exp(-lam * b))


def ent(row: list[float]) -> float:
    """Reference entropy -sum p log(p + 1e-6) of one row."""
    return -sum(x * math.log(x + DELTA) for x in row)


def xent(q_row: list[float], p_row: list[float]) -> float:
    """Reference cross entropy -sum q log(p + 1e-6) of one row."""
    return -sum(a * math.log(b + DELTA) for a, b in zip(q_row, p_row))


def kl(t_row: list[float], p_row: list[float]) -> float:
    """Reference KL divergence sum t (log(t + 1e-6) - log(p + 1e-6)) of one row."""
    return sum(a * (math.log(a + DELTA) - math.log(b + DELTA)) for a, b in zip(t_row, p_row))


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def random_probs(gen: torch.Generator, batch: int, classes: int, scale: float = 3.0, dtype=F64) -> torch.Tensor:
    return torch.softmax(scale * torch.randn(batch, classes, generator=gen, dtype=dtype), dim=1)


P3 = [[0.5, 0.5, 0.0], [0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]]


# --------------------------------------------------------------------------------------------------
# 1. Entropy and self trusts (Eq. 5, 6)
# --------------------------------------------------------------------------------------------------


def test_entropy_hand_values():
    got = entropy(t64(P3))
    expected = [ent(r) for r in P3]
    # sanity of the hand values themselves: a zero entry contributes nothing, 0.5/0.5 is ~log 2
    assert expected[0] == pytest.approx(-math.log(0.5 + DELTA), abs=1e-12)
    assert got.shape == (3,)
    torch.testing.assert_close(got, t64(expected), rtol=0, atol=1e-12)


def test_entropy_float32_and_one_hot_is_slightly_negative():
    got = entropy(torch.tensor(P3, dtype=torch.float32))
    torch.testing.assert_close(got, torch.tensor([ent(r) for r in P3]), rtol=0, atol=1e-6)
    one_hot = entropy(torch.tensor([[1.0, 0.0, 0.0]]))
    assert one_hot.item() < 0.0
    assert one_hot.item() == pytest.approx(-1e-6, abs=1e-7)


def test_uniform_entropy():
    assert uniform_entropy(10) == pytest.approx(math.log(10), abs=1e-15)
    assert uniform_entropy(2) == pytest.approx(math.log(2), abs=1e-15)


@pytest.mark.parametrize("progress,b1", [(0.75, 4.0), (0.1, 10.0), (0.5, 3.0), (0.9, 0.0), (1.0, -2.0)])
def test_proselflc_trust_hand_values(progress, b1):
    p = t64(P3)
    got = proselflc_trust(p, progress, b1)
    expected = [h(progress - 0.5, b1) * (1.0 - ent(r) / math.log(3)) for r in P3]
    torch.testing.assert_close(got, t64(expected), rtol=0, atol=1e-12)


def test_proselflc_trust_tensor_progress_matches_float():
    p = t64(P3)
    got = proselflc_trust(p, torch.tensor(0.8, dtype=F64), 6.0)
    expected = [h(0.3, 6.0) * (1.0 - ent(r) / math.log(3)) for r in P3]
    torch.testing.assert_close(got, t64(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("certainty,b1,rho", [(0.8, 4.0, 0.5), (0.2, 10.0, 0.5), (0.6, 5.0, 0.7), (0.5, 8.0, 0.5)])
def test_mconf_trust_hand_values(certainty, b1, rho):
    p = t64(P3)
    got = mconf_trust(p, certainty, b1, rho=rho)
    expected = [h(certainty - rho, b1) * (1.0 - ent(r) / math.log(3)) for r in P3]
    torch.testing.assert_close(got, t64(expected), rtol=0, atol=1e-12)


def test_mconf_trust_default_rho_is_half():
    p = t64(P3)
    torch.testing.assert_close(mconf_trust(p, 0.9, 3.0), mconf_trust(p, 0.9, 3.0, rho=0.5), rtol=0, atol=0)
    expected = [h(0.4, 3.0) * (1.0 - ent(r) / math.log(3)) for r in P3]
    torch.testing.assert_close(mconf_trust(p, 0.9, 3.0), t64(expected), rtol=0, atol=1e-12)


def test_trusts_are_detached():
    p = t64(P3).requires_grad_()
    prog = torch.tensor(0.7, dtype=F64, requires_grad=True)
    cert = torch.tensor(0.7, dtype=F64, requires_grad=True)
    for out in (
        proselflc_trust(p, 0.7, 3.0),
        proselflc_trust(p, prog, 3.0),
        mconf_trust(p, 0.7, 3.0),
        mconf_trust(p, cert, 3.0),
    ):
        assert not out.requires_grad
        assert out.grad_fn is None


def test_trust_one_hot_sample_confidence_clamped_to_one():
    # H(one-hot) is about -1e-6 < 0, so 1 - H/H(u) slightly exceeds 1; epsilon must stay in [0, 1].
    p = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=F64)
    got = proselflc_trust(p, 1.0, 1000.0)
    assert 0.0 <= got.item() <= 1.0
    assert got.item() == pytest.approx(h(0.5, 1000.0), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# 2. Refined labels (Table 2) and self-KD losses
# --------------------------------------------------------------------------------------------------

Q = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
P = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.25, 0.15, 0.6]]


def _refine_by_hand(method: str, eps_rows: list[float]) -> list[list[float]]:
    out = []
    for qr, pr, e in zip(Q, P, eps_rows):
        if method == "ce":
            out.append(list(qr))
        elif method == "ls":
            out.append([(1 - e) * a + e / len(qr) for a in qr])
        elif method == "cp":
            out.append([(1 - e) * a - e * b for a, b in zip(qr, pr)])
        else:
            out.append([(1 - e) * a + e * b for a, b in zip(qr, pr)])
    return out


@pytest.mark.parametrize("method", ["ce", "ls", "cp", "bootsoft", "proselflc", "mconf"])
def test_refined_label_fixed_epsilon(method):
    got = refined_label(method, t64(Q), t64(P), 0.2)
    torch.testing.assert_close(got, t64(_refine_by_hand(method, [0.2] * 3)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["ls", "cp", "bootsoft", "proselflc", "mconf"])
def test_refined_label_per_sample_epsilon_broadcasts_over_rows(method):
    # B == C == 3 so a wrong (column-wise) broadcast would silently give different numbers.
    eps = [0.1, 0.4, 0.7]
    got = refined_label(method, t64(Q), t64(P), t64(eps))
    torch.testing.assert_close(got, t64(_refine_by_hand(method, eps)), rtol=0, atol=1e-12)


def test_refined_label_ce_ignores_epsilon():
    got = refined_label("ce", t64(Q), t64(P), t64([0.3, 0.5, 0.9]))
    torch.testing.assert_close(got, t64(Q), rtol=0, atol=0)


def test_refined_label_zero_epsilon_is_annotated_label():
    for method in ("ls", "cp", "bootsoft", "proselflc", "mconf"):
        torch.testing.assert_close(refined_label(method, t64(Q), t64(P), 0.0), t64(Q), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["ce", "ls", "cp", "bootsoft", "proselflc", "mconf"])
def test_refined_label_gradient_flags(method):
    """q and eps never carry gradient; p inside q~ keeps it with grad=True (authors' code), not with grad=False."""
    q = t64(Q).requires_grad_()
    p = t64(P).requires_grad_()
    eps = t64([0.1, 0.2, 0.3]).requires_grad_()
    for e in (0.2, eps):
        detached = refined_label(method, q, p, e, grad=False)
        assert not detached.requires_grad and detached.grad_fn is None
        kept = refined_label(method, q, p, e, grad=True)
        if method in ("ce", "ls"):  # no prediction inside the target
            assert not kept.requires_grad
            continue
        (g_p,) = torch.autograd.grad(kept.sum(), p, retain_graph=True)
        sign = -1.0 if method == "cp" else 1.0
        e_col = e.detach().unsqueeze(1) if isinstance(e, torch.Tensor) else e
        torch.testing.assert_close(g_p, sign * e_col * torch.ones_like(g_p))  # d q~ / d p = +-eps
        assert torch.autograd.grad(kept.sum(), (q, eps), allow_unused=True) == (None, None)


def test_refined_label_sums_to_one_for_convex_methods():
    eps = t64([0.1, 0.4, 0.7])
    for method in ("ls", "bootsoft", "proselflc", "mconf"):
        torch.testing.assert_close(refined_label(method, t64(Q), t64(P), eps).sum(1), torch.ones(3, dtype=F64))
    # CP's refined label is not a distribution: rows sum to 1 - 2 eps
    torch.testing.assert_close(refined_label("cp", t64(Q), t64(P), eps).sum(1), 1 - 2 * eps)


def _cp_gradient_by_hand(q, p, eps_rows):
    """d/dp of sum_b [(1-eps_b) H(q_b, p_b) - eps_b H(p_b)], with the 1e-6 offset, as Python floats."""
    grad = []
    for qr, pr, e in zip(q, p, eps_rows):
        grad.append([-(1 - e) * a / (b + DELTA) + e * (math.log(b + DELTA) + b / (b + DELTA)) for a, b in zip(qr, pr)])
    return grad


def _bootstrap_gradient_by_hand(q, p, eps_rows):
    """d/dp of sum_b [(1-eps_b) H(q_b, p_b) + eps_b H(p_b)]: Boot-soft / ProSelfLC / Mconf with p's gradient kept."""
    grad = []
    for qr, pr, e in zip(q, p, eps_rows):
        grad.append([-(1 - e) * a / (b + DELTA) - e * (math.log(b + DELTA) + b / (b + DELTA)) for a, b in zip(qr, pr)])
    return grad


@pytest.mark.parametrize("eps_kind", ["float", "per_sample"])
def test_self_kd_loss_cp_value_and_entropy_gradient(eps_kind):
    eps_rows = [0.2, 0.2, 0.2] if eps_kind == "float" else [0.1, 0.3, 0.5]
    eps = 0.2 if eps_kind == "float" else t64(eps_rows)
    p = t64(P).requires_grad_()
    refined = refined_label("cp", t64(Q), p, eps)

    loss = self_kd_loss(refined, p)
    # value: H(q~, p) of Table 2
    expected_value = [xent(r, pr) for r, pr in zip(_refine_by_hand("cp", eps_rows), P)]
    assert loss.shape == (3,)
    torch.testing.assert_close(loss.detach(), t64(expected_value), rtol=0, atol=1e-12)

    # gradient: that of (1-eps) H(q, p) - eps H(p) with H(p) differentiable (Pereyra et al.)
    (grad,) = torch.autograd.grad(loss.sum(), p)
    torch.testing.assert_close(grad, t64(_cp_gradient_by_hand(Q, P, eps_rows)), rtol=0, atol=1e-10)

    # and it differs from the gradient with a detached target by exactly the entropy gradient
    (det_grad,) = torch.autograd.grad(self_kd_loss(refined_label("cp", t64(Q), p, eps, grad=False), p).sum(), p)
    e_only = [[e * math.log(b + DELTA) for b in pr] for pr, e in zip(P, eps_rows)]
    torch.testing.assert_close(grad - det_grad, t64(e_only), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["bootsoft", "proselflc", "mconf"])
@pytest.mark.parametrize("grad", [True, False])
def test_self_kd_loss_bootstrap_methods_gradient(method, grad):
    """With grad=True: (1-eps) H(q,p) + eps H(p) (authors' code); with grad=False: CE on a constant target."""
    eps_rows = [0.1, 0.3, 0.5]
    p = t64(P).requires_grad_()
    refined = refined_label(method, t64(Q), p, t64(eps_rows), grad=grad)
    loss = self_kd_loss(refined, p)
    hand_refined = _refine_by_hand(method, eps_rows)
    torch.testing.assert_close(loss.detach(), t64([xent(r, pr) for r, pr in zip(hand_refined, P)]), rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(loss.sum(), p)
    if grad:
        expected = _bootstrap_gradient_by_hand(Q, P, eps_rows)
    else:
        expected = [[-a / (b + DELTA) for a, b in zip(r, pr)] for r, pr in zip(hand_refined, P)]
    torch.testing.assert_close(g, t64(expected), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["ce", "ls"])
def test_self_kd_loss_ce_ls_are_cross_entropy_on_a_constant(method):
    eps_rows = [0.1, 0.3, 0.5]
    p = t64(P).requires_grad_()
    refined = refined_label(method, t64(Q), p, t64(eps_rows))
    loss = self_kd_loss(refined, p)
    hand_refined = _refine_by_hand(method, eps_rows)
    torch.testing.assert_close(loss.detach(), t64([xent(r, pr) for r, pr in zip(hand_refined, P)]), rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(loss.sum(), p)
    expected_grad = [[-a / (b + DELTA) for a, b in zip(r, pr)] for r, pr in zip(hand_refined, P)]
    torch.testing.assert_close(grad, t64(expected_grad), rtol=0, atol=1e-10)


def _authors_target(method: str, q: torch.Tensor, p: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The refined label as the authors' ProSelfLC-AT losses build it: p not detached, eps a constant."""
    e = eps.detach()[:, None]
    if method == "ce":
        return q
    if method == "ls":
        return (1 - e) * q + e / q.shape[1]
    if method == "cp":
        return (1 - e) * q - e * p
    return (1 - e) * q + e * p


@pytest.mark.parametrize("method", ["ce", "ls", "cp", "bootsoft", "proselflc", "mconf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_wrt_logits_equals_authors_formulation(method, dtype):
    """Issue 9: d loss / d logits of the library path == autograd through H((1-eps) q + eps p, p), 1e-6."""
    from types import SimpleNamespace

    from cmd_dist.train.step import SelfKD

    gen = torch.Generator().manual_seed(7)
    logits = (3.0 * torch.randn(16, 10, generator=gen, dtype=dtype)).requires_grad_()
    y = torch.randint(0, 10, (16,), generator=gen)
    q = torch.nn.functional.one_hot(y, 10).to(dtype)
    cfg = SimpleNamespace(self_kd=method, b1=16.0, rho=0.5, epsilon=None, target_grad=True, peer_target_grad=True)
    skd = SelfKD(cfg)
    p = torch.softmax(logits, 1)
    h = entropy(p.detach())
    eps = skd.trust(p, h, torch.tensor(0.8, dtype=dtype), torch.tensor(0.9, dtype=dtype))
    if method not in ("ce",):
        assert float(eps.max()) > 0.01  # a real trust, so the test can tell targets apart
    own, _ = skd.targets(q, p, eps)
    (g_lib,) = torch.autograd.grad(self_kd_loss(own, p).sum() / 16, logits)

    logits2 = logits.detach().clone().requires_grad_()
    p2 = torch.softmax(logits2, 1)
    target = _authors_target(method, q, p2, eps)
    ref = torch.sum(target * (-torch.log(p2 + 1e-6)), 1).sum() / 16  # their CrossEntropy.forward
    (g_ref,) = torch.autograd.grad(ref, logits2)
    torch.testing.assert_close(g_lib, g_ref, rtol=0, atol=1e-6)


def test_detached_target_gradient_is_scaled_cross_entropy():
    """target_grad=false: for Boot-soft the logit gradient is CE's direction scaled by (1 - eps) (up to the 1e-6)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 5, generator=gen, dtype=F64).requires_grad_()
    q = torch.nn.functional.one_hot(torch.randint(0, 5, (8,), generator=gen), 5).to(F64)
    eps = torch.full((8,), 0.3, dtype=F64)
    p = torch.softmax(logits, 1)
    (g,) = torch.autograd.grad(self_kd_loss(refined_label("bootsoft", q, p, eps, grad=False), p).sum(), logits)
    torch.testing.assert_close(g, (1 - 0.3) * (p.detach() - q), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# 3. Mconf's model certainty r (Eq. 6)
# --------------------------------------------------------------------------------------------------


def test_model_certainty_initial_and_epoch_mean_over_samples():
    mc = ModelCertainty(num_classes=4)
    assert mc.r == 0.0
    mc.accumulate(torch.tensor([1.0, 0.5], dtype=F64))
    mc.accumulate(torch.tensor([0.2, 0.3, 0.4], dtype=F64))
    assert mc.r == 0.0  # r only changes at the end of the epoch
    r = mc.end_epoch()
    # mean over all 5 samples (2.4 / 5), not the mean of the two batch means
    expected = 1.0 - (2.4 / 5) / math.log(4)
    assert r == pytest.approx(expected, abs=1e-12)
    assert mc.r == pytest.approx(expected, abs=1e-12)


def test_model_certainty_from_predictions():
    gen = torch.Generator().manual_seed(3)
    p1, p2 = random_probs(gen, 4, 5), random_probs(gen, 7, 5)
    mc = ModelCertainty(num_classes=5)
    mc.accumulate(entropy(p1))
    mc.accumulate(entropy(p2))
    rows = p1.tolist() + p2.tolist()
    expected = 1.0 - sum(ent(r) for r in rows) / (len(rows) * math.log(5))
    assert mc.end_epoch() == pytest.approx(expected, abs=1e-12)
    # the next epoch starts afresh: accumulating uniform predictions gives r ~ 0
    mc.accumulate(entropy(torch.full((3, 5), 0.2, dtype=F64)))
    assert mc.end_epoch() == pytest.approx(0.0, abs=1e-4)


def test_model_certainty_empty_epoch_keeps_r_and_state_roundtrip():
    mc = ModelCertainty(num_classes=3)
    mc.accumulate(torch.tensor([0.1, 0.2], dtype=F64))
    r = mc.end_epoch()
    assert mc.end_epoch() == r  # nothing accumulated: r unchanged
    restored = ModelCertainty(num_classes=3)
    restored.accumulate(torch.tensor([5.0]))  # stale accumulation must be dropped on load
    restored.load_state_dict(mc.state_dict())
    assert restored.r == r
    assert restored.end_epoch() == r


def test_model_certainty_accumulate_detaches():
    mc = ModelCertainty(num_classes=3)
    p = t64(P3).requires_grad_()
    mc.accumulate(entropy(p))
    assert not mc.entropy_sum.requires_grad


# --------------------------------------------------------------------------------------------------
# 4. Knowledge selection threshold chi (Eq. 12)
# --------------------------------------------------------------------------------------------------


def _probe_predictions(num_classes: int, dtype=F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    rand = random_probs(gen, 6, num_classes, dtype=dtype)
    uniform = torch.full((1, num_classes), 1.0 / num_classes, dtype=dtype)
    one_hot = torch.eye(num_classes, dtype=dtype)[:2]
    nearly_uniform = torch.softmax(1e-3 * torch.randn(2, num_classes, generator=gen, dtype=dtype), dim=1)
    return torch.cat([rand, uniform, one_hot, nearly_uniform])


@pytest.mark.parametrize("epoch", [0, 13, 50, 100])
def test_knowledge_threshold_static(epoch):
    for c, eta in ((10, 2.0), (100, 0.5), (7, 3.0)):
        assert knowledge_threshold(epoch, 100, c, eta, 0.0) == pytest.approx(math.log(c) / eta, abs=1e-12)


@pytest.mark.parametrize("b2", [5.0, -5.0, 0.7, -20.0])
def test_knowledge_threshold_progressive_hand_values(b2):
    total, c, eta = 100, 10, 2.0
    for epoch in (0, 10, 25, 50, 75, 100):
        expected = math.log(c) / eta * 2 * h(epoch / total - 0.5, b2)
        assert knowledge_threshold(epoch, total, c, eta, b2) == pytest.approx(expected, rel=1e-12)
    # at t/Gamma = 0.5 every b2 gives the static chi
    assert knowledge_threshold(50, total, c, eta, b2) == pytest.approx(math.log(c) / eta, rel=1e-12)


def test_knowledge_threshold_monotonic_in_epoch():
    epochs = list(range(0, 101, 5))
    up = [knowledge_threshold(e, 100, 10, 2.0, 6.0) for e in epochs]
    down = [knowledge_threshold(e, 100, 10, 2.0, -6.0) for e in epochs]
    assert all(a < b for a, b in itertools.pairwise(up))
    assert all(a > b for a, b in itertools.pairwise(down))
    # symmetric around t/Gamma = 0.5: chi(b2) + chi(-b2) = 2 H(u)/eta
    for a, b in zip(up, down):
        assert a + b == pytest.approx(2 * math.log(10) / 2.0, rel=1e-12)


@pytest.mark.parametrize("b2", [100.0, -100.0, 1000.0, -1000.0])
def test_knowledge_threshold_large_b2_is_finite(b2):
    lo = knowledge_threshold(0, 10, 10, 1.0, b2)
    hi = knowledge_threshold(10, 10, 10, 1.0, b2)
    for chi in (lo, hi):
        assert math.isfinite(chi)
        assert 0.0 <= chi <= 2 * math.log(10)
    first, last = (lo, hi) if b2 > 0 else (hi, lo)
    assert first == pytest.approx(0.0, abs=1e-15)
    assert last == pytest.approx(2 * math.log(10), rel=1e-12)


@pytest.mark.parametrize("eta", [0.05, 0.5, 1.0])
@pytest.mark.parametrize("num_classes,dtype", [(2, F64), (10, F64), (10, torch.float32), (100, torch.float32)])
def test_all_knowledge_when_eta_in_unit_interval(eta, num_classes, dtype):
    chi = knowledge_threshold(3, 10, num_classes, eta, 0.0)
    assert chi >= math.log(num_classes)
    p = _probe_predictions(num_classes, dtype)
    mask = confident_mask(p, chi)
    assert mask.dtype == dtype
    torch.testing.assert_close(mask, torch.ones(p.shape[0], dtype=dtype), rtol=0, atol=0)


@pytest.mark.parametrize("eta", [-1.0, -0.1, -1e9, math.inf])
@pytest.mark.parametrize("b2", [0.0, 5.0, -5.0])
def test_zero_knowledge_when_eta_negative_or_infinite(eta, b2):
    chi = knowledge_threshold(4, 10, 10, eta, b2)
    assert chi == -math.inf
    one_hot = torch.eye(10, dtype=F64)
    assert confident_mask(one_hot, chi).sum().item() == 0
    assert confident_mask(_probe_predictions(10), chi).sum().item() == 0
    # why -inf and not the formula's limit 0: a one-hot prediction's reference entropy is below 0
    assert confident_mask(one_hot, 0.0).sum().item() == 10


@pytest.mark.parametrize("eta", [0, 0.0, -0.0, math.nan])
def test_knowledge_threshold_eta_zero_raises(eta):
    with pytest.raises(ValueError, match="eta"):
        knowledge_threshold(1, 10, 10, eta, 0.0)


@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_knowledge_threshold_num_classes_raises(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        knowledge_threshold(1, 10, num_classes, 2.0, 0.0)
    with pytest.raises(ValueError, match="num_classes"):
        uniform_entropy(num_classes)


def test_knowledge_threshold_total_epochs_raises():
    with pytest.raises(ValueError, match="total_epochs"):
        knowledge_threshold(1, 0, 10, 2.0, 0.0)


def test_threshold_for_mode():
    one_hot = torch.eye(5, dtype=F64)
    assert threshold_for_mode("zero", 3, 10, 5, 2.0, 0.0) == -math.inf
    assert confident_mask(one_hot, threshold_for_mode("zero", 3, 10, 5, 2.0, -4.0)).sum().item() == 0
    assert threshold_for_mode("all", 3, 10, 5, 2.0, 4.0) == math.inf
    p = _probe_predictions(5)
    assert confident_mask(p, threshold_for_mode("all", 3, 10, 5, 2.0, 0.0)).sum().item() == p.shape[0]
    assert threshold_for_mode("cmd-s", 3, 10, 5, 2.0, 0.0) == pytest.approx(math.log(5) / 2.0, rel=1e-12)
    expected_p = math.log(5) / 2.0 * 2 * h(0.3 - 0.5, -4.0)
    assert threshold_for_mode("cmd-p", 3, 10, 5, 2.0, -4.0) == pytest.approx(expected_p, rel=1e-12)


def test_threshold_for_mode_errors():
    with pytest.raises(ValueError, match="b2"):
        threshold_for_mode("cmd-s", 3, 10, 5, 2.0, 1.0)
    with pytest.raises(ValueError, match="b2"):
        threshold_for_mode("cmd-p", 3, 10, 5, 2.0, 0.0)
    with pytest.raises(ValueError, match="cmd-x"):
        threshold_for_mode("cmd-x", 3, 10, 5, 2.0, 0.0)


def test_chi_schedule_is_eq12_per_mode_at_every_epoch():
    """The schedule object the trainer asks once per epoch: CMD-P and CMD-S are Eq. (12) at that epoch (CMD-S
    constant, H(u)/eta), zero and all knowledge are -inf and +inf; the bad combinations fail when it is built."""
    from cmd_dist.method.selection import AllKnowledge, ProgressiveChi, StaticChi, ZeroKnowledge, chi_schedule

    total, c, eta = 20, 100, 4.0
    progressive = chi_schedule("cmd-p", total, c, eta, -8.0)
    static = chi_schedule("cmd-s", total, c, eta, 0.0)
    assert isinstance(progressive, ProgressiveChi) and isinstance(static, StaticChi)
    for epoch in range(total):
        expected = math.log(c) / eta * 2 * h(epoch / total - 0.5, -8.0)  # by hand, not the library's formula
        assert progressive(epoch) == pytest.approx(expected, rel=1e-12)
        assert static(epoch) == pytest.approx(math.log(c) / eta, rel=1e-12)
    assert progressive(0) > progressive(total - 1)  # b2 < 0: chi falls, fewer samples trusted later
    assert isinstance(chi_schedule("zero", total, c, eta, 1.0), ZeroKnowledge)
    assert chi_schedule("zero", total, c, eta, 1.0)(3) == -math.inf
    assert isinstance(chi_schedule("all", total, c, eta, 1.0), AllKnowledge)
    assert chi_schedule("all", total, c, eta, 1.0)(3) == math.inf
    for mode, b2 in (("cmd-s", 1.0), ("cmd-p", 0.0)):
        with pytest.raises(ValueError, match="b2"):
            chi_schedule(mode, total, c, eta, b2)


def test_confident_mask_strict_and_detached():
    p = t64([[0.6, 0.3, 0.1], [0.9, 0.05, 0.05], [0.4, 0.3, 0.3]]).requires_grad_()
    chi = ent([0.6, 0.3, 0.1])  # exactly the first row's entropy: H >= chi is not confident (Eq. 8)
    mask = confident_mask(p, chi)
    assert not mask.requires_grad
    torch.testing.assert_close(mask, t64([0.0, 1.0, 0.0]), rtol=0, atol=0)


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
