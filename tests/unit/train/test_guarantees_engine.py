"""Guarantees of the training loop that the other tests would not notice breaking (issue 19, point 0).

One small in-process run (3 epochs of Mconf + CMD-P on digits) is recorded step by step: the chi the step
applies and logs in epoch e is Eq. (12)'s chi at t = e (not e + 1), Mconf's r is the mean over the epoch's
training images and is used in the next epoch, ProSelfLC's t/Gamma counts iterations, and every peer's
metrics keep their own peer's name from the engine through metrics.jsonl and the flat metrics to
summary.json. Besides: the extra evaluation set (WebVision val next to ImageNet val) is scored on its own
images, resuming restores the RNG state, zero knowledge exchanges nothing, and ``train.checkpoint_every``
writes every K epochs and after the last.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmd_dist.config import load_config
from cmd_dist.data.types import WHOLE
from cmd_dist.method.selection import threshold_for_mode
from cmd_dist.method.selfkd import uniform_entropy
from cmd_dist.runs.checkpoint import load_peer_state
from cmd_dist.runs.storage import newest_complete_checkpoint
from cmd_dist.train import worker
from cmd_dist.train.local import run_local
from cmd_dist.train.peers import build_peer, load_into_peer, peer_state
from cmd_dist.train.step import TrainStep
from cmd_dist.train.trainer import Trainer, evaluate

EPOCHS = 3
RUN = [
    f"train.epochs={EPOCHS}",
    "train.milestones=[]",
    "train.log_every=0",
    "data.train_subset=384",
    "data.test_subset=128",
    "method.self_kd=mconf",
    "method.knowledge=cmd-p",
    "method.eta=1.0",
    "method.b2=-4.0",
    "peers=[{arch: cnn_small, name: alpha}, {arch: cnn_small_gn, name: beta}]",
]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The run, with what every step read from the step state (chi, Mconf's r) recorded per epoch."""
    run_dir = tmp_path_factory.mktemp("recorded")
    seen: list[tuple[int, float, list[float], float]] = []
    epoch_now = [-1]
    train_one_epoch, call = Trainer.train_one_epoch, TrainStep.__call__

    def epoch_spy(self, epoch, *a, **k):
        epoch_now[0] = epoch
        return train_one_epoch(self, epoch, *a, **k)

    def step_spy(self, *a, **k):
        st = self.state
        seen.append((epoch_now[0], float(st.chi), st.certainty.tolist(), float(st.progress)))
        return call(self, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "train_one_epoch", epoch_spy)
    mp.setattr(TrainStep, "__call__", step_spy)
    try:
        cfg = load_config(None, RUN)
        metrics, reporter = run_local(cfg, run_dir)
    finally:
        mp.undo()
    return cfg, run_dir, metrics, reporter, seen


def test_the_chi_applied_and_logged_in_epoch_e_is_eq12_at_epoch_e(recorded):
    cfg, run_dir, _, reporter, seen = recorded
    m = cfg.method
    schedule = [threshold_for_mode(m.knowledge, e, EPOCHS, 10, m.eta, m.b2) for e in range(EPOCHS)]
    assert len(set(schedule)) == EPOCHS  # a progressive chi: an off-by-one epoch would show
    assert {e for e, *_ in seen} == set(range(EPOCHS))
    for e, chi, *_ in seen:  # the step's mask (Eq. 8-9) compares with this value
        assert chi == pytest.approx(schedule[e], rel=1e-6), (e, chi, schedule)
    for row in _rows(run_dir):
        assert row["chi"] == pytest.approx(schedule[row["epoch"] - 1], rel=1e-12), row["epoch"]
    assert [r["chi"] for r in reporter.reports] == pytest.approx(schedule, rel=1e-12)
    # chi >= H(u) admits every sample's knowledge (H(p) <= H(u)): epochs 1 and 2 exchanged all 384 labels.
    for row in _rows(run_dir):
        if row["chi"] >= uniform_entropy(10):
            assert list(row["distilled_from"].values()) == [384.0], row


def test_mconf_certainty_is_the_mean_over_the_training_images_and_used_the_next_epoch(recorded):
    cfg, run_dir, _, _, seen = recorded
    h_u = uniform_entropy(10)
    rows = _rows(run_dir)
    r = {}
    for row in rows:
        # Eq. (6)'s r over the whole training set: 1 - mean H(p) / H(u), the mean over the epoch's 384 images.
        assert row["certainty_r"] == pytest.approx(1.0 - row["entropy_mean"] / h_u, abs=1e-9), row
        r[(row["epoch"] - 1, row["peer"])] = row["certainty_r"]
    assert all(0 < v < 1 for v in r.values())
    names = [p.name for p in cfg.peers]
    for e, _, certainty, _ in seen:
        want = [0.0 if e == 0 else r[(e - 1, n)] for n in names]  # epoch 0: a uniform predictor's r = 0
        assert certainty == pytest.approx(want, abs=1e-6), (e, certainty, want)


def test_proselflc_progress_counts_iterations_over_the_whole_run(recorded):
    """Eq. (5)'s t/Gamma with ``method.progress_unit: iteration`` (the default): global step / all steps."""
    cfg, *_, seen = recorded
    assert cfg.method.progress_unit == "iteration"
    steps = 3  # 384 training images, batches of 128
    assert len(seen) == EPOCHS * steps
    want = [(e * steps + s) / (EPOCHS * steps) for e in range(EPOCHS) for s in range(steps)]
    assert [progress for *_, progress in seen] == pytest.approx(want, abs=1e-7)


def test_each_peers_metrics_stay_under_its_own_name_in_summary_json(recorded, tmp_path):
    from cmd_dist.launch.summary import summarize

    cfg, run_dir, metrics, _, _ = recorded
    last = {r["peer"]: r for r in _rows(run_dir) if r["epoch"] == EPOCHS}
    # The two peers (different architectures) differ in every number compared below, so a swap would show.
    for key in ("eval_acc", "train_acc_noisy", "certainty_r"):
        assert last["alpha"][key] != last["beta"][key], key
    # Each peer's accuracy is that peer's network's: recomputed from the checkpoint's weights.
    folder = newest_complete_checkpoint(run_dir, 2)
    data = worker.prepare_data(cfg.data, cfg.noise, torch.device("cpu"))
    for k, p in enumerate(cfg.peers):
        peer = build_peer(cfg, k, 10, data.spec.channels, torch.device("cpu"), data.spec.size)
        peer.model.load_state_dict(load_peer_state(folder, k)["model"])
        acc = evaluate(peer, data, cfg.train.eval_batch_size)
        assert acc == pytest.approx(last[p.name]["eval_acc"], abs=1e-9), p.name
        assert last[p.name]["arch"] == p.arch
    summary = summarize(cfg, metrics, tmp_path, 1.0)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert [p["name"] for p in summary["peers"]] == ["alpha", "beta"]
    for entry in summary["peers"]:
        row = last[entry["name"]]
        assert entry["arch"] == row["arch"]
        assert entry["test_acc"] == row["eval_acc"] == metrics[f"{entry['name']}/test_acc"]
        assert entry["best_test_acc"] == row["best_eval_acc"]
        assert entry["best_epoch"] == row["best_epoch"]
        assert entry["train_acc_noisy"] == row["train_acc_noisy"]
        assert entry["train_acc_clean"] == row["train_acc_clean"]
    assert summary["mean_test_acc"] == pytest.approx((last["alpha"]["eval_acc"] + last["beta"]["eval_acc"]) / 2)


# ----------------------------------------------------------------------------- the extra evaluation set


class _WithExtraSet:
    """Digits with a second evaluation set, as a streamed dataset has one (WebVision val beside ImageNet val).

    The extra set holds the test images with labels no prediction can match, so its accuracy is exactly 0
    while the test set's is not: scoring the extra set on the eval split would show.
    """

    def __init__(self, data) -> None:
        self._data = data
        self.eval_sets = [data.eval_split, "other_val"]

    def __getattr__(self, name):
        return getattr(self._data, name)

    def eval_batches(self, batch_size: int, split: str | None = None, shard=WHOLE):
        for x, y in self._data.eval_batches(batch_size, shard=shard):
            yield x, (y if split in (None, self._data.eval_split) else torch.full_like(y, -1))


def test_the_extra_eval_set_is_scored_on_its_own_images(tmp_path, monkeypatch):
    prepare = worker.prepare_data
    monkeypatch.setattr(worker, "prepare_data", lambda *a, **k: _WithExtraSet(prepare(*a, **k)))
    cfg = load_config(None, [*RUN, "train.epochs=1", "method.self_kd=ce", "method.knowledge=all"])
    metrics, _ = run_local(cfg, tmp_path)
    assert metrics["extra_eval_sets"] == "other_val"
    assert metrics["test_acc"] > 0
    assert metrics["other_val_acc"] == 0.0
    for name in ("alpha", "beta"):
        assert metrics[f"{name}/test_acc"] > 0 and metrics[f"{name}/other_val_acc"] == 0.0


# ----------------------------------------------------------------------------- resume


def test_a_resumed_peer_gets_the_rng_state_it_was_saved_with():
    cfg = load_config(None, RUN)
    peer = build_peer(cfg, 0, 10, 1, torch.device("cpu"), 8)
    torch.manual_seed(1234)
    state = peer_state(peer, 1)
    expected = torch.rand(8)  # what training would draw next, right after the save
    torch.manual_seed(99)  # a fresh process: another RNG state
    assert load_into_peer(peer, state) == 1
    assert torch.equal(torch.rand(8), expected)


# ----------------------------------------------------------------------------- zero knowledge, checkpoint_every


def test_zero_knowledge_exchanges_nothing_at_all(tmp_path, monkeypatch):
    """Sec. 4.2: with chi = -inf the step skips the exchange entirely (not an exchange with empty masks)."""
    from cmd_dist.train.exchange import Exchange

    calls = []
    gather = Exchange.all_gather
    monkeypatch.setattr(Exchange, "all_gather", lambda self, *a, **k: calls.append(1) or gather(self, *a, **k))
    cfg = load_config(None, [*RUN, "train.epochs=1", "method.knowledge=zero"])
    metrics, _ = run_local(cfg, tmp_path / "zero")
    assert calls == [] and metrics["alpha/distilled_from"] == metrics["beta/distilled_from"] == 0
    run_local(load_config(None, [*RUN, "train.epochs=1", "method.knowledge=all"]), tmp_path / "all")
    assert len(calls) == 3  # the same run with knowledge exchanges at every step: the spy sees it


def test_checkpoint_every_k_epochs_and_after_the_last(tmp_path):
    cfg = load_config(None, [*RUN, "train.epochs=3", "train.checkpoint_every=2", "ray.keep_checkpoints=10"])
    _, reporter = run_local(cfg, tmp_path)
    assert [r["epoch"] for r in reporter.reports] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == [f"checkpoint_{e:06d}" for e in (2, 3)]
