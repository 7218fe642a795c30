"""The checkpoint protocol's order of writes, and URI clean-up on resume (issue 19, point 0).

A checkpoint (and ``best_checkpoint/``) is complete iff its marker ``epoch.txt`` is there, so rank 0 may
write the marker only after the barrier that every worker passes once its peers' files are written (and,
on a URI, uploaded). Checked deterministically with a stand-in for the process group: rank 0 of two
workers, whose barrier is where the other worker's part lands (a real second worker writes its files at the
latest then). A marker written before the barrier, or before any peer's file, is seen at its writing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from cmd_dist.config import load_config
from cmd_dist.runs.checkpoint import checkpoint_folder, checkpoint_names, is_complete, save_peer_state
from cmd_dist.runs.fs import Remote
from cmd_dist.runs.storage import RunStore, newest_complete_checkpoint
from cmd_dist.train import checkpointer
from cmd_dist.train.checkpointer import Checkpointer
from cmd_dist.train.local import run_local

PEER_FILES = {"peer0.pt", "peer0.sha256", "peer1.pt", "peer1.sha256"}


class _Rank0Of2:
    """Rank 0 of two workers (peer 0 here, peer 1 on the other); ``gather_objects`` is the barrier."""

    rank, world_size, primary, replica, replicas = 0, 2, True, 0, 1

    def __init__(self, at_barrier) -> None:
        self.at_barrier = at_barrier  # what the other worker has done by each barrier, in order
        self.barriers = 0

    def gather_objects(self, obj):
        self.at_barrier[self.barriers]()
        self.barriers += 1
        return [obj, None]


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()


class _Recording(Remote):
    """A Remote (pyarrow's in-memory mock filesystem) noting what was on it when each marker went up."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.exchange: _Rank0Of2 | None = None
        self.markers: list[tuple[str, int, set[str]]] = []  # (marker, barriers passed, files in its folder)

    def upload(self, local, rel):
        if rel.endswith("/epoch.txt"):
            folder = rel.rsplit("/", 1)[0]
            here = {f.rsplit("/", 1)[1] for f in self.files(folder)}
            self.markers.append((rel, self.exchange.barriers, here))
        super().upload(local, rel)


def _spy_markers(monkeypatch, exchange) -> list[tuple[str, int, set[str]]]:
    """Every local marker write: (folder name, barriers passed, files in the folder at that moment)."""
    seen = []
    write = checkpointer.write_epoch_marker

    def spy(folder, epoch):
        seen.append((Path(folder).name, exchange.barriers, _listing(Path(folder))))
        write(folder, epoch)

    monkeypatch.setattr(checkpointer, "write_epoch_marker", spy)
    return seen


def _state(k: int) -> dict:
    return {"w": torch.full((3,), float(k)), "epoch": 1}


@pytest.mark.parametrize("uri", [False, True], ids=["folder", "uri"])
def test_rank0_writes_the_checkpoint_marker_after_the_barrier_and_every_peers_files(tmp_path, monkeypatch, uri):
    remote = _Recording(pyarrow.fs._MockFileSystem(), "b/run", "mock://b/run") if uri else None
    store = RunStore("mock://b/run", remote) if uri else RunStore(tmp_path)
    run_dir = store.dir
    folder = checkpoint_folder(run_dir, 1)

    def other_worker_done():  # peer 1's files, written (a URI: uploaded) by the other worker
        if uri:
            for ext in (".pt", ".sha256"):
                remote.write_bytes(f"{folder.name}/peer1{ext}", b"x")
        else:
            save_peer_state(folder, 1, _state(1))

    exchange = _Rank0Of2([other_worker_done])
    if uri:
        remote.exchange = exchange
    local = _spy_markers(monkeypatch, exchange)
    try:
        ckpt = Checkpointer(store, exchange, num_peers=2, epochs=1, every=1, keep=2)
        assert ckpt.save(1, {0: _state(0)}, {"epoch": 1}, -math.inf)  # -inf: no new best, the checkpoint alone
        assert exchange.barriers == 1
        mine = {"peer0.pt", "peer0.sha256"} if uri else PEER_FILES  # a URI: the other worker's files are not here
        assert local == [(folder.name, 1, mine | {"metrics.json"})]
        if uri:
            assert remote.markers == [(f"{folder.name}/epoch.txt", 1, PEER_FILES | {"metrics.json"})]
            assert is_complete(remote, folder.name, 2)
        else:
            assert newest_complete_checkpoint(run_dir, 2) == folder
    finally:
        store.close()


@pytest.mark.parametrize("uri", [False, True], ids=["folder", "uri"])
def test_rank0_renews_the_best_checkpoint_marker_only_around_every_peers_files(tmp_path, monkeypatch, uri):
    remote = _Recording(pyarrow.fs._MockFileSystem(), "b/run", "mock://b/run") if uri else None
    store = RunStore("mock://b/run", remote) if uri else RunStore(tmp_path)
    best = store.dir / "best_checkpoint"
    best.mkdir(parents=True)
    (best / "epoch.txt").write_text("1")  # the previous best epoch's marker
    if uri:
        remote.write_bytes("best_checkpoint/epoch.txt", b"1")

    def old_marker_gone():  # the other worker starts overwriting its files once past this barrier
        assert not (best / "epoch.txt").exists()
        if uri:
            assert not remote.is_file("best_checkpoint/epoch.txt")

    def other_worker_done():
        if uri:
            for ext in (".pt", ".sha256"):
                remote.write_bytes(f"best_checkpoint/peer1{ext}", b"x")
        else:
            save_peer_state(best, 1, _state(1))

    def checkpoint_done():  # the checkpoint written after the best copy: its own barrier
        if uri:
            for ext in (".pt", ".sha256"):
                remote.write_bytes(f"checkpoint_000002/peer1{ext}", b"x")
        else:
            save_peer_state(checkpoint_folder(store.dir, 2), 1, _state(1))

    exchange = _Rank0Of2([old_marker_gone, other_worker_done, checkpoint_done])
    if uri:
        remote.exchange = exchange
    local = _spy_markers(monkeypatch, exchange)
    try:
        ckpt = Checkpointer(store, exchange, num_peers=2, epochs=2, every=1, keep=2)
        assert ckpt.save(2, {0: _state(0)}, {"epoch": 2}, 50.0)  # a new best, on a checkpoint epoch
        assert exchange.barriers == 3  # the best copy's two, then the checkpoint's
        mine = {"peer0.pt", "peer0.sha256"} if uri else PEER_FILES
        assert [m for m in local if m[0] == "best_checkpoint"] == [("best_checkpoint", 2, mine | {"metrics.json"})]
        if uri:
            best_markers = [m for m in remote.markers if m[0].startswith("best_checkpoint/")]
            assert best_markers == [("best_checkpoint/epoch.txt", 2, PEER_FILES | {"metrics.json"})]
            assert remote.read_bytes("best_checkpoint/epoch.txt") == b"2"
    finally:
        store.close()


# ----------------------------------------------------------------------------- stale folders on a URI


def _folder(remote: Remote, epoch: int, marker: bool = True, extra: str | None = None) -> None:
    name = f"checkpoint_{epoch:06d}"
    for f in ("peer0.pt", "peer0.sha256", "peer1.pt", "peer1.sha256", "metrics.json"):
        remote.write_bytes(f"{name}/{f}", b"x")
    if extra:
        remote.write_bytes(f"{name}/{extra}", b"x")
    if marker:
        remote.write_bytes(f"{name}/epoch.txt", str(epoch).encode())


def test_clear_stale_on_a_uri_removes_folders_past_the_resume_point_and_without_a_marker():
    remote = Remote(pyarrow.fs._MockFileSystem(), "b/run", "mock://b/run")
    for epoch in (1, 2, 3, 4):
        _folder(remote, epoch)
    _folder(remote, 5, marker=False)
    remote.write_bytes("checkpoint_000002/epoch.txt", b"")  # a broken marker: not resumable, not kept
    store = RunStore("mock://b/run", remote)
    try:
        store.clear_stale(store.dir / "checkpoint_000003", 3)
        assert checkpoint_names(remote) == ["checkpoint_000003", "checkpoint_000001"]
        store.clear_stale(None, 0)
        assert checkpoint_names(remote) == []
    finally:
        store.close()


def test_a_run_on_a_uri_clears_what_an_older_run_left_past_its_resume_point():
    """A stale folder past the resume point that this run never rewrites (a longer earlier run) is gone."""
    remote = Remote(pyarrow.fs._MockFileSystem(), "b/run", "mock://b/run")
    _folder(remote, 7, marker=False, extra="peer2.pt")
    store = RunStore("mock://b/run", remote)
    cfg = load_config(None, ["train.epochs=1", "train.log_every=0", "data.train_subset=256", "data.test_subset=64"])
    try:
        metrics, _ = run_local(cfg, store)
    finally:
        store.close()
    assert metrics["epoch"] == 1
    assert checkpoint_names(remote) == ["checkpoint_000001"]
    assert json.loads(remote.read_bytes("checkpoint_000001/metrics.json"))["epoch"] == 1
