"""The per-sample record in the real training loop (issue 21 point 1): what the step adds equals a host reference
computed from the batches and logits it saw; resuming gives the record of an uninterrupted run; a checkpoint
written before the record existed still loads and resumes."""

from __future__ import annotations

import math

import torch

from cmd_dist.config import load_config
from cmd_dist.data.prepare import prepare_data
from cmd_dist.method.dynamics import RECORD_KEYS
from cmd_dist.runs.checkpoint import load_peer_state, save_peer_state
from cmd_dist.runs.storage import newest_complete_checkpoint
from cmd_dist.train.exchange import Exchange
from cmd_dist.train.local import run_local
from cmd_dist.train.peers import build_peer
from cmd_dist.train.trainer import Trainer

RUN = [
    "train.epochs=3",
    "train.milestones=[]",
    "train.log_every=0",
    "train.batch_size=64",
    "data.train_subset=200",
    "data.test_subset=64",
    "method.self_kd=mconf",
    "method.knowledge=cmd-s",
    "method.eta=1.05",  # chi = H(u)/1.05 = 2.19: some predictions confident, some not, after an epoch or two
    "method.b2=0",
    "peers=[{arch: cnn_small, name: alpha}, {arch: cnn_small_gn, name: beta}]",
]


def _host_reference(log: list, n: int, peers: int) -> list[dict]:
    """One sample at a time, in float64, from the (epoch, chi, ids, labels, logits per peer) the step saw; epoch e of
    the 3 planned weighted 2^(e / (3/5)) in the late-weighted sums."""
    out = [
        {"margin": [0.0] * n, "seen": [0] * n, "disagree": [0] * n, "last": [-1] * n, "weighted": [0.0] * n}
        for _ in range(peers)
    ]
    for epoch, chi, ids, labels, logits in log:
        for k in range(peers):
            rec = out[k]
            for i, y, z in zip(ids, labels, logits[k].double().tolist()):
                rec["margin"][i] += z[y] - max(v for c, v in enumerate(z) if c != y)
                rec["weighted"][i] += 2.0 ** (epoch / 0.6) * (z[y] - max(v for c, v in enumerate(z) if c != y))
                rec["seen"][i] += 1
                m = max(z)
                e = [math.exp(v - m) for v in z]
                p = [v / sum(e) for v in e]
                h = -sum(q * math.log(q + 1e-6) for q in p)
                pred = max(range(len(p)), key=lambda c: p[c])
                rec["disagree"][i] += int(h < chi and pred != y)
                rec["last"][i] = pred
    return out


def test_the_steps_record_equals_a_per_sample_host_reference():
    cfg = load_config(None, RUN)
    cpu = torch.device("cpu")
    data = prepare_data(cfg.data, cfg.noise)
    ex = Exchange(2)
    peers = [build_peer(cfg, k, 10, 1, cpu, 8) for k in ex.local_peers]
    trainer = Trainer(cfg, peers, ex, data, cpu)
    log, batches = [], []
    forward, epoch_batches = trainer.step.forward, data.epoch_batches

    def spy_forward(xs):
        out = forward(xs)
        b = batches[-1]
        log.append((epoch_now[0], chi_now[0], b.ids.tolist(), b.y.tolist(), [o.detach().clone() for o in out]))
        return out

    def spy_batches(*a, **kw):
        for b in epoch_batches(*a, **kw):
            batches.append(b)
            yield b

    trainer.step.forward = spy_forward
    data.epoch_batches = spy_batches
    chi_now, epoch_now = [0.0], [0]
    for epoch in range(3):
        chi_now[0], epoch_now[0] = trainer.chi(epoch), epoch
        trainer.train_one_epoch(epoch)
    ref = _host_reference(log, data.num_train, 2)
    assert any(0 < sum(r["disagree"]) < sum(r["seen"]) for r in ref)  # the threshold splits the predictions
    assert sum(data.train_labels.tolist()[i] != data.train_clean.tolist()[i] for i in range(200)) > 0
    for p, r in zip(peers, ref):
        d = p.dynamics
        assert d.seen.tolist() == r["seen"] == [3] * data.num_train
        assert d.disagree.tolist() == r["disagree"]
        assert d.last_pred.tolist() == r["last"]
        assert torch.allclose(d.margin_sum.double(), torch.tensor(r["margin"], dtype=torch.float64), atol=1e-3)
        weighted = torch.tensor(r["weighted"], dtype=torch.float64)
        assert torch.allclose(d.weighted_margin_sum.double(), weighted, atol=1e-2, rtol=1e-5)
        assert torch.allclose(
            d.weight_sum.double(),
            torch.full((data.num_train,), 1.0 + 2 ** (1 / 0.6) + 2 ** (2 / 0.6), dtype=torch.float64),
            rtol=1e-6,
        )


def _record(run_dir, k: int) -> dict:
    folder = newest_complete_checkpoint(run_dir, 2)
    return load_peer_state(folder, k)["dynamics"]


def _stop_before(epoch):
    def hook(rank, e):
        if e == epoch:
            raise KeyboardInterrupt(f"stopped before epoch {e}")

    return hook


def test_resume_gives_the_record_of_an_uninterrupted_run(tmp_path):
    cfg = load_config(None, RUN)
    run_local(cfg, tmp_path / "whole")
    try:
        run_local(cfg, tmp_path / "cut", fault_hook=_stop_before(3))
    except KeyboardInterrupt:
        pass
    assert _record(tmp_path / "cut", 0)["seen"].max() == 2  # interrupted after epoch 2
    trained = []
    run_local(cfg, tmp_path / "cut", fault_hook=lambda rank, e: trained.append(e))
    assert trained == [3]  # it resumed: only the last epoch trained again (a silent restart would train 1, 2, 3)
    for k in (0, 1):
        want, got = _record(tmp_path / "whole", k), _record(tmp_path / "cut", k)
        assert float(want["seen"].min()) == 3
        for key in RECORD_KEYS:
            assert torch.allclose(got[key].float(), want[key].float(), atol=1e-5), (k, key)


def test_a_checkpoint_without_the_record_loads_and_resumes(tmp_path):
    """A run trained before the record existed: its checkpoints load, and a resumed run records from there."""
    cfg = load_config(None, [*RUN, "train.epochs=2"])
    run_local(cfg, tmp_path)
    folder = newest_complete_checkpoint(tmp_path, 2)
    for k in (0, 1):
        state = load_peer_state(folder, k)
        del state["dynamics"]
        save_peer_state(folder, k, state)
    metrics, _ = run_local(load_config(None, RUN), tmp_path)
    assert metrics["epoch"] == 3
    rec = _record(tmp_path, 0)
    assert rec["seen"].tolist() == [1.0] * 200  # only the epoch trained after the resume
