"""The per-sample record of training (issue 21): AUM margins, confident disagreements, last predictions."""

from __future__ import annotations

import math

import pytest
import torch

from cmd_dist.method.dynamics import (
    RECORD_KEYS,
    SampleDynamics,
    confident_disagreement,
    epoch_weight,
    label_margin,
)
from cmd_dist.method.selfkd import entropy


def test_label_margin_is_the_given_logit_minus_the_largest_other():
    z = torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [0.0, 5.0, 5.0]])
    y = torch.tensor([0, 1, 2])
    assert label_margin(z, y).tolist() == [1.0, -2.0, 0.0]


def test_confident_disagreement_needs_both_confidence_and_another_argmax():
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])
    h = entropy(p)
    y = torch.tensor([1, 0, 1])
    chi = float(h[0]) + 1e-3  # rows 0 and 1 confident, row 2 not
    assert confident_disagreement(p, h, y, chi).tolist() == [1.0, 0.0, 0.0]


def _reference(epochs: list[list[tuple[list[int], torch.Tensor, list[int]]]], chi: float, n: int) -> dict:
    """The record computed one sample at a time on the host, in float64 (epoch e weighted 2^(e / (E/5)))."""
    margin = [0.0] * n
    seen = [0] * n
    disagree = [0] * n
    last = [-1] * n
    weighted, weights = [0.0] * n, [0.0] * n
    for e, batches in enumerate(epochs):
        w = 2.0 ** (e / (len(epochs) / 5))
        for ids, logits, labels in batches:
            for i, z, y in zip(ids, logits.double().tolist(), labels):
                others = max(v for c, v in enumerate(z) if c != y)
                margin[i] += z[y] - others
                seen[i] += 1
                weighted[i] += w * (z[y] - others)
                weights[i] += w
                ez = [math.exp(v - max(z)) for v in z]
                p = [v / sum(ez) for v in ez]
                h = -sum(q * math.log(q + 1e-6) for q in p)
                pred = max(range(len(p)), key=lambda c: p[c])
                disagree[i] += int(h < chi and pred != y)
                last[i] = pred
    return {
        "margin": margin,
        "seen": seen,
        "disagree": disagree,
        "last": last,
        "weighted": weighted,
        "weights": weights,
    }


def _epochs(n: int, c: int, batch: int, count: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    out = []
    for _ in range(count):
        order = torch.randperm(n, generator=g)
        batches = []
        for s in range(0, n - 3, batch):  # the last 3 samples are never seen
            ids = order[s : s + batch]
            ids = ids[ids < n - 3]
            batches.append((ids.tolist(), torch.randn(len(ids), c, generator=g) * 3, labels[ids].tolist()))
        out.append(batches)
    return out


def _record(dyn: SampleDynamics, batches, chi: float) -> None:
    for ids, z, labels in batches:
        p = torch.softmax(z, 1)
        dyn.record(torch.tensor(ids), z, p, entropy(p), torch.tensor(labels), torch.tensor(chi))


def test_accumulators_equal_a_slow_per_sample_host_reference():
    n, c, chi = 37, 5, 1.0
    epochs = _epochs(n, c, 8, 3)
    dyn = SampleDynamics(n)
    for e, batches in enumerate(epochs):
        dyn.begin_epoch()
        _record(dyn, batches, chi)
        dyn.end_epoch(epoch_weight(e, len(epochs)))
    ref = _reference(epochs, chi, n)
    assert dyn.seen.tolist() == ref["seen"]
    assert 0 < sum(ref["disagree"]) < sum(ref["seen"])  # the threshold splits the predictions
    assert dyn.disagree.tolist() == ref["disagree"]
    assert dyn.last_pred.tolist() == ref["last"]
    assert torch.allclose(dyn.margin_sum.double(), torch.tensor(ref["margin"], dtype=torch.float64), atol=1e-4)
    assert torch.allclose(dyn.weight_sum.double(), torch.tensor(ref["weights"], dtype=torch.float64), atol=1e-4)
    late = [a / b if b else math.nan for a, b in zip(ref["weighted"], ref["weights"])]
    assert torch.allclose(dyn.late_aum().double(), torch.tensor(late, dtype=torch.float64), atol=1e-4, equal_nan=True)
    assert not torch.allclose(dyn.late_aum()[:-3], dyn.aum()[:-3], atol=1e-3)  # the weighting changes the mean
    aum = dyn.aum()
    assert torch.isnan(aum[-3:]).all() and torch.isfinite(aum[:-3]).all()


def test_epoch_weight_doubles_every_fifth_of_the_planned_epochs():
    assert epoch_weight(0, 8) == 1.0
    assert epoch_weight(8, 40) == pytest.approx(2.0)
    assert epoch_weight(199, 200) == pytest.approx(2 ** (199 / 40))
    assert epoch_weight(16, 20) == pytest.approx(epoch_weight(160, 200))  # the same fraction, the same weight


def test_replicas_slices_summed_equal_one_worker():
    """Two replicas each record their half of every batch; the summed epoch buffers give one worker's record."""
    n, c, chi = 30, 4, 1.2
    epochs = _epochs(n, c, 10, 2, seed=3)
    whole, parts = SampleDynamics(n), [SampleDynamics(n), SampleDynamics(n)]
    for e, batches in enumerate(epochs):
        _record(whole, batches, chi)
        for ids, z, labels in batches:
            half = (len(ids) + 1) // 2
            _record(parts[0], [(ids[:half], z[:half], labels[:half])], chi)
            _record(parts[1], [(ids[half:], z[half:], labels[half:])], chi)
        total = parts[0].epoch + parts[1].epoch  # what Exchange.sum_over_replicas computes
        for d in parts:
            d.epoch.copy_(total)
            d.end_epoch(epoch_weight(e, 2))
        whole.end_epoch(epoch_weight(e, 2))
    for d in parts:
        for key in RECORD_KEYS:
            assert torch.allclose(getattr(d, key).float(), getattr(whole, key).float(), atol=1e-5), key


def test_state_round_trip_and_a_record_of_another_size_is_refused():
    dyn = SampleDynamics(10)
    _record(dyn, _epochs(10, 3, 4, 1)[0], 0.5)
    dyn.end_epoch(3.0)
    back = SampleDynamics.from_state(dyn.state_dict())
    for key in RECORD_KEYS:
        assert torch.equal(getattr(back, key), getattr(dyn, key))
    with pytest.raises(ValueError, match="holds 10 training samples"):
        SampleDynamics(11).load_state_dict(dyn.state_dict())


def test_a_record_saved_before_the_late_weighted_aum_loads_with_the_plain_sums():
    """Checkpoints of the first record (no weighted sums) still load: earlier epochs count with weight 1."""
    dyn = SampleDynamics(10)
    _record(dyn, _epochs(10, 3, 4, 1)[0], 0.5)
    dyn.end_epoch(4.0)
    old = {k: v for k, v in dyn.state_dict().items() if k not in ("weighted_margin_sum", "weight_sum")}
    back = SampleDynamics.from_state(old)
    assert torch.equal(back.weighted_margin_sum, dyn.margin_sum) and torch.equal(back.weight_sum, dyn.seen)
    assert torch.allclose(back.late_aum(), dyn.aum(), equal_nan=True)
