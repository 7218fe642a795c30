"""Unit tests of synthetic label noise (paper Sec. 5.1) and the search/final split (appendix A.2)."""

from __future__ import annotations

import math

import pytest
import torch

from cmd_dist import NOISE_KINDS, corrupt_labels, split_train_val


def _labels(n: int, num_classes: int, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def test_noise_kinds():
    assert set(NOISE_KINDS) == {"symmetric", "pairflip"}


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
def test_output_types_and_shapes(kind):
    labels = _labels(100, 7)
    noisy, is_noisy = corrupt_labels(labels, 7, kind, 0.3, seed=0)
    assert noisy.shape == labels.shape and noisy.dtype == torch.int64 and noisy.device == labels.device
    assert is_noisy.shape == labels.shape and is_noisy.dtype == torch.bool
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 7
    assert labels.tolist() == _labels(100, 7).tolist()  # input not modified in place


def test_symmetric_changes_exactly_the_noisy_entries():
    labels = _labels(5000, 10)
    noisy, is_noisy = corrupt_labels(labels, 10, "symmetric", 0.5, seed=1)
    assert bool(is_noisy.any()) and bool((~is_noisy).any())
    assert bool((noisy[is_noisy] != labels[is_noisy]).all())  # never keeps the class when flipped
    assert bool((noisy[~is_noisy] == labels[~is_noisy]).all())


def test_symmetric_two_classes_flips_to_the_other_class():
    labels = _labels(1000, 2)
    noisy, is_noisy = corrupt_labels(labels, 2, "symmetric", 0.4, seed=2)
    assert bool((noisy[is_noisy] == 1 - labels[is_noisy]).all())


def test_pairflip_moves_to_adjacent_class():
    c = 6
    labels = _labels(5000, c)
    noisy, is_noisy = corrupt_labels(labels, c, "pairflip", 0.4, seed=3)
    assert bool(is_noisy.any())
    assert bool((noisy[is_noisy] == (labels[is_noisy] + 1) % c).all())
    assert bool((noisy[~is_noisy] == labels[~is_noisy]).all())
    # the wrap-around C-1 -> 0 happens
    assert bool(((labels == c - 1) & is_noisy & (noisy == 0)).any())


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
@pytest.mark.parametrize("rate", [0.2, 0.4, 0.6, 0.8])
def test_realised_noise_rate_within_binomial_tolerance(kind, rate):
    n = 20000
    labels = _labels(n, 10)
    noisy, is_noisy = corrupt_labels(labels, 10, kind, rate, seed=4)
    tol = 4 * math.sqrt(rate * (1 - rate) / n)
    rate_hat = (noisy != labels).double().mean().item()
    assert abs(rate_hat - rate) < tol
    assert is_noisy.double().mean().item() == pytest.approx(rate_hat, abs=0)


def test_symmetric_destination_uniform_over_other_classes():
    c, n, rate = 4, 40000, 0.6
    labels = _labels(n, c, seed=5)
    noisy, is_noisy = corrupt_labels(labels, c, "symmetric", rate, seed=6)
    chi2, dof = 0.0, 0
    for y in range(c):
        dest = noisy[is_noisy & (labels == y)]
        counts = torch.bincount(dest, minlength=c).double()
        assert counts[y].item() == 0
        expected = dest.numel() / (c - 1)
        others = [counts[k].item() for k in range(c) if k != y]
        chi2 += sum((o - expected) ** 2 / expected for o in others)
        dof += c - 2
    # dof = 8; P(chi2 > 40) < 1e-5. A constant shift (e.g. pair flip) gives chi2 in the tens of thousands.
    assert chi2 < 40.0, (chi2, dof)


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
def test_deterministic_for_a_seed_and_independent_of_global_rng(kind):
    labels = _labels(3000, 10)
    torch.manual_seed(1)
    a_noisy, a_flip = corrupt_labels(labels, 10, kind, 0.4, seed=42)
    torch.manual_seed(2)
    torch.rand(17)
    b_noisy, b_flip = corrupt_labels(labels, 10, kind, 0.4, seed=42)
    assert torch.equal(a_noisy, b_noisy) and torch.equal(a_flip, b_flip)


def test_does_not_consume_global_rng():
    labels = _labels(1000, 10)
    torch.manual_seed(0)
    expected = torch.rand(5)
    torch.manual_seed(0)
    corrupt_labels(labels, 10, "symmetric", 0.4, seed=9)
    split_train_val(1000, 0.1, seed=9)
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
def test_different_seeds_differ(kind):
    labels = _labels(3000, 10)
    a_noisy, a_flip = corrupt_labels(labels, 10, kind, 0.4, seed=0)
    b_noisy, b_flip = corrupt_labels(labels, 10, kind, 0.4, seed=1)
    assert not torch.equal(a_flip, b_flip)
    assert not torch.equal(a_noisy, b_noisy)


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
def test_rate_zero_leaves_labels_unchanged(kind):
    labels = _labels(2000, 10)
    noisy, is_noisy = corrupt_labels(labels, 10, kind, 0.0, seed=3)
    assert torch.equal(noisy, labels)
    assert not bool(is_noisy.any())


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, math.nan])
def test_rate_outside_unit_interval_raises(rate):
    with pytest.raises(ValueError, match="rate"):
        corrupt_labels(_labels(10, 5), 5, "symmetric", rate, seed=0)


def test_unknown_kind_raises_naming_it():
    with pytest.raises(ValueError, match="asymmetric"):
        corrupt_labels(_labels(10, 5), 5, "asymmetric", 0.2, seed=0)


def test_num_classes_below_two_raises():
    with pytest.raises(ValueError, match="num_classes"):
        corrupt_labels(torch.zeros(10, dtype=torch.int64), 1, "symmetric", 0.2, seed=0)


def test_labels_out_of_range_or_wrong_dtype_raise():
    with pytest.raises(ValueError, match="labels"):
        corrupt_labels(torch.tensor([0, 1, 5]), 5, "symmetric", 0.2, seed=0)
    with pytest.raises(ValueError, match="labels"):
        corrupt_labels(torch.tensor([0, -1, 2]), 5, "symmetric", 0.2, seed=0)
    with pytest.raises(ValueError, match="labels"):
        corrupt_labels(torch.tensor([0.0, 1.0]), 5, "symmetric", 0.2, seed=0)


# --------------------------------------------------------------------------------------------------
# split_train_val (appendix A.2: 90% train / 10% clean validation)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1000, 50000, 37])
def test_split_disjoint_covering_and_sized(n):
    train, val = split_train_val(n, 0.1, seed=0)
    assert val.numel() == round(0.1 * n)
    assert train.numel() + val.numel() == n
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(n))


def test_split_deterministic_per_seed_and_seeds_differ():
    torch.manual_seed(3)
    a_train, a_val = split_train_val(1000, 0.1, seed=5)
    torch.manual_seed(4)
    b_train, b_val = split_train_val(1000, 0.1, seed=5)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    _, c_val = split_train_val(1000, 0.1, seed=6)
    assert not torch.equal(a_val, c_val)


def test_split_is_random_not_a_prefix():
    _, val = split_train_val(1000, 0.1, seed=0)
    assert val.tolist() != list(range(100))
    assert val.tolist() != list(range(900, 1000))


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_split_bad_fraction_raises(frac):
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(100, frac, seed=0)
