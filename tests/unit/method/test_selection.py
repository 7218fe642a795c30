"""Unit tests of confident knowledge selection: the threshold chi of Eq. 12, static and progressive, and the
mask of Eq. 8-9.

Expected values are computed independently of the library: by hand with the ``math`` module, with
explicit loops over plain Python floats, or with the paper's reference code of appendix C.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cmd_dist import (
    confident_mask,
    knowledge_threshold,
    threshold_for_mode,
    uniform_entropy,
)
from tests.unit.method.hand import F64, ent, h, random_probs, t64

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
