"""Replicas of a peer (``ray.replicas_per_peer``, issue 12 point 4): DDP inside a peer, exchange across peers.

The contract: R data-parallel replicas of every peer train exactly like one worker per peer with the
whole global batch, as long as the model's output does not depend on how the batch is split
(``cnn_small_gn``; on GPU SyncBatchNorm). Checked here with real gloo process groups on CPU: 2 peers x
2 replicas (4 processes, the exchange across processes) and 2 peers together x 2 replicas (2 processes,
the exchange in-process), against 2 peers in one process, weights to 1e-5 after two epochs on digits.
The batch size (95) splits unevenly (48 + 47, last batch 13 = 7 + 6), so the per-slice loss weights
matter; ProSelfLC with both target gradients on sends gradient through the differentiable exchange, and with
all knowledge (chi = +inf) every peer distils every label of the other, so that gradient is in the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cmd_dist.config import ConfigError, from_dict, load_config
from cmd_dist.data.types import Shard
from cmd_dist.runs.checkpoint import checkpoint_epoch, load_peer_state
from cmd_dist.runs.storage import newest_complete_checkpoint
from cmd_dist.train.local import LocalReporter, run_local

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "configs" / "demo.yaml"
BASE = [
    "train.epochs=2",
    "train.batch_size=95",
    "train.milestones=[1]",
    "method.self_kd=proselflc",
    "method.b1=4",
    # chi = +inf (all knowledge, Sec. 4.2): every label is exchanged, so the exchange across replicas and its
    # gradient are exercised (a chi that admits part of the batch would sit inside the entropies' narrow band
    # here, where a 1e-6 difference flips a sample). Partial masks: test_step's separate-process test.
    "method.knowledge=all",
    "peers=[{arch: cnn_small_gn, name: peerA}, {arch: cnn_small_gn, name: peerB}]",
]
COMPARED = (
    "train_loss",
    "train_self_loss",
    "train_peer_loss",
    "train_acc_noisy",
    "entropy_mean",
    "epsilon_mean",
    "entropy_q50",
    "test_acc",
    "distilled_from",
)


def _worker(rank: int, world: int, init_file: str, cfg_dict: dict, run_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from cmd_dist.train.worker import run_worker

        metrics = run_worker(from_dict(cfg_dict), Path(run_dir), LocalReporter(Path(run_dir)), torch.device("cpu"))
        if rank == 0:
            Path(run_dir, "final_metrics.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def _run_replicated(tmp: Path, name: str, overrides: list[str], world: int) -> tuple[Path, dict]:
    cfg = load_config(DEMO, BASE + overrides)
    run_dir = tmp / name
    run_dir.mkdir()
    mp.start_processes(
        _worker,
        args=(world, str(tmp / f"{name}.init"), cfg.to_dict(), str(run_dir)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return run_dir, json.loads((run_dir / "final_metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("reference")
    metrics, _ = run_local(load_config(DEMO, BASE), run_dir)
    return run_dir, metrics


def _weights(run_dir: Path, k: int) -> dict[str, torch.Tensor]:
    folder = newest_complete_checkpoint(run_dir, 2)
    assert folder is not None and checkpoint_epoch(folder) == 2, folder
    return load_peer_state(folder, k)["model"]


def _record(run_dir: Path, k: int) -> dict[str, torch.Tensor]:
    return load_peer_state(newest_complete_checkpoint(run_dir, 2), k)["dynamics"]


@pytest.mark.parametrize(
    ("placement", "world"), [("separate", 4), ("together", 2)], ids=["2peers-x-2replicas", "together-x-2replicas"]
)
def test_replicas_train_exactly_like_one_worker_per_peer(tmp_path: Path, reference, placement, world):
    ref_dir, ref = reference
    run_dir, got = _run_replicated(
        tmp_path, placement, [f"ray.placement={placement}", "ray.replicas_per_peer=2"], world
    )
    for k in (0, 1):
        want, have = _weights(ref_dir, k), _weights(run_dir, k)
        assert want.keys() == have.keys()
        for key in want:
            assert torch.allclose(have[key], want[key], atol=1e-5, rtol=0), (
                k,
                key,
                (have[key] - want[key]).abs().max(),
            )
    # The per-sample record (issue 21): each replica recorded its slices; summed over them, one worker's record.
    for k in (0, 1):
        want, have = _record(ref_dir, k), _record(run_dir, k)
        assert float(want["seen"].min()) == 2.0 and float(want["disagree"].sum()) > 0
        for key in ("seen", "disagree", "last_pred"):
            assert torch.equal(have[key], want[key]), (k, key)
        for key in ("margin_sum", "last_prob", "weighted_margin_sum", "weight_sum"):
            assert torch.allclose(have[key], want[key], atol=1e-4, rtol=1e-6), (k, key)
    # Knowledge flowed: every training image's label from each peer (summed over the replicas' slices).
    assert ref["peerA/distilled_from"] == ref["peerB/distilled_from"] == 1438
    for name in ("peerA", "peerB"):
        for metric in COMPARED:
            a, b = ref[f"{name}/{metric}"], got[f"{name}/{metric}"]
            assert b == pytest.approx(a, abs=1e-4), (name, metric, a, b)
    # Every rank says which replica of which peers it was; replica 0 alone wrote each peer's files.
    info = [json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in range(world)]
    groups = world // 2
    assert [i["replica"] for i in info] == [r // groups for r in range(world)]
    assert [i["peers"] for i in info] == ([[0], [1], [0], [1]] if groups == 2 else [[0, 1], [0, 1]])


def test_without_equal_slices_the_mismatch_would_show(tmp_path: Path, reference):
    """The comparison above can fail: a different split of the data (one replica's run on half the batch) differs."""
    ref_dir, _ = reference
    run_dir = tmp_path / "half"
    run_local(load_config(DEMO, [*BASE, "train.batch_size=48"]), run_dir)
    diff = max((_weights(run_dir, 0)[k] - _weights(ref_dir, 0)[k]).abs().max().item() for k in _weights(ref_dir, 0))
    assert diff > 1e-3


def test_shards_cover_each_batch_once_and_augment_like_the_whole_batch():
    from cmd_dist.data.prepare import prepare_data

    cfg = load_config(DEMO, BASE)
    data = prepare_data(cfg.data, cfg.noise)
    whole = list(data.epoch_batches(1, [0, 1], 95, 0))
    parts = [list(data.epoch_batches(1, [0, 1], 95, 0, shard=Shard(j, 3))) for j in range(3)]
    assert all(len(p) == len(whole) for p in parts)
    for b, batch in enumerate(whole):
        ids = torch.cat([p[b].ids for p in parts])
        assert torch.equal(ids, batch.ids)
        assert sum(p[b].share for p in parts) == pytest.approx(1.0)
        for k in (0, 1):
            assert torch.equal(torch.cat([p[b].xs[k] for p in parts]), batch.xs[k])
    evals = [list(data.eval_batches(100, shard=Shard(j, 2))) for j in range(2)]
    assert sum(len(e) for e in evals) == len(list(data.eval_batches(100)))
    assert sum(int(y.shape[0]) for e in evals for _, y in e) == int(data.eval_y.shape[0])


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["ray.replicas_per_peer=0"], "ray.replicas_per_peer: 0 must be >= 1"),
        (["ray.replicas_per_peer=2", "method.objective=asyncmkd"], "asyncmkd"),
        (["ray.replicas_per_peer=4", "train.batch_size=3"], "train.batch_size=3"),
        (["ray.sync_batchnorm=maybe"], "ray.sync_batchnorm: 'maybe'"),
        (["ray.sync_batchnorm=true", "ray.use_gpu=false"], "ray.sync_batchnorm: true needs GPUs"),
    ],
)
def test_bad_replica_settings_are_one_line(overrides, words):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(DEMO, overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_placement_line_and_worker_count_with_replicas():
    from cmd_dist.launch.placement import plan_placement

    cpu = [{"CPU": 8.0}]
    p = plan_placement(load_config(DEMO, ["ray.replicas_per_peer=2", "ray.use_gpu=false"]), cpu)
    assert p.num_workers == 4 and "peerA -> workers 0, 2" in p.line and "2 DDP replicas per peer" in p.line
    t = plan_placement(load_config(DEMO, ["ray.replicas_per_peer=3", "ray.placement=together"]), cpu)
    assert t.num_workers == 3 and "peerA, peerB -> workers 0, 1, 2" in t.line
    # Four GPUs, two replicas: one whole GPU per worker, NCCL; two GPUs: the peers share each replica's GPU.
    four = plan_placement(load_config(DEMO, ["ray.replicas_per_peer=2"]), [{"CPU": 8.0, "GPU": 4.0}])
    assert (four.num_workers, four.resources_per_worker["GPU"], four.backend) == (4, 1.0, "nccl")
    two = plan_placement(load_config(DEMO, ["ray.replicas_per_peer=2"]), [{"CPU": 8.0, "GPU": 2.0}])
    assert (two.num_workers, two.resources_per_worker["GPU"]) == (2, 1.0)
    with pytest.raises(ConfigError, match="ray.cpus_per_worker"):
        plan_placement(load_config(DEMO, ["ray.replicas_per_peer=4"]), [{"CPU": 2.0}])


def test_a_last_batch_smaller_than_the_replicas_is_refused(tmp_path: Path):
    # 1438 training images, batch 1436: the last batch has 2 images for 3 replicas.
    cfg = load_config(DEMO, [*BASE, "train.batch_size=1436", "ray.replicas_per_peer=3"])
    from cmd_dist.launch.preflight import preflight

    with pytest.raises(ConfigError) as e:  # before Ray starts: one line, exit 2
        preflight(cfg, echo=False)
    assert "train.batch_size: 1436 leaves a last batch of 2" in str(e.value) and "\n" not in str(e.value)
    preflight(load_config(DEMO, [*BASE, "train.batch_size=1436", "ray.replicas_per_peer=2"]), echo=False)
    # and the worker itself refuses it too (an embedding caller without the preflight)
    with pytest.raises(ValueError, match="last batch has 2 of the 1438"):
        run_local(cfg, tmp_path / "r")


@pytest.mark.skipif(os.environ.get("CMD_DIST_SKIP_SLOW") == "1", reason="slow")
def test_sync_batchnorm_true_without_gpu_is_refused_in_the_worker(tmp_path: Path):
    from cmd_dist.train.peers import sync_batchnorm_enabled

    cfg = load_config(DEMO, ["ray.sync_batchnorm=true"])
    with pytest.raises(ValueError, match="no GPU"):
        sync_batchnorm_enabled(cfg, torch.device("cpu"), 2)
    assert not sync_batchnorm_enabled(load_config(DEMO, []), torch.device("cpu"), 2)
    assert not sync_batchnorm_enabled(load_config(DEMO, []), torch.device("cuda"), 1)
    assert sync_batchnorm_enabled(load_config(DEMO, []), torch.device("cuda"), 2)


def _copy_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from cmd_dist.train.exchange import Exchange

        ex = Exchange(num_peers=2, replicas=2)  # ranks 0, 1: replica 0 of peers 0, 1; ranks 2, 3: replica 1
        stats = [torch.full((3,), float(rank)), torch.full((2,), 10.0 + rank)]  # e.g. BatchNorm's running stats
        ex.copy_from_first_replica(stats)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps([t.tolist() for t in stats]))
    finally:
        dist.destroy_process_group()


def test_copy_from_first_replica_gives_each_replica_its_peers_replica_0_tensors(tmp_path: Path):
    """The evaluation's BatchNorm statistics: every replica of a peer scores with replica 0's (rank = worker),
    never another peer's. (The replica tests above use GroupNorm, which has no buffers to copy.)"""
    mp.start_processes(_copy_worker, args=(4, str(tmp_path / "init"), str(tmp_path)), nprocs=4, start_method="spawn")
    for rank in range(4):
        first = rank % 2  # replica 0 of this rank's peer
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == [[float(first)] * 3, [10.0 + first] * 2], rank
