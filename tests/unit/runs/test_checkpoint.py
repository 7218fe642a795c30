"""Checkpoints without Ray: atomic files, verification, fallback, hostile files, non-finite stop."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from cmd_dist.config import load_config
from cmd_dist.runs.checkpoint import CheckpointError, load_peer_state, save_peer_state
from cmd_dist.train.local import run_local

FAST = [
    "train.epochs=3",
    "train.milestones=[2]",
    "method.eta=1.0",
    "method.b2=-1.0",
    "train.log_every=0",
    "data.train_subset=512",
]


def _cfg(extra=()):
    return load_config(None, FAST + list(extra))


def _ckpts(run_dir):
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def test_save_is_atomic_and_verified(tmp_path):
    state = {"w": torch.arange(4.0), "epoch": 3}
    path = save_peer_state(tmp_path, 0, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peer0.pt", "peer0.sha256"]  # no temp files left
    assert torch.equal(load_peer_state(tmp_path, 0)["w"], state["w"])
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_peer_state(tmp_path, 0)
    (tmp_path / "peer0.sha256").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_peer_state(tmp_path, 0)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_hostile_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    data = pickle.dumps({"model": _Evil()})
    import hashlib

    (tmp_path / "peer0.pt").write_bytes(data)
    (tmp_path / "peer0.sha256").write_text(hashlib.sha256(data).hexdigest())  # even with a valid checksum
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_peer_state(tmp_path, 0)
    assert not marker.exists()


def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    cfg = _cfg()
    final, _ = run_local(cfg, tmp_path / "run")
    run_dir = tmp_path / "run"
    ckpts = _ckpts(run_dir)
    assert [c.name for c in ckpts] == ["checkpoint_000002", "checkpoint_000003"]
    want = {k: load_peer_state(ckpts[-1], k)["model"] for k in range(2)}
    rows_before = _rows_without_timing(run_dir)
    # Corrupt the latest checkpoint, then "restart": the previous one is used and epoch 3 is redone.
    latest = ckpts[-1] / "peer1.pt"
    latest.write_bytes(latest.read_bytes()[: len(latest.read_bytes()) // 2])
    again, _ = run_local(_cfg(), run_dir)
    err = capsys.readouterr().out
    assert "skipping checkpoint" in err and "checkpoint_000003" in err and "truncated or corrupted" in err
    for k in range(2):
        got = load_peer_state(_ckpts(run_dir)[-1], k)["model"]
        for name in want[k]:
            torch.testing.assert_close(got[name], want[k][name], atol=1e-6, rtol=0)
    assert again["test_acc"] == pytest.approx(final["test_acc"], abs=1e-9)
    assert _rows_without_timing(run_dir) == rows_before  # epoch 3 rewritten, not duplicated


def _rows_without_timing(run_dir):
    """metrics.jsonl rows without the wall-clock fields (log time, train/eval seconds, images/s)."""
    timing = {"time", "train_s", "eval_s", "images_per_s"}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_completed_run_restarted_trains_nothing(tmp_path):
    cfg = _cfg()
    first, _ = run_local(cfg, tmp_path / "run")
    again, rep = run_local(_cfg(), tmp_path / "run")
    assert again == first
    assert len(rep.reports) == 1  # the stored final metrics are reported once, no epoch re-run


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # Epoch 2's lr is 1e9: the loss overflows; epoch 1's checkpoint must survive untouched.
    cfg = _cfg(["train.milestones=[1]", "train.gamma=1e10", "train.epochs=3"])
    metrics, rep = run_local(cfg, tmp_path / "run")
    assert "non-finite loss in peer" in metrics["nonfinite"]
    assert "at epoch 2" in metrics["nonfinite"] and "step" in metrics["nonfinite"]
    names = [c.name for c in _ckpts(tmp_path / "run")]
    assert names == ["checkpoint_000001"]
    load_peer_state(tmp_path / "run" / "checkpoint_000001", 0)  # verifies
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["epoch"] for r in rows} == {1}


def test_best_checkpoint_is_kept_beside_the_latest(tmp_path):
    cfg = _cfg(["train.epochs=4", "data.protocol=search"])
    run_local(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mean = {e: sum(r["eval_acc"] for r in rows if r["epoch"] == e) / 2 for e in range(1, 5)}
    best_epoch = max(mean, key=lambda e: (mean[e], -e))  # the first epoch reaching the best mean
    best = tmp_path / "run" / "best_checkpoint"
    assert int((best / "epoch.txt").read_text()) == best_epoch
    assert json.loads((best / "metrics.json").read_text())["val_acc"] == pytest.approx(mean[best_epoch])
    for k in range(2):
        assert load_peer_state(best, k)["epoch"] == best_epoch
    assert [c.name for c in _ckpts(tmp_path / "run")] == ["checkpoint_000003", "checkpoint_000004"]
