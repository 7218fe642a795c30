"""The shared loader (`cmd_dist.infer.loading.open_trained_run`) and the class names of the data layer: the checkpoint
asked for is the one read (best / last / an epoch), every file is verified, a bad name or folder is one clear error,
a run behind a URI downloads only what it needs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cmd_dist.data.class_names import class_names
from cmd_dist.errors import CheckpointError, ConfigError, RunError
from cmd_dist.infer.loading import open_trained_run
from cmd_dist.runs.checkpoint import load_peer_state

SHARED_DATA = Path("/work/shared/data")


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("word", "folder", "epoch"),
    [("best", "best_checkpoint", 2), ("last", "checkpoint_000003", 3), ("2", "checkpoint_000002", 2)],
)
def test_the_checkpoint_asked_for_is_the_one_read(trained_run, word, folder, epoch):
    run = open_trained_run(str(trained_run), word)
    assert (run.checkpoint, run.epoch) == (folder, epoch)
    for k in range(2):
        on_disk = load_peer_state(trained_run / folder, k)["model"]
        assert _weights_equal(run.states[k]["model"], on_disk)
        assert _weights_equal(run.model(k).state_dict(), on_disk)
        assert not run.model(k).training
    assert run.peer_names == ["peerA", "peerB"]
    assert run.class_names == [str(i) for i in range(10)]
    assert (run.spec.num_classes, run.spec.channels, run.spec.size) == (10, 1, 8)
    assert run.summary["epochs_run"] == 3 and run.run_dir == trained_run
    assert list(run.models()) == ["peerA", "peerB"]
    # best and last differ in this run (the fixture's premise), so reading one for the other changes the weights
    other = open_trained_run(str(trained_run), "best" if word == "last" else "last")
    assert not _weights_equal(run.states[0]["model"], other.states[0]["model"])


def test_a_folder_that_is_not_a_run_is_one_error(trained_run, tmp_path):
    with pytest.raises(RunError, match="not a run folder .no config.yaml there.; pass a folder written by cmd-dist"):
        open_trained_run(str(tmp_path))
    with pytest.raises(RunError, match="is a checkpoint folder, not a run folder; pass the run folder"):
        open_trained_run(str(trained_run / "checkpoint_000003"))
    assert issubclass(RunError, ConfigError)  # the CLI's one-line user error


def test_a_checkpoint_that_does_not_exist_names_the_ones_there(trained_run):
    with pytest.raises(CheckpointError, match=r"checkpoint_000001 does not exist; this run has: best, 3, 2"):
        open_trained_run(str(trained_run), "1")  # pruned by retention (ray.keep_checkpoints 2)
    with pytest.raises(RunError, match="--checkpoint: 'newest' is not best, last or an epoch number"):
        open_trained_run(str(trained_run), "newest")


def test_a_file_that_fails_its_checksum_is_refused(run_copy):
    pt = run_copy / "checkpoint_000003" / "peer1.pt"
    data = bytearray(pt.read_bytes())
    data[-10] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"peer1.pt is truncated or corrupted \(checksum mismatch\)"):
        open_trained_run(str(run_copy), "3")
    # "last" skips the damaged newest checkpoint (with a warning) and takes the newest good one
    warned = []
    assert open_trained_run(str(run_copy), "last", log=warned.append).epoch == 2
    assert "checkpoint_000003" in warned[0]


def test_an_incomplete_checkpoint_is_refused(run_copy):
    (run_copy / "best_checkpoint" / "epoch.txt").unlink()
    with pytest.raises(CheckpointError, match="best_checkpoint is incomplete .no epoch.txt.; this run has: 3, 2"):
        open_trained_run(str(run_copy), "best")


def test_a_run_behind_a_uri_downloads_only_what_it_needs(run_copy):
    run = open_trained_run(run_copy.as_uri(), "2")
    staged = run.run_dir
    assert staged != run_copy and staged.is_dir()
    got = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    want = ["config.yaml", "summary.json"] + [
        f"checkpoint_000002/{f}" for f in ("epoch.txt", "metrics.json", "peer0.pt", "peer0.sha256", "peer1.pt")
    ]
    assert got == sorted([*want, "checkpoint_000002/peer1.sha256"])
    assert _weights_equal(run.states[1]["model"], load_peer_state(run_copy / "checkpoint_000002", 1)["model"])
    run.close()
    assert not staged.exists()


def test_peer_names_and_indices(trained_run):
    run = open_trained_run(str(trained_run))
    assert run.peer_index("peerB") == 1 and run.peer_index(0) == 0
    with pytest.raises(RunError, match=r"--peer: 'peerC' is not a peer of .*\(its peers: peerA, peerB\)"):
        run.peer_index("peerC")


# ----------------------------------------------------------------------------- class names


def _cfg(dataset: str, root: Path | str = "data", **data) -> SimpleNamespace:
    base = {"dataset": dataset, "root": str(root), "food_train": "food101n", "num_classes": 0}
    return SimpleNamespace(**{**base, **data})


@pytest.mark.skipif(not (SHARED_DATA / "cifar-100-python" / "meta").is_file(), reason="shared CIFAR-100 absent")
def test_cifar100_names_fine_and_coarse():
    fine = class_names(_cfg("cifar100", SHARED_DATA))
    assert len(fine) == 100 and fine[:3] == ["apple", "aquarium_fish", "baby"]
    human = SimpleNamespace(kind="human", label_set="noisy_coarse")
    coarse = class_names(_cfg("cifar100", SHARED_DATA), human)
    assert len(coarse) == 20 and coarse[0] == "aquatic_mammals"


def test_cifar10_names_from_batches_meta_through_the_restricted_unpickler(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=2))
    assert class_names(_cfg("cifar10", tmp_path)) == names
    # a pickle that would run code is refused by the restricted unpickler: numbered names, no error
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": SimpleNamespace(a=1)}))
    assert class_names(_cfg("cifar10", tmp_path)) == [str(i) for i in range(10)]


def test_streamed_datasets_names_and_the_numbered_fallback(tmp_path):
    for c in ("zebra", "apple", "mango"):
        (tmp_path / "train" / c).mkdir(parents=True)
    assert class_names(_cfg("imagefolder", tmp_path)) == ["apple", "mango", "zebra"]
    assert class_names(_cfg("imagefolder", tmp_path), num_classes=4) == ["0", "1", "2", "3"]  # another count
    assert class_names(_cfg("imagefolder", tmp_path / "absent"), num_classes=2) == ["0", "1"]
    meta = tmp_path / "Food-101N_release" / "meta"
    meta.mkdir(parents=True)
    (meta / "classes.txt").write_text("class_name\napple_pie\nbaby_back_ribs\n")
    assert class_names(_cfg("food101n", tmp_path)) == ["apple_pie", "baby_back_ribs"]
    info = tmp_path / "webvision" / "info"
    info.mkdir(parents=True)
    (info / "synsets.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\nn01484850 great white\n")
    assert class_names(_cfg("webvision", tmp_path, num_classes=2)) == ["tench, Tinca tinca", "goldfish"]
    assert class_names(_cfg("webvision", tmp_path)) == [str(i) for i in range(50)]  # 3 names for 50 classes
    assert class_names(_cfg("digits")) == [str(i) for i in range(10)]


def test_summary_json_is_read(run_copy):
    (run_copy / "summary.json").write_text(json.dumps({"peers": []}))
    assert open_trained_run(str(run_copy)).summary == {"peers": []}
    (run_copy / "summary.json").unlink()
    assert open_trained_run(str(run_copy)).summary == {}
    shutil.rmtree(run_copy / "best_checkpoint")
    with pytest.raises(CheckpointError, match="best_checkpoint does not exist; this run has: 3, 2"):
        open_trained_run(str(run_copy), "best")
