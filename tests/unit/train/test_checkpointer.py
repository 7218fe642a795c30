"""The Checkpointer's protocol, rank 0's view, without Ray or torch.distributed: the marker is written last
(after every worker's files and after the barrier), the best epoch is held as a copy until the next checkpoint
epoch, and resuming clears the folders past the resume point before anyone writes."""

from __future__ import annotations

import json

import torch

from cmd_dist.runs.checkpoint import checkpoint_epoch, save_peer_state
from cmd_dist.runs.storage import RunStore
from cmd_dist.train.checkpointer import Checkpointer


def _files(run_dir) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


class TwoRanks:
    """Rank 0 of two: at each barrier "rank 1" may do its part first (write peer 1's files), as a real barrier
    returns only once every rank has arrived; ``events`` records the files rank 0 had written when it arrived."""

    rank, world_size, local_peers, primary = 0, 2, [0], True

    def __init__(self, run_dir, events: list, other_rank_writes=None) -> None:
        self.run_dir, self.events, self.other_rank_writes = run_dir, events, other_rank_writes

    def gather_objects(self, obj):
        self.events.append(("barrier", _files(self.run_dir)))
        if self.other_rank_writes is not None:
            self.other_rank_writes()
        return [obj, obj]


class Recording:
    """A RunStore (a plain folder) that records the calls the Checkpointer makes, with the files there then."""

    def __init__(self, run_dir, events: list) -> None:
        self.inner, self.events, self.dir = RunStore(run_dir), events, run_dir

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.events.append((name, _files(self.dir)))
            return method(*args, **kwargs)

        return call


def _write(folder, k: int, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_peer_state(folder, k, state)


def _state(epoch: int, value: float = 0.0) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "epoch": epoch}


def _checkpointer(tmp_path, events, epochs=4, every=1, keep=2, other_rank_writes=None):
    store = Recording(tmp_path, events)
    exchange = TwoRanks(tmp_path, events, other_rank_writes)
    return Checkpointer(store, exchange, 2, epochs, every, keep, log=lambda m: None)


def test_marker_is_written_last_after_every_workers_files_and_the_barrier(tmp_path):
    events: list = []
    folder = tmp_path / "checkpoint_000001"
    ckpt = _checkpointer(tmp_path, events, other_rank_writes=lambda: _write(folder, 1, _state(1)))
    assert ckpt.save(1, {0: _state(1)}, {"eval_split": "test", "test_acc": 50.0}, 50.0)
    names = [name for name, _ in events]
    barrier = names.index("barrier", names.index("upload_checkpoint_files"))  # (the best copy has its own before)
    assert barrier < names.index("upload_marker") < names.index("prune")
    marker = "checkpoint_000001/epoch.txt"
    assert all(marker not in seen for _, seen in events[: barrier + 1])  # not before the barrier
    seen_at_upload = dict(events)["upload_marker"]
    assert marker in seen_at_upload and "checkpoint_000001/metrics.json" in seen_at_upload
    assert {"checkpoint_000001/peer0.pt", "checkpoint_000001/peer1.pt"} <= set(seen_at_upload)
    assert checkpoint_epoch(folder) == 1


def test_best_epoch_is_held_as_a_copy_and_written_with_the_next_checkpoint(tmp_path):
    events: list = []
    ckpt = _checkpointer(tmp_path, events, epochs=4, every=2)
    live = _state(1, 1.0)
    assert not ckpt.save(1, {0: live}, {"eval_split": "test", "test_acc": 60.0, "epoch": 1}, 60.0)
    assert not (tmp_path / "best_checkpoint").exists() and not list(tmp_path.glob("checkpoint_*"))
    live["model"]["w"].fill_(2.0)  # the live weights move on; the held best must not
    assert ckpt.save(2, {0: _state(2, 2.0)}, {"eval_split": "test", "test_acc": 40.0, "epoch": 2}, 40.0)
    best = tmp_path / "best_checkpoint"
    assert checkpoint_epoch(best) == 1
    assert json.loads((best / "metrics.json").read_text())["epoch"] == 1
    held = torch.load(best / "peer0.pt", weights_only=True)
    assert held["epoch"] == 1 and torch.equal(held["model"]["w"], torch.full((3,), 1.0))
    assert checkpoint_epoch(tmp_path / "checkpoint_000002") == 2
    names = [name for name, _ in events]  # best first, its marker last; then the checkpoint
    assert names.index("delete_uploaded") < names.index("upload") < names.index("upload_checkpoint_files")


def test_resume_loads_the_newest_complete_and_clears_the_folders_past_it(tmp_path):
    events: list = []
    ckpt = _checkpointer(tmp_path, events, epochs=4)
    for epoch in (1, 2):
        for k in (0, 1):
            _write(tmp_path / f"checkpoint_{epoch:06d}", k, _state(epoch, float(epoch)))
    ckpt.save(2, {0: _state(2, 2.0)}, {"eval_split": "test", "test_acc": 55.0}, 55.0)  # epoch 2 complete
    _write(tmp_path / "checkpoint_000003", 0, _state(3))  # a half-written epoch 3 (no marker)
    events.clear()
    again = _checkpointer(tmp_path, events, epochs=4)
    restored = again.load_latest()
    assert restored.epoch == 2 and not restored.finished and list(restored.states) == [0]
    assert torch.equal(restored.states[0]["model"]["w"], torch.full((3,), 2.0))
    assert not (tmp_path / "checkpoint_000003").exists()  # cleared here...
    names = [name for name, _ in events]
    barriers = [i for i, name in enumerate(names) if name == "barrier"]
    assert barriers[0] < names.index("clear_stale") < barriers[1]  # ...and on the URI, before anyone writes
    assert not any(f.startswith("checkpoint_000003") for f in events[barriers[1]][1])
    assert again.best_score == 55.0


def test_a_finished_run_is_restored_as_finished_and_nothing_is_cleared(tmp_path):
    events: list = []
    ckpt = _checkpointer(tmp_path, events, epochs=1)
    _write(tmp_path / "checkpoint_000001", 1, _state(1))
    ckpt.save(1, {0: _state(1)}, {"eval_split": "test", "test_acc": 70.0, "epoch": 1}, 70.0)
    (tmp_path / "checkpoint_000002").mkdir()  # e.g. a broken folder of a longer run
    restored = _checkpointer(tmp_path, events, epochs=1).load_latest()
    assert restored.finished and restored.epoch == 1 and restored.metrics["test_acc"] == 70.0
    assert (tmp_path / "checkpoint_000002").exists()


# ----------------------------------------------------------------------------- evaluation: one host read


class _Data:
    """Eight eval batches of random images; the labels are what a per-batch reference scores against."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(8)]

    def eval_batches(self, batch_size, **_):
        yield from self.batches


def test_evaluate_reads_the_device_once_and_matches_the_per_batch_count(monkeypatch):
    from types import SimpleNamespace

    from cmd_dist.train.trainer import evaluate

    torch.manual_seed(0)
    peer = SimpleNamespace(model=torch.nn.Linear(4, 3), fast=False)
    data = _Data()
    with torch.no_grad():  # the old path: one host read (.item()) per batch
        hits = sum(int((peer.model(x).argmax(1) == y).sum().item()) for x, y in data.batches)
    reads = []
    for name in ("item", "tolist", "cpu", "__float__", "__int__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _o=orig, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1]
        )
    acc = evaluate(peer, data, 5)
    monkeypatch.undo()
    assert acc == 100.0 * hits / 40
    assert len(reads) <= 1, reads  # one read at the end, not one per batch


def test_a_best_epoch_that_is_a_checkpoint_epoch_takes_no_second_copy(tmp_path, monkeypatch):
    import cmd_dist.train.checkpointer as module

    copies: list = []
    monkeypatch.setattr(module, "to_cpu", lambda obj: copies.append(obj) or obj)
    ckpt = _checkpointer(tmp_path, [], epochs=4, every=2)
    assert ckpt.save(2, {0: _state(2, 2.0)}, {"eval_split": "test", "test_acc": 60.0, "epoch": 2}, 60.0)
    assert copies == []  # written from the states handed in, not from a held copy
    assert checkpoint_epoch(tmp_path / "best_checkpoint") == 2
    assert not ckpt.save(3, {0: _state(3, 3.0)}, {"eval_split": "test", "test_acc": 70.0, "epoch": 3}, 70.0)
    assert len(copies) == 1  # off a checkpoint epoch the best is held as a copy until it is written
