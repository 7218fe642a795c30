"""Dataset loading: CIFAR pickle layouts, protocols, restricted unpickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cmd_dist.config import load_config
from cmd_dist.data.prepare import prepare_data
from cmd_dist.data.resident import load_cifar
from cmd_dist.errors import DataError


def _write(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _fake_cifar10(root, n_per_batch=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        _write(
            folder / name, {b"data": data, b"labels": rng.integers(0, 10, n_per_batch).tolist(), b"batch_label": b"x"}
        )
    return folder


def test_cifar10_batches_are_concatenated_in_order(tmp_path):
    folder = _fake_cifar10(tmp_path)
    x, y = load_cifar("cifar10", tmp_path, "train")
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    first = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")
    assert torch.equal(x[0], torch.from_numpy(first[b"data"][0].reshape(3, 32, 32)))
    xt, yt = load_cifar("cifar10", tmp_path, "test")
    assert xt.shape[0] == 20


def test_search_protocol_never_reads_the_test_file(tmp_path):
    folder = _fake_cifar10(tmp_path)
    (folder / "test_batch").unlink()  # a search must not need it
    cfg = load_config(None, ["data.dataset=cifar10", f"data.root={tmp_path}", "data.protocol=search"])
    data = prepare_data(cfg.data, cfg.noise)
    assert data.splits_read == ["train"] and data.eval_split == "val"
    assert data.num_train == 90 and data.eval_x.shape[0] == 10
    # Validation keeps clean labels; training labels are the corrupted ones.
    final = load_config(None, ["data.dataset=cifar10", f"data.root={tmp_path}", "data.protocol=final"])
    with pytest.raises(DataError, match="test_batch"):
        prepare_data(final.data, final.noise)


def test_noise_is_applied_to_the_training_labels_only(tmp_path):
    cfg = load_config(None, ["data.protocol=search", "noise.rate=0.4"])
    data = prepare_data(cfg.data, cfg.noise)
    rate = (data.train_labels != data.train_clean).float().mean().item()
    assert 0.3 < rate < 0.5
    full = load_config(None, ["data.protocol=final", "noise.rate=0.0"])
    clean = prepare_data(full.data, full.noise)
    assert torch.equal(clean.train_labels, clean.train_clean)


def test_wrong_array_in_pickle_is_named(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write(folder / "train", {"data": np.zeros((3, 10), dtype=np.uint8), "fine_labels": [0, 1, 2]})
    with pytest.raises(DataError, match="uint8 N x 3072"):
        load_cifar("cifar100", tmp_path, "train")
