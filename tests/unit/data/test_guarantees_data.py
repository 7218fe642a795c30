"""The resident data's batches (README: every peer gets the same samples in the same batches, each with its own
augmentation; the placement does not change the result), issue 19 point 0.

A peer's view of a batch must depend only on (seed, epoch, peer): a worker hosting peer 1 alone must see exactly
what a worker hosting both peers shows peer 1, or ``ray.placement`` would change the training.
"""

from __future__ import annotations

import numpy as np
import torch

from cmd_dist.config import load_config
from cmd_dist.data.augment import normalize
from cmd_dist.data.prepare import prepare_data
from tests.image_fixtures import make_cifar10

N, BATCH = 40, 16


def _data(tmp_path, augment: bool = True):
    root = make_cifar10(tmp_path / "data", np.arange(N) % 10)
    cfg = load_config(None, ["data.dataset=cifar10", f"data.root={root}", f"data.augment={str(augment).lower()}"])
    return prepare_data(cfg.data, cfg.noise)


def test_every_peer_sees_the_same_samples_with_its_own_augmentation_whatever_the_placement(tmp_path):
    data = _data(tmp_path)
    assert data.spec.pad > 0 and data.spec.flip  # CIFAR's crop and flip: views can differ
    both = list(data.epoch_batches(1, [0, 1], BATCH, seed=3))
    alone = {k: list(data.epoch_batches(1, [k], BATCH, seed=3)) for k in (0, 1)}
    assert [int(b.ids.shape[0]) for b in both] == [16, 16, 8]
    assert sorted(torch.cat([b.ids for b in both]).tolist()) == list(range(N))  # each sample once per epoch
    for i, b in enumerate(both):
        assert torch.equal(b.y, data.train_labels[b.ids]) and torch.equal(b.clean, data.train_clean[b.ids])
        assert not torch.equal(b.xs[0], b.xs[1])  # the peers' own augmentations
        for k in (0, 1):  # a worker hosting peer k alone: the same samples, the same view
            assert torch.equal(alone[k][i].ids, b.ids)
            assert torch.equal(alone[k][i].xs[0], b.xs[k])
    again = list(data.epoch_batches(1, [0, 1], BATCH, seed=3))
    assert all(torch.equal(a.xs[1], b.xs[1]) for a, b in zip(again, both))  # a function of (seed, epoch, peer)
    other = list(data.epoch_batches(2, [0, 1], BATCH, seed=3))
    assert not torch.equal(torch.cat([b.ids for b in other]), torch.cat([b.ids for b in both]))


def test_without_augmentation_every_peer_sees_the_images_themselves(tmp_path):
    data = _data(tmp_path, augment=False)
    for b in data.epoch_batches(0, [0, 1], BATCH, seed=0):
        want = normalize(data.train_x[b.ids], data.mean, data.std)
        assert torch.equal(b.xs[0], want) and torch.equal(b.xs[1], want)


def test_a_streamed_search_without_a_val_folder_holds_out_training_images_and_reads_nothing_else(tmp_path):
    """Appendix A.2 for streamed data: an ImageFolder without ``val/`` under ``data.protocol=search`` holds out
    ``data.val_fraction`` of its training images; it reads the training list only (never test, no "val" split),
    and the held-out images are not trained on."""
    from cmd_dist.config import load_config
    from cmd_dist.data.streamed import build_streamed
    from tests.image_fixtures import make_imagefolder

    root = make_imagefolder(tmp_path / "imgs", per_class=10, splits=("train", "test"))
    overrides = [
        "data.dataset=imagefolder",
        f"data.root={root}",
        "data.image_size=32",
        "noise.kind=symmetric",
        "data.workers=0",
        "data.protocol=search",
    ]
    cfg = load_config(None, overrides)
    d = build_streamed(cfg.data, cfg.noise, workers=0)
    assert d.splits_read == ["train"]
    assert d.eval_split == "val" and d.eval_sets == ["val"]
    held_out = set(d.evals["val"].rel.tolist())
    trained = set(d.train.rel.tolist())
    everything = build_streamed(load_config(None, [*overrides[:-1]]).data, cfg.noise, workers=0).train.rel.tolist()
    assert len(held_out) == round(len(everything) * cfg.data.val_fraction) and not held_out & trained
    assert held_out | trained == set(everything)
