"""Unit tests of self knowledge distillation (Sec. 3, Table 2, Eq. 5-7): entropy, trusts, refined labels, the
self-KD loss and its gradient, Mconf's model certainty.

Expected values are computed independently of the library: by hand with the ``math`` module, with
explicit loops over plain Python floats, or with the paper's reference code of appendix C.
"""

from __future__ import annotations

import math

import pytest
import torch

from cmd_dist import (
    ModelCertainty,
    entropy,
    mconf_trust,
    proselflc_trust,
    refined_label,
    self_kd_loss,
    uniform_entropy,
)
from tests.unit.method.hand import DELTA, F64, P3, P, Q, ent, h, random_probs, t64, xent

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
