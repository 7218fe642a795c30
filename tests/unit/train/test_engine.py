"""The training loop in one process (no Ray): objectives, self-KD methods, N peers, fast path, augmentation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cmd_dist.config import load_config
from cmd_dist.data.augment import augment
from cmd_dist.train.local import run_local

SMALL = [
    "train.epochs=2",
    "train.milestones=[]",
    "train.log_every=0",
    "data.train_subset=384",
    "data.test_subset=128",
    "method.eta=1.0",
    "method.b2=-1.0",
]


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["syncmkd", "asyncmkd", "kdcl", "tfkd_reg"])
def test_baseline_objectives_train(tmp_path, objective):
    cfg = load_config(
        None, SMALL + [f"method.objective={objective}", "data.train_subset=0", "train.epochs=3", "train.lr=0.05"]
    )
    metrics, _ = run_local(cfg, tmp_path)
    for peer in ("peer0", "peer1"):
        assert math.isfinite(metrics[f"{peer}/train_loss"]) and metrics[f"{peer}/train_loss"] > 0
        assert metrics[f"{peer}/test_acc"] > 25.0  # learning, not chance (10 classes)
    assert math.isnan(metrics["chi"])  # baselines do not select knowledge


def test_asyncmkd_steps_one_peer_per_iteration(tmp_path):
    """Eq. (2): with one step per epoch, only the active peer's weights may change in that step."""
    cfg = load_config(
        None,
        [
            "train.epochs=1",
            "train.milestones=[]",
            "train.log_every=0",
            "data.train_subset=64",
            "train.batch_size=64",
            "method.objective=asyncmkd",
            "train.weight_decay=0",
        ],
    )
    from cmd_dist.train.peers import build_peer

    init = [build_peer(cfg, k, 10, 1, torch.device("cpu")).model.state_dict() for k in range(2)]
    run_local(cfg, tmp_path)
    from cmd_dist.runs.checkpoint import load_peer_state

    after = [load_peer_state(tmp_path / "checkpoint_000001", k)["model"] for k in range(2)]
    changed = [any(not torch.equal(init[k][n], after[k][n]) for n in init[k] if "weight" in n) for k in range(2)]
    assert changed == [True, False]  # t = 1 is odd: peer A (index 0) trains, B waits


@pytest.mark.parametrize("self_kd", ["ce", "ls", "cp", "bootsoft", "proselflc"])
def test_self_kd_methods_train(tmp_path, self_kd):
    extra = ["method.progress_unit=iteration"] if self_kd == "proselflc" else []
    metrics, _ = run_local(load_config(None, SMALL + [f"method.self_kd={self_kd}"] + extra), tmp_path)
    assert all(math.isfinite(metrics[f"peer{k}/train_loss"]) for k in range(2))
    rows = _rows(tmp_path)
    if self_kd == "ce":
        assert all(r["epsilon_mean"] == 0 for r in rows)
    elif self_kd in ("ls", "cp"):
        assert all(r["epsilon_mean"] == pytest.approx(0.1) for r in rows)


def test_mconf_certainty_is_updated_each_epoch(tmp_path):
    run_local(load_config(None, SMALL + ["train.epochs=3"]), tmp_path)
    r = [row["certainty_r"] for row in _rows(tmp_path) if row["peer"] == "peer0"]
    assert len(r) == 3 and all(0 < x < 1 for x in r)
    assert r[0] != r[1] != r[2]


def test_logged_chi_is_eq12_of_that_epoch_and_r_is_the_epochs_mean_entropy(tmp_path):
    """Epoch e trains with chi(e) of Eq. (12) (not e+1's), and Mconf's r after epoch e is 1 - mean H(p) / H(u)
    over that epoch's training samples (Eq. 6), both as logged in metrics.jsonl."""
    from cmd_dist.method.selection import knowledge_threshold

    eta, b2, epochs = 1.0, -1.0, 3
    run_local(load_config(None, SMALL + [f"train.epochs={epochs}"]), tmp_path)
    rows = _rows(tmp_path)
    assert sorted({r["epoch"] for r in rows}) == [1, 2, 3]
    for r in rows:
        assert r["chi"] == pytest.approx(knowledge_threshold(r["epoch"] - 1, epochs, 10, eta, b2), rel=1e-12)
        assert r["certainty_r"] == pytest.approx(1.0 - r["entropy_mean"] / math.log(10), rel=1e-9)


def test_three_peers_exchange_with_each_other(tmp_path):
    cfg = load_config(None, SMALL + ["peers=[{arch: cnn_small}, {arch: cnn_small}, {arch: cnn_small}]"])
    metrics, _ = run_local(cfg, tmp_path)
    rows = [r for r in _rows(tmp_path) if r["epoch"] == 1]
    assert len(rows) == 3
    for r in rows:
        others = {f"peer{k}" for k in range(3)} - {r["peer"]}
        assert set(r["distilled_from"]) == others and all(v > 0 for v in r["distilled_from"].values())
    assert all(f"peer{k}/test_acc" in metrics for k in range(3))


def test_different_architectures_as_peers(tmp_path):
    cfg = load_config(
        None,
        SMALL
        + [
            "train.epochs=1",
            "peers=[{arch: cnn_small}, {arch: shufflenetv2}]",
            "train.batch_size=64",
            "data.train_subset=128",
        ],
    )
    metrics, _ = run_local(cfg, tmp_path)
    assert {r["arch"] for r in _rows(tmp_path)} == {"cnn_small", "shufflenetv2"}
    assert math.isfinite(metrics["peer1/train_loss"])


def test_fast_path_bf16_channels_last_matches_plain_path(tmp_path):
    plain, _ = run_local(load_config(None, SMALL + ["train.fast_path=false"]), tmp_path / "plain")
    fast, _ = run_local(
        load_config(None, SMALL + ["train.fast_path=true", "train.compile_mode=none"]), tmp_path / "fast"
    )
    for k in range(2):
        assert fast[f"peer{k}/train_loss"] == pytest.approx(plain[f"peer{k}/train_loss"], rel=0.05)
        assert fast[f"peer{k}/train_loss"] != plain[f"peer{k}/train_loss"]  # bf16 really ran


def test_fast_path_with_torch_compile(tmp_path):
    """torch.compile of each peer (inductor on CPU; reduce-overhead CUDA graphs on GPU) trains the same."""
    eager, _ = run_local(load_config(None, SMALL + ["train.fast_path=true", "train.compile_mode=none"]), tmp_path / "e")
    comp, _ = run_local(
        load_config(None, SMALL + ["train.fast_path=true", "train.compile_mode=default"]), tmp_path / "c"
    )
    for k in range(2):
        assert comp[f"peer{k}/train_loss"] == pytest.approx(eager[f"peer{k}/train_loss"], rel=0.05)


def test_augment_crops_and_flips_per_sample():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = augment(x, 1, True, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    again = augment(x, 1, True, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # Every output is a (possibly flipped) 4x4 window of the zero-padded image.
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for b in range(2):
        windows = [padded[b, :, i : i + 4, j : j + 4] for i in range(3) for j in range(3)]
        windows += [w.flip(2) for w in windows]
        assert any(torch.equal(out[b], w) for w in windows)
    outs = {tuple(augment(x, 1, True, torch.Generator().manual_seed(s))[0].flatten().tolist()) for s in range(30)}
    assert len(outs) > 5  # random offsets and flips, not a constant


def test_selection_explains_itself_entropy_quantiles_histogram_and_trusts(tmp_path):
    """Issue 9.4: per epoch and peer, entropy quantiles next to chi, mean eps and Mconf's r, and a
    TensorBoard histogram of the epoch's entropies; read back from metrics.jsonl and the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cmd_dist.method.selfkd import uniform_entropy

    run_local(load_config(None, SMALL + ["train.epochs=2"]), tmp_path)
    rows = _rows(tmp_path)
    assert len(rows) == 4  # 2 epochs x 2 peers
    for r in rows:
        qs = [r[f"entropy_q{q}"] for q in (10, 25, 50, 75, 90)]
        assert qs == sorted(qs) and 0.0 <= qs[0] and qs[-1] <= uniform_entropy(10) + 1e-4
        assert math.isfinite(r["chi"]) and r["epsilon_mean"] >= 0 and math.isfinite(r["certainty_r"])
    for peer in ("peer0", "peer1"):
        acc = EventAccumulator(str(tmp_path / "tb" / peer), size_guidance={"histograms": 0, "scalars": 0})
        acc.Reload()
        assert "knowledge/entropy" in acc.Tags()["histograms"]
        hist = acc.Histograms("knowledge/entropy")
        assert [h.step for h in hist] == [1, 2]
        assert sum(hist[-1].histogram_value.bucket) == 384  # every training sample of the epoch
        for tag in ("knowledge/entropy_q50", "knowledge/chi", "self_kd/epsilon_mean", "self_kd/certainty_r"):
            assert tag in acc.Tags()["scalars"], tag
