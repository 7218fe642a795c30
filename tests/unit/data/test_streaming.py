"""Streamed image datasets (webvision, food101n, imagefolder) on real JPEG fixtures in their exact layouts.

Same samples in the same batches for every peer whatever the placement or the number of loader
processes, each peer with its own augmentation; deterministic per (seed, epoch); corrupt images
skipped, warned about and counted; missing lists and class folders are one-line errors.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from cmd_dist.config import load_config
from cmd_dist.data.prepare import check_data, prepare_data
from cmd_dist.data.streamed import StreamedData, build_streamed
from cmd_dist.data.types import Shard
from cmd_dist.data.views import random_resized_crop_box, sample_order
from cmd_dist.errors import DataError
from tests.image_fixtures import (
    corrupt_jpeg,
    make_food101n,
    make_imagefolder,
    make_webvision,
)


def _cfg(dataset: str, root, *overrides: str):
    noise = "noise.kind=none" if dataset != "imagefolder" else "noise.kind=symmetric"
    if dataset == "webvision" and not any(o.startswith("data.num_classes") for o in overrides):
        overrides = ("data.num_classes=4", *overrides)  # the fixture's class count (the default is 50)
    return load_config(
        None,
        [f"data.dataset={dataset}", f"data.root={root}", "data.image_size=32", noise, "data.workers=0", *overrides],
    )


@pytest.fixture(scope="module")
def webvision_root(tmp_path_factory):
    return make_webvision(tmp_path_factory.mktemp("wv"), classes=4, per_class=6, corrupt=True)


def _data(cfg, workers: int = 0) -> StreamedData:
    d = build_streamed(cfg.data, cfg.noise, workers=workers)
    d.log = lambda msg: None
    return d


def _epoch(data: StreamedData, peers, epoch=0, batch=5, seed=0):
    return list(data.epoch_batches(epoch, peers, batch, seed, "cpu"))


# ----------------------------------------------------------------------------- layouts and protocols


def test_webvision_keeps_the_first_num_classes_and_uses_imagenet_val_as_test(webvision_root):
    cfg = _cfg("webvision", webvision_root, "data.num_classes=3")
    d = _data(cfg)
    assert d.spec.num_classes == 3 and d.spec.size == 32
    assert d.num_train == 3 * 6 + 1  # the corrupt file is listed (class 0); it is found out when decoded
    assert set(d.train.labels.tolist()) == {0, 1, 2}
    assert (d.train.clean == -1).all() and math.isnan(d.noise_rate)  # real noise: no clean labels known
    assert d.eval_split == "test" and d.eval_sets == ["test", "webvision_val"]
    assert d.evals["test"].name == "imagenet-val" and len(d.evals["test"]) == 3 * 2
    assert d.splits_read == ["train", "imagenet_val", "webvision_val"]
    search = _data(_cfg("webvision", webvision_root, "data.protocol=search"))
    assert search.eval_split == "val" and search.evals["val"].name == "webvision-val"
    assert "imagenet_val" not in search.splits_read and search.spec.num_classes == 4


def test_webvision_flickr_list_adds_its_images(tmp_path):
    root = make_webvision(tmp_path, classes=2, per_class=3, imagenet=False)
    info = root / "webvision" / "info"
    (info / "train_filelist_flickr.txt").write_text(
        "flickr/q0001/a.jpg 0\nflickr/q0002/b.jpg 1\nflickr/q0009/c.jpg 8\n"
    )
    both = _data(_cfg("webvision", root, "data.num_classes=2", "data.webvision_sources=[google, flickr]"))
    google = _data(_cfg("webvision", root, "data.num_classes=2"))
    assert both.num_train == google.num_train + 2  # class 8 is beyond the first 2
    assert b"flickr/q0002/b.jpg" in both.train.rel.tolist()
    (info / "train_filelist_flickr.txt").unlink()
    cfg = _cfg("webvision", root, "data.num_classes=2", "data.webvision_sources=[google, flickr]")
    with pytest.raises(DataError, match="train_filelist_flickr.txt"):
        check_data(cfg.data, cfg.noise)


def test_webvision_without_imagenet_tests_on_webvision_val(tmp_path):
    root = make_webvision(tmp_path, classes=2, per_class=3, imagenet=False)
    d = _data(_cfg("webvision", root, "data.num_classes=2"))
    assert d.eval_split == "test" and d.evals["test"].name == "webvision-val" and d.eval_sets == ["test"]


def test_food101n_verified_flags_give_clean_labels_noise_rate_and_the_search_validation(tmp_path):
    root = make_food101n(tmp_path)
    d = _data(_cfg("food101n", root))
    assert d.spec.num_classes == 3 and d.num_train == 18 and len(d.evals["test"]) == 6
    # One verified-right and one verified-wrong image per class in verified_train: estimated rate 1/2.
    assert d.noise_rate == pytest.approx(0.5)
    known = d.train.clean >= 0
    assert known.sum() == 6 and (d.train.clean[known] == d.train.labels[known]).all()
    s = _data(_cfg("food101n", root, "data.protocol=search"))
    assert s.eval_split == "val" and len(s.evals["val"]) == 3 and s.num_train == 15  # verified_val held out
    held = {p for p in s.evals["val"].rel.tolist()}
    assert not held & set(s.train.rel.tolist())
    f = _data(_cfg("food101n", root, "data.food_train=food101"))
    assert f.num_train == 3 and f.train.name == "food101-train"


def test_imagefolder_synthetic_noise_realised_rate_and_splits(tmp_path):
    root = make_imagefolder(tmp_path, per_class=20)
    d = _data(_cfg("imagefolder", root, "noise.rate=0.5", "noise.seed=3"))
    assert d.spec.num_classes == 3 and d.num_train == 3 * 21  # 20 JPEGs + 1 PNG per class
    realised = float((d.train.labels != d.train.clean).mean())
    assert d.noise_rate == pytest.approx(realised) and 0.3 < realised < 0.7
    s = _data(_cfg("imagefolder", root, "data.protocol=search"))
    assert s.evals["val"].name == "imagefolder-val" and (s.evals["val"].labels == s.evals["val"].clean).all()
    only_train = make_imagefolder(tmp_path / "t", splits=("train",), per_class=10)
    h = _data(_cfg("imagefolder", only_train, "data.protocol=search"))  # no val/: 10% held out, clean labels
    assert len(h.evals["val"]) == 3 and h.num_train == 30
    assert (h.evals["val"].labels == h.evals["val"].clean).all()


def test_train_subset_is_a_seeded_sample_of_all_classes(tmp_path):
    root = make_imagefolder(tmp_path, per_class=20, png=False)
    a = _data(_cfg("imagefolder", root, "data.train_subset=12"))
    b = _data(_cfg("imagefolder", root, "data.train_subset=12"))
    assert a.num_train == 12 and (a.train.rel == b.train.rel).all()
    assert len(set(a.train.clean.tolist())) == 3  # a prefix of the class-sorted list would be one class


# ----------------------------------------------------------------------------- same samples, same order


def test_every_peer_gets_the_same_ids_with_its_own_augmentation(webvision_root):
    d = _data(_cfg("webvision", webvision_root))
    batches = _epoch(d, [0, 1])
    for b in batches:
        assert len(b.xs) == 2 and b.xs[0].shape == b.xs[1].shape == (len(b.ids), 3, 32, 32)
        assert b.xs[0].dtype == torch.float32 and b.y.dtype == b.clean.dtype == b.ids.dtype == torch.long
        assert not torch.equal(b.xs[0], b.xs[1])  # different crops / flips
    ids = torch.cat([b.ids for b in batches])
    assert sorted(ids.tolist()) == sorted(set(range(d.num_train)) - {1})  # all but the corrupt one, once each
    assert torch.equal(torch.cat([b.y for b in batches]), torch.from_numpy(d.train.labels)[ids])


def test_batches_do_not_depend_on_placement_or_loader_processes(webvision_root):
    cfg = _cfg("webvision", webvision_root)
    together = _epoch(_data(cfg), [0, 1], epoch=2)
    alone = [_epoch(_data(cfg, workers=2), [k], epoch=2) for k in (0, 1)]  # separate workers, 2 loader procs
    assert len(together) == len(alone[0]) == len(alone[1])
    for t, a0, a1 in zip(together, *alone):
        assert torch.equal(t.ids, a0.ids) and torch.equal(t.ids, a1.ids)
        assert torch.equal(t.xs[0], a0.xs[0]) and torch.equal(t.xs[1], a1.xs[0])


def test_replica_shards_decode_their_slice_and_together_are_the_whole_batch(webvision_root):
    """ray.replicas_per_peer: replica j of a peer decodes only its slice; the slices concatenate to the batch."""
    cfg = _cfg("webvision", webvision_root)
    data = _data(cfg)
    whole = _epoch(data, [0, 1], epoch=1, batch=7)
    parts = [list(_data(cfg).epoch_batches(1, [0, 1], 7, 0, "cpu", shard=Shard(j, 2))) for j in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for b, batch in enumerate(whole):
        assert torch.equal(torch.cat([p[b].ids for p in parts]), batch.ids)
        for k in (0, 1):
            assert torch.equal(torch.cat([p[b].xs[k] for p in parts]), batch.xs[k])
        # the corrupt file leaves its replica's slice one image short: the shares say so
        assert sum(p[b].share for p in parts) == pytest.approx(len(batch.ids) / min(7, data.num_train - 7 * b))
    evals = [list(_data(cfg).eval_batches(2, "cpu", shard=Shard(j, 2))) for j in range(2)]
    assert sum(int(y.shape[0]) for e in evals for _, y in e) == sum(
        int(y.shape[0]) for _, y in _data(cfg).eval_batches(2, "cpu")
    )


def test_a_replica_whose_whole_slice_is_unreadable_stops_with_one_line(tmp_path):
    root = make_imagefolder(tmp_path, classes=("cat", "dog"), per_class=2, png=False)
    for f in (root / "train").rglob("*.jpg"):
        corrupt_jpeg(f)
    d = _data(_cfg("imagefolder", root))
    with pytest.raises(DataError, match="every image of replica 1's slice"):
        list(d.epoch_batches(0, [0], 4, 0, "cpu", shard=Shard(1, 2)))


def test_augment_false_gives_every_peer_the_centre_crop(webvision_root):
    d = _data(_cfg("webvision", webvision_root, "data.augment=false"))
    b = _epoch(d, [0, 1])[0]
    assert torch.equal(b.xs[0], b.xs[1])
    alone = _epoch(d, [1])[0]  # peer 1 in a worker of its own: the same centre crop
    assert torch.equal(alone.ids, b.ids) and torch.equal(alone.xs[0], b.xs[0])
    augmented = _epoch(_data(_cfg("webvision", webvision_root)), [0])[0]
    assert torch.equal(augmented.ids, b.ids) and not torch.equal(augmented.xs[0], b.xs[0])


def test_order_and_pixels_are_a_function_of_seed_and_epoch(webvision_root):
    d = _data(_cfg("webvision", webvision_root))
    e0, e0b, e1 = _epoch(d, [0]), _epoch(d, [0]), _epoch(d, [0], epoch=1)
    assert all(torch.equal(a.ids, b.ids) and torch.equal(a.xs[0], b.xs[0]) for a, b in zip(e0, e0b))
    assert not torch.equal(torch.cat([b.ids for b in e0]), torch.cat([b.ids for b in e1]))
    other_seed = _epoch(d, [0], seed=1)
    assert not torch.equal(torch.cat([b.ids for b in e0]), torch.cat([b.ids for b in other_seed]))
    assert torch.equal(sample_order(0, 0, 25), sample_order(0, 0, 25))


def test_sample_order_is_the_engines_epoch_order():
    from cmd_dist.data.augment import epoch_order

    for seed, epoch in [(0, 0), (3, 7)]:
        assert torch.equal(sample_order(seed, epoch, 100), epoch_order(seed, epoch, 100, torch.device("cpu")))


def test_random_resized_crop_box_stays_inside_the_image():
    rng = np.random.default_rng(0)
    for h, w in [(40, 48), (256, 340), (500, 20)]:
        for _ in range(50):
            top, left, ch, cw = random_resized_crop_box(h, w, rng)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0


def test_eval_batches_are_deterministic_centre_crops(webvision_root):
    d = _data(_cfg("webvision", webvision_root))
    a = list(d.eval_batches(4, "cpu"))
    b = list(d.eval_batches(4, "cpu"))
    assert sum(len(y) for _, y in a) == len(d.evals["test"])
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    x, _ = a[0]
    assert x.shape[1:] == (3, 32, 32) and abs(float(x.mean())) < 3  # normalised
    extra = list(d.eval_batches(4, "cpu", split="webvision_val"))
    assert sum(len(y) for _, y in extra) == len(d.evals["webvision_val"])


# ----------------------------------------------------------------------------- bad input


def test_corrupt_images_are_skipped_warned_once_and_counted(webvision_root):
    d = build_streamed(_cfg("webvision", webvision_root).data, _cfg("webvision", webvision_root).noise, workers=1)
    messages = []
    d.log = messages.append
    _epoch(d, [0, 1])
    _epoch(d, [0, 1], epoch=1)
    assert d.skipped_images == 1 and len(messages) == 1
    assert "corrupt.jpg" in messages[0] and "skipped unreadable image" in messages[0]


def test_a_vanished_or_garbage_file_is_skipped_too(tmp_path):
    root = make_imagefolder(tmp_path, per_class=4, png=False)
    (root / "train" / "cat" / "0001.jpg").unlink()
    (root / "train" / "dog" / "0002.jpg").write_bytes(b"not an image at all")
    corrupt_jpeg(root / "train" / "fox" / "0003.jpg")
    cfg = _cfg("imagefolder", root, "noise.rate=0")
    d = _data(cfg)
    (root / "train" / "cat" / "0002.jpg").unlink()  # disappears after the list was read
    batches = _epoch(d, [0, 1], batch=4)
    assert d.skipped_images == 3
    assert sum(len(b.ids) for b in batches) == d.num_train - 3


@pytest.mark.parametrize(
    "breakage,needle",
    [
        (lambda r: (r / "webvision" / "info" / "train_filelist_google.txt").unlink(), "train_filelist_google.txt"),
        (lambda r: (r / "webvision" / "info" / "val_filelist.txt").unlink(), "val_filelist.txt"),
        (lambda r: __import__("shutil").rmtree(r / "imagenet" / "val" / "2"), "imagenet/val/2"),
        (lambda r: (r / "webvision" / "info" / "val_filelist.txt").write_text("val1.JPEG x\n"), "line 1"),
    ],
)
def test_missing_webvision_list_or_class_folder_is_a_data_error(tmp_path, breakage, needle):
    root = make_webvision(tmp_path, classes=3, per_class=2)
    breakage(root)
    cfg = _cfg("webvision", root, "data.num_classes=3")
    with pytest.raises(DataError) as info:
        check_data(cfg.data, cfg.noise)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "breakage,needle",
    [
        (lambda r: (r / "Food-101N_release" / "meta" / "imagelist.tsv").unlink(), "imagelist.tsv"),
        (lambda r: (r / "Food-101N_release" / "meta" / "verified_val.tsv").unlink(), "verified_val.tsv"),
        (lambda r: (r / "food-101" / "meta" / "test.txt").unlink(), "test.txt"),
        (lambda r: (r / "food-101" / "meta" / "test.txt").write_text("pizza/1\n"), "'pizza'"),
    ],
)
def test_missing_food101n_list_is_a_data_error(tmp_path, breakage, needle):
    root = make_food101n(tmp_path)
    breakage(root)
    cfg = _cfg("food101n", root)
    with pytest.raises(DataError) as info:
        check_data(cfg.data, cfg.noise)
    assert needle in str(info.value)


def test_imagefolder_class_folder_missing_from_test_is_a_data_error(tmp_path):
    root = make_imagefolder(tmp_path)
    __import__("shutil").rmtree(root / "test" / "dog")
    cfg = _cfg("imagefolder", root)
    with pytest.raises(DataError, match="lacks class folder"):
        check_data(cfg.data, cfg.noise)
    no_test = make_imagefolder(tmp_path / "b", splits=("train",))
    with pytest.raises(DataError, match="test"):
        check_data(_cfg("imagefolder", no_test).data, _cfg("imagefolder", no_test).noise)


def test_cli_bad_list_is_one_line_exit_2_before_ray(tmp_path, capsys, monkeypatch):
    import cmd_dist
    from cmd_dist import cli

    root = make_webvision(tmp_path / "data", classes=2, per_class=2)
    (root / "webvision" / "info" / "val_filelist.txt").unlink()
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "cmd_dist.launch.job", None)
    monkeypatch.delattr(cmd_dist.launch, "job", raising=False)
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        cli.main(
            [
                "train",
                "configs/demo.yaml",
                "data.dataset=webvision",
                f"data.root={root}",
                "noise.kind=none",
                "data.num_classes=2",
                f"output_dir={out}",
            ]
        )
    err = capsys.readouterr().err.splitlines()
    assert info.value.code == 2 and len(err) == 1 and "val_filelist.txt" in err[0] and not out.exists()


def test_prepare_data_dispatches_streamed_datasets(webvision_root):
    cfg = _cfg("webvision", webvision_root)
    d = prepare_data(cfg.data, cfg.noise, "cpu")
    assert isinstance(d, StreamedData) and d.num_train == 25 and d.workers == 0


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["data.dataset=webvision"], "noise.kind: symmetric would add synthetic noise"),
        (["data.dataset=food101n", "noise.kind=pairflip"], "use noise.kind=none"),
        (["data.image_size=16"], "data.image_size"),
        (["data.image_size=2048"], "data.image_size"),
        (["data.dataset=webvision", "noise.kind=none", "data.num_classes=1001"], "data.num_classes"),
        (["data.dataset=cifar100", "data.num_classes=50"], "applies to webvision only"),
        (["data.workers=-1"], "data.workers"),
        (["data.workers=two"], "data.workers"),
        (["data.food_train=food2k"], "data.food_train"),
        (["data.webvision_sources=[bing]"], "data.webvision_sources"),
        (["data.webvision_sources=[]"], "data.webvision_sources"),
        (["data.webvision_sources=[google, google]"], "data.webvision_sources"),
        (["data.dataset=imagenet"], "data.dataset"),
    ],
)
def test_streamed_data_config_errors_name_the_key(overrides, needle):
    from cmd_dist.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)
