"""Integration tests on a real local Ray cluster (2 CPU workers): training, outputs, equivalence.

Each fit costs ~45 s of Ray start-up on 2 cores, so runs are module-scoped and shared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cmd_dist.config import load_config
from cmd_dist.runs.checkpoint import checkpoint_epoch, load_peer_state
from cmd_dist.runs.storage import newest_complete_checkpoint
from tests.conftest import REPO, SHARED_CIFAR, wait_for

pytestmark = pytest.mark.ray

EPOCHS = 3
# eta = 1 and b2 = -1 keep chi above H(u) early on, so knowledge flows from epoch 1 in both directions.
BASE = [f"train.epochs={EPOCHS}", "train.milestones=[2]", "method.eta=1.0", "method.b2=-1.0", "train.log_every=0"]


def _run(tmp: Path, name: str, extra: list[str]) -> tuple:
    from cmd_dist.launch import job

    cfg = load_config(
        os.path.join(REPO, "configs", "demo.yaml"), BASE + [f"output_dir={tmp}", f"run_name={name}"] + extra
    )
    run_dir = job.resolve_run_dir(cfg)
    summary = job.train(cfg, run_dir)
    return cfg, run_dir, summary


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_checkpoint(run_dir: Path, epoch: int) -> Path:
    found = [
        p
        for p in run_dir.glob("checkpoint_*")
        if (p / "epoch.txt").is_file() and int((p / "epoch.txt").read_text()) == epoch
    ]
    assert found, f"no checkpoint for epoch {epoch} in {run_dir}"
    return found[0]


@pytest.fixture(scope="module")
def separate(ray_cluster, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("sep"), "separate", ["ray.placement=separate"])


@pytest.fixture(scope="module")
def together(ray_cluster, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("tog"), "together", ["ray.placement=together"])


def test_both_peers_train_and_summary_is_written(separate):
    cfg, run_dir, summary = separate
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    assert [p["name"] for p in summary["peers"]] == ["peerA", "peerB"]
    assert summary["epochs_run"] == EPOCHS and summary["eval_split"] == "test"
    for peer in summary["peers"]:
        assert peer["arch"] == "cnn_small"
        assert 20.0 < peer["test_acc"] <= 100.0  # 10 classes: well above chance after 3 epochs
    assert (run_dir / "config.yaml").is_file() and (run_dir / "git_rev.txt").read_text().strip()
    assert load_config(run_dir / "config.yaml").run_name == "separate"


def test_knowledge_flows_both_ways_and_is_logged(separate):
    _, run_dir, _ = separate
    rows = _rows(run_dir)
    assert len(rows) == 2 * EPOCHS
    first = {r["peer"]: r for r in rows if r["epoch"] == 1}
    assert first["peerA"]["distilled_from"]["peerB"] > 0  # B -> A
    assert first["peerB"]["distilled_from"]["peerA"] > 0  # A -> B
    assert all(r["train_peer_loss"] > 0 for r in rows if r["epoch"] == 1)
    assert all(0 <= r["train_acc_clean"] <= 100 and 0 <= r["train_acc_noisy"] <= 100 for r in rows)


def test_tensorboard_tags_read_back(separate):
    _, run_dir, _ = separate
    for me, other in (("peerA", "peerB"), ("peerB", "peerA")):
        acc = EventAccumulator(str(run_dir / "tb" / me))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        want = {
            "train/loss",
            "train/self_kd_loss",
            "train/peer_loss",
            "train/acc_noisy_labels",
            "train/acc_clean_labels",
            "test/acc",
            "train/lr",
            "knowledge/chi",
            "self_kd/epsilon_mean",
            "self_kd/certainty_r",
            f"knowledge/distilled_from_{other}",
            "throughput/images_per_s",
        }
        assert want <= tags, want - tags
        assert [e.step for e in acc.Scalars("test/acc")] == list(range(1, EPOCHS + 1))
        assert acc.Scalars(f"knowledge/distilled_from_{other}")[0].value > 0
    ex = EventAccumulator(str(run_dir / "tb" / "exchange"))
    ex.Reload()
    assert {"knowledge/total_distilled", "knowledge/peerA_to_peerB", "knowledge/peerB_to_peerA"} <= set(
        ex.Tags()["scalars"]
    )


def test_checkpoint_holds_every_peer_from_both_workers(separate):
    cfg, run_dir, _ = separate
    folder = _final_checkpoint(run_dir, EPOCHS)
    for k in range(2):
        state = load_peer_state(folder, k)
        assert state["epoch"] == EPOCHS
        assert {"model", "optimizer", "scheduler", "certainty", "torch_rng"} <= set(state)
        assert 0.0 < state["certainty"]["r"] < 1.0
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) <= cfg.ray.keep_checkpoints


def test_one_worker_equals_two_workers(separate, together):
    """Peers hosted in one worker or one per worker: the same run (1e-5 on CPU, same seed)."""
    _, sep_dir, sep_summary = separate
    _, tog_dir, tog_summary = together
    for a, b in zip(_rows(sep_dir), _rows(tog_dir)):
        assert (a["epoch"], a["peer"]) == (b["epoch"], b["peer"])
        for key in ("train_loss", "train_self_loss", "train_peer_loss", "eval_acc", "epsilon_mean", "certainty_r"):
            assert a[key] == pytest.approx(b[key], abs=1e-5, nan_ok=True), (key, a["epoch"], a["peer"])
        assert a["distilled_from"] == b["distilled_from"]
    for k in range(2):
        wa = load_peer_state(_final_checkpoint(sep_dir, EPOCHS), k)["model"]
        wb = load_peer_state(_final_checkpoint(tog_dir, EPOCHS), k)["model"]
        for name in wa:
            torch.testing.assert_close(wa[name].float(), wb[name].float(), atol=1e-5, rtol=0, msg=name)
    assert [p["test_acc"] for p in sep_summary["peers"]] == [p["test_acc"] for p in tog_summary["peers"]]


def test_zero_knowledge_distils_nothing(ray_cluster, tmp_path):
    _, run_dir, summary = _run(
        tmp_path, "zero", ["ray.placement=together", "method.knowledge=zero", "train.epochs=1", "train.milestones=[]"]
    )
    rows = _rows(run_dir)
    assert len(rows) == 2
    for r in rows:
        assert all(v == 0 for v in r["distilled_from"].values())
        assert r["train_peer_loss"] == 0.0
    assert all(p["test_acc"] is not None for p in summary["peers"])


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(SHARED_CIFAR, "cifar-100-python", "train")),
    reason="../shared/data/cifar-100-python not present",
)
def test_real_cifar100_slice(ray_cluster, tmp_path):
    """A short run on real CIFAR-100 (a slice, a small model), one peer per Ray worker."""
    from cmd_dist.launch import job

    cfg = load_config(
        None,
        [
            "data.dataset=cifar100",
            f"data.root={SHARED_CIFAR}",
            "data.train_subset=1024",
            "data.test_subset=512",
            "train.epochs=2",
            "train.milestones=[]",
            "train.lr=0.05",
            "method.eta=1.0",
            "method.b2=-1.0",
            "peers=[{arch: cnn_small, name: a}, {arch: cnn_small, name: b}]",
            f"output_dir={tmp_path}",
            "run_name=cifar",
        ],
    )
    run_dir = job.resolve_run_dir(cfg)
    summary = job.train(cfg, run_dir)
    assert summary["epochs_run"] == 2
    rows = _rows(run_dir)
    assert {r["peer"] for r in rows} == {"a", "b"}
    for peer in summary["peers"]:
        assert 0.0 <= peer["test_acc"] <= 100.0
    assert rows[0]["distilled_from"]  # the exchange ran across the two workers


# ----------------------------------------------------------------------------- faults (issue 6)


def _epochs_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(x)["epoch"] for x in path.read_text().splitlines() if x.strip()), default=0)


def _assert_same_run(a_dir: Path, b_dir: Path, epochs: int = EPOCHS) -> None:
    ra, rb = _rows(a_dir), _rows(b_dir)
    assert [(r["epoch"], r["peer"]) for r in ra] == [(r["epoch"], r["peer"]) for r in rb]
    for a, b in zip(ra, rb):
        for key in ("train_loss", "eval_acc", "certainty_r"):
            assert a[key] == pytest.approx(b[key], abs=1e-5, nan_ok=True), (key, a["epoch"], a["peer"])
    for k in range(2):
        wa = load_peer_state(_final_checkpoint(a_dir, epochs), k)["model"]
        wb = load_peer_state(_final_checkpoint(b_dir, epochs), k)["model"]
        for name in wa:
            torch.testing.assert_close(wa[name].float(), wb[name].float(), atol=1e-5, rtol=0, msg=name)


def _local_reference(cfg_path: str, overrides: list[str], run_dir: Path) -> dict:
    """The uninterrupted run in this process with one thread, like a 1-CPU Ray worker."""
    from cmd_dist.train.local import run_local

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_local(load_config(cfg_path, overrides), run_dir)[0]
    finally:
        torch.set_num_threads(threads)


def test_killed_peer_worker_restarts_and_finishes_the_same_run(ray_cluster, tmp_path):
    """SIGKILL one peer's Ray worker mid-run: the group restarts from the last checkpoint, same result.

    Ten short epochs so the kill lands mid-run; the reference is the uninterrupted run in-process
    (hosting does not change results: test_one_worker_equals_two_workers).
    """
    import signal
    import threading

    from cmd_dist.launch import job

    epochs = 10
    demo = os.path.join(REPO, "configs", "demo.yaml")
    overrides = [*BASE, f"train.epochs={epochs}", "train.milestones=[6]", "ray.placement=separate"]
    cfg = load_config(demo, overrides + [f"output_dir={tmp_path}", "run_name=killed"])
    run_dir = job.resolve_run_dir(cfg)
    out: dict = {}
    notices: list[str] = []
    thread = threading.Thread(target=lambda: out.setdefault("summary", job.train(cfg, run_dir, log=notices.append)))
    thread.start()
    info = run_dir / "workers" / "rank1.json"
    # After epoch 1's checkpoint is complete, so the restart has a checkpoint to resume from.
    wait_for(lambda: (run_dir / "checkpoint_000001" / "epoch.txt").is_file() and info.is_file(), every=0.01)
    victim = json.loads(info.read_text())["pid"]
    os.kill(victim, signal.SIGKILL)  # peerB's worker, while a later epoch runs
    killed_after = _epochs_logged(run_dir)
    thread.join(timeout=400)
    assert not thread.is_alive()
    assert killed_after < epochs
    assert json.loads(info.read_text())["pid"] != victim  # a new worker process took over
    assert out["summary"]["epochs_run"] == epochs
    # One notice, naming the checkpoint the group restarted from; the new workers started there.
    lost = [n for n in notices if "was lost" in n]
    assert len(lost) == 1 and "worker 1 was lost" in lost[0], notices
    resumed = int(lost[0].split("restarting the peer group from epoch ")[1].split("'")[0])
    assert 1 <= resumed <= killed_after
    assert json.loads((run_dir / "workers" / "rank0.json").read_text())["resumed_after_epoch"] == resumed
    reference = _local_reference(demo, overrides, tmp_path / "reference")
    _assert_same_run(tmp_path / "reference", run_dir, epochs)
    assert [p["test_acc"] for p in out["summary"]["peers"]] == pytest.approx(
        [reference[f"{name}/test_acc"] for name in ("peerA", "peerB")], abs=1e-9
    )


def test_sigterm_on_driver_then_resume_equals_uninterrupted(tmp_path):
    """SIGTERM the `cmd-dist train` driver mid-run; `--resume` finishes the very same run.

    The reference is the uninterrupted run in this process (`run_local`, one thread, as a Ray worker
    with 1 CPU): hosting does not change results (test_one_worker_equals_two_workers). Ten short epochs
    leave room for the signal to land mid-run however fast the machine is.
    """
    import signal
    import subprocess
    import sys

    epochs = 10
    overrides = [*BASE, f"train.epochs={epochs}", "train.milestones=[6]", "ray.placement=separate"]
    exe = os.path.join(os.path.dirname(sys.executable), "cmd-dist")
    demo = os.path.join(REPO, "configs", "demo.yaml")
    args = [exe, "train", demo, *overrides, f"output_dir={tmp_path}", "run_name=sigterm"]
    run_dir = tmp_path / "sigterm"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    wait_for(lambda: _epochs_logged(run_dir) >= 1 or proc.poll() is not None, every=0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"cmd-dist train --resume {run_dir}" in err
    assert 1 <= _epochs_logged(run_dir) < epochs
    newest = newest_complete_checkpoint(run_dir, 2, warn=lambda m: None)
    done = checkpoint_epoch(newest) if newest else 0
    assert (f"epochs 1-{done} are checkpointed" if done else "no epoch had finished") in err
    res = subprocess.run(
        [exe, "train", "--resume", str(run_dir)], capture_output=True, text=True, timeout=400, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "final test accuracy  peerA" in res.stdout
    # It resumed after the newest complete epoch, not from the start.
    if done:
        assert f"(epoch {done} done), training epoch {done + 1} onwards" in res.stdout + res.stderr
    assert json.loads((run_dir / "workers" / "rank0.json").read_text())["resumed_after_epoch"] == done

    _local_reference(demo, overrides, tmp_path / "reference")
    _assert_same_run(tmp_path / "reference", run_dir, epochs)


def test_same_run_name_resumes_instead_of_starting_over(separate, ray_cluster):
    """Launching a finished run's name again re-trains nothing and reports the same result."""
    from cmd_dist.launch import job

    cfg, run_dir, summary = separate
    before = (run_dir / "metrics.jsonl").read_text()
    again = job.train(load_config(run_dir / "config.yaml"), run_dir)
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert [p["test_acc"] for p in again["peers"]] == [p["test_acc"] for p in summary["peers"]]
    assert again["changes"] == []


def test_resume_with_allowed_changes_extends_the_run_and_records_it(separate, ray_cluster, tmp_path):
    """``--resume --allow-changes train.epochs=N+1`` on a copy of a finished N-epoch run trains epoch N+1 only,
    and the folder says so: config.yaml, config.original.yaml, changes.jsonl and summary.json (issue 18.2)."""
    import shutil

    from cmd_dist.cli import _resume_config
    from cmd_dist.launch import job
    from cmd_dist.launch.summary import record_resume
    from cmd_dist.runs import lock

    _, src, _ = separate
    run_dir = tmp_path / "extended"
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns(".lock"))
    r = _resume_config(str(run_dir), [f"train.epochs={EPOCHS + 1}"], allow_changes=True)
    lock.hold_run_lock(r.run_dir)
    record_resume(r.run_dir, r.text, r.cfg, r.changes, r.done + 1)
    summary = job.train(r.cfg, r.run_dir)
    assert summary["epochs_run"] == summary["epochs"] == EPOCHS + 1
    (change,) = summary["changes"]
    assert change["from_epoch"] == EPOCHS + 1 and change["changes"] == {
        "train.epochs": {"old": EPOCHS, "new": EPOCHS + 1}
    }
    assert [r["epoch"] for r in _rows(run_dir)] == [e for e in range(1, EPOCHS + 2) for _ in range(2)]
    assert load_config(run_dir / "config.yaml").train.epochs == EPOCHS + 1
    assert load_config(run_dir / "config.original.yaml").train.epochs == EPOCHS


def test_replicas_per_peer_on_ray_equal_one_process(ray_cluster, tmp_path):
    """2 peers x 2 DDP replicas = 4 Ray Train workers (0.5 CPU each): the same run as both peers in one process.

    cnn_small_gn's output does not depend on the batch split (no BatchNorm), so weights agree to 1e-5 (the
    setting of tests/unit/train/test_replicas.py: two epochs, ProSelfLC; in the demo's eta = 1 setting a 1e-7 relative
    change of the initial weights already moves them by 1e-3 within two epochs, so no run is bitwise there).
    """
    same = [
        "peers=[{arch: cnn_small_gn, name: peerA}, {arch: cnn_small_gn, name: peerB}]",
        "train.epochs=2",
        "train.milestones=[1]",
        "train.batch_size=95",
        "method.self_kd=proselflc",
        "method.b1=4",
        "method.eta=4.0",
        "method.b2=-8.0",
    ]
    cfg, run_dir, summary = _run(
        tmp_path, "replicas", [*same, "ray.replicas_per_peer=2", "ray.placement=separate", "ray.cpus_per_worker=0.5"]
    )
    ref_dir = tmp_path / "reference"
    _local_reference(os.path.join(REPO, "configs", "demo.yaml"), BASE + same, ref_dir)
    _assert_same_run(run_dir, ref_dir, epochs=2)
    info = [json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in range(4)]
    assert [(i["peers"], i["replica"]) for i in info] == [([0], 0), ([1], 0), ([0], 1), ([1], 1)]
    assert len({i["pid"] for i in info}) == 4
    assert all(p["test_acc"] > 15.0 for p in summary["peers"]), summary["peers"]  # 10 classes: chance is 10%
