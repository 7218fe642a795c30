"""data.decode: JPEGs decoded on the training device (nvJPEG) and every view cut there by batched tensor ops.

The crops are device-agnostic tensor functions, so they are checked here on CPU tensors against the CPU
path (torchvision's resized_crop / resize + centre crop, train_view's seeded draws); the whole device path
runs on the CPU too (torchvision's decode_jpeg takes device="cpu") and must give the CPU path's batches;
the same on a GPU runs only where CUDA is.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from cmd_dist.config import ConfigError, load_config
from cmd_dist.data.device_decode import VIEW_PARAMS, nvjpeg_size, plan_groups, resized_crops, view_params
from cmd_dist.data.prepare import prepare_data
from cmd_dist.data.streamed import IMAGENET_STD, StreamedData, build_streamed, decode_mode
from cmd_dist.data.types import Shard
from cmd_dist.data.views import eval_view, train_view
from cmd_dist.errors import DataError
from tests.image_fixtures import jpeg_bytes, make_imagefolder, make_webvision

# One uint8 level after normalisation, the largest of the three channels (the CPU path rounds its uint8
# resize in fixed point, the device path in float: they differ by at most one level).
ONE_LEVEL = 1.0 / (255 * min(IMAGENET_STD)) + 1e-4


def _cfg(dataset: str, root, *overrides: str):
    noise = "noise.kind=none" if dataset != "imagefolder" else "noise.kind=symmetric"
    extra = ("data.num_classes=4",) if dataset == "webvision" else ()
    return load_config(
        None,
        [f"data.dataset={dataset}", f"data.root={root}", "data.image_size=32", noise, "data.workers=0", *extra]
        + list(overrides),
    )


def _data(cfg, decode: str, device="cpu", workers: int = 0) -> StreamedData:
    d = build_streamed(cfg.data, cfg.noise, workers=workers)
    d.decode, d.device = decode, device  # "device" on a CPU tensor: the GPU path's code, run on the CPU
    d.log = lambda msg: None
    return d


@pytest.fixture(scope="module")
def webvision_root(tmp_path_factory):
    return make_webvision(tmp_path_factory.mktemp("wv"), classes=4, per_class=6, corrupt=True)


def _images(seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(40, 48), (48, 40), (256, 340), (300, 200), (20, 90), (33, 33)]
    imgs = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in shapes]
    return [im.to(dtype) for im in imgs]


def _cut(images: list[torch.Tensor], params: np.ndarray, size: int) -> torch.Tensor:
    """resized_crops in the order plan_groups chooses, put back in the images' order (as DeviceDecoder.batch does)."""
    order, groups = plan_groups([tuple(im.shape[1:]) for im in images])
    p = torch.from_numpy(np.ascontiguousarray(params[:, order]))
    out = resized_crops([images[j] for j in order], p, groups, size)
    return out.index_select(1, torch.from_numpy(np.argsort(order)))


# ----------------------------------------------------------------------------- the tensor functions


def test_resized_crops_are_torchvisions_antialiased_resized_crop_and_flip():
    images, size = _images(), 32
    rng = np.random.default_rng(0)
    rows, expected = [], []
    for im in images:
        h, w = im.shape[1:]
        ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))  # up- and downsampling, thin boxes
        top, left, flip = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), int(rng.random() < 0.5)
        rows.append((top, ch, size, 0, left, cw, size, 0, flip))
        ref = TF.resized_crop(im, top, left, ch, cw, [size, size], antialias=True)
        expected.append(TF.horizontal_flip(ref) if flip else ref)
    out = _cut(images, np.asarray(rows, dtype=np.int64)[None], size)
    assert out.shape == (1, len(images), 3, size, size) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.stack(expected), atol=1e-3, rtol=0)


def test_eval_view_params_are_resize_shorter_side_then_centre_crop():
    images, size = _images(1), 32
    params = np.stack([view_params(im.shape[1], im.shape[2], size, (), 0, 0, 0, True) for im in images], 1)
    assert params.shape == (1, len(images), VIEW_PARAMS)
    expected = [
        TF.center_crop(TF.resize(im, [int(round(size / 0.875))], antialias=True), [size, size]) for im in images
    ]
    torch.testing.assert_close(_cut(images, params, size)[0], torch.stack(expected), atol=1e-3, rtol=0)
    u8 = _images(1, torch.uint8)  # the CPU path's own function, on uint8: within one level
    out = _cut(u8, params, size)[0].round()
    assert (out - torch.stack([eval_view(im, size) for im in u8]).float()).abs().max() <= 1


def test_train_view_params_draw_the_cpu_paths_crops_and_flips():
    """Peer k's view of sample i: the same seeded box and flip as train_view, so the same pixels up to rounding."""
    images, size, seed, epoch = _images(2, torch.uint8), 32, 5, 3
    peers = (0, 1, 2)
    params = np.stack(
        [view_params(im.shape[1], im.shape[2], size, peers, seed, epoch, i, True) for i, im in enumerate(images)], 1
    )
    out = _cut(images, params, size).round()
    flips = 0
    for k in peers:
        for i, im in enumerate(images):
            ref = train_view(im, size, np.random.default_rng([seed, epoch, k, i])).float()
            assert (out[k, i] - ref).abs().max() <= 1, (k, i)
            assert (out[k, i] - ref).abs().mean() < 0.5
            flips += int(params[k, i, 8])
    assert 0 < flips < len(peers) * len(images)  # both flip outcomes are exercised
    again = np.stack(
        [view_params(im.shape[1], im.shape[2], size, peers, seed, epoch, i, True) for i, im in enumerate(images)], 1
    )
    assert (again == params).all()  # a function of (seed, epoch, peer, sample) only
    other = np.stack(
        [view_params(im.shape[1], im.shape[2], size, peers, seed, epoch + 1, i, True) for i, im in enumerate(images)], 1
    )
    assert (other != params).any()
    no_aug = view_params(40, 48, size, peers, seed, epoch, 0, False)  # data.augment=false: every peer the centre
    assert no_aug.shape == (3, VIEW_PARAMS) and (no_aug == view_params(40, 48, size, (), 0, 0, 0, True)).all()


def test_plan_groups_takes_every_image_once_with_bounded_padding():
    shapes = [(256, 256 + (7 * i) % 128) for i in range(40)] + [(256 + (5 * i) % 128, 256) for i in range(40)]
    shapes += [(2000, 3000), (20, 20)]
    order, groups = plan_groups(shapes)
    assert sorted(order) == list(range(len(shapes)))
    assert (
        [a for a, _ in groups][1:] == [b for _, b in groups][:-1] and groups[0][0] == 0 and groups[-1][1] == len(shapes)
    )
    for a, b in groups:
        members = [shapes[j] for j in order[a:b]]
        padded = (b - a) * max(h for h, _ in members) * max(w for _, w in members)
        assert b - a == 1 or padded <= 1.5 * sum(h * w for h, w in members)
    assert len(groups) < 10  # similar sizes share a group: a few products per batch, not one per image
    assert plan_groups([]) == ([], [])


def test_nvjpeg_size_reads_the_frame_header_and_sends_everything_else_to_the_cpu():
    import io

    from PIL import Image

    data = jpeg_bytes(0, 1, (40, 48))
    assert nvjpeg_size(data) == (40, 48) and nvjpeg_size(bytearray(data)) == (40, 48)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(buf, "JPEG", progressive=True)
    assert nvjpeg_size(buf.getvalue()) == (30, 50)
    assert nvjpeg_size(data[: len(data) // 3]) is None  # truncated: no end marker
    buf = io.BytesIO()
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(buf, "PNG")
    assert nvjpeg_size(buf.getvalue()) is None
    assert nvjpeg_size(b"not an image at all") is None


# ----------------------------------------------------------------------------- the device path, run on the CPU


def _same_batches(cpu_batches, dev_batches, tol=ONE_LEVEL):
    assert len(cpu_batches) == len(dev_batches)
    for a, b in zip(cpu_batches, dev_batches):
        assert torch.equal(a.ids, b.ids.cpu()) and torch.equal(a.y, b.y.cpu()) and torch.equal(a.clean, b.clean.cpu())
        assert a.share == b.share and len(a.xs) == len(b.xs)
        for xa, xb in zip(a.xs, b.xs):
            assert xb.shape == xa.shape and xb.dtype == torch.float32
            assert (xa - xb.cpu()).abs().max() <= tol


def test_device_path_gives_the_cpu_paths_batches(webvision_root):
    cfg = _cfg("webvision", webvision_root)
    cpu, dev = _data(cfg, "cpu"), _data(cfg, "device")
    for epoch in (0, 1):
        a, b = list(cpu.epoch_batches(epoch, [0, 1], 5, 0)), list(dev.epoch_batches(epoch, [0, 1], 5, 0))
        _same_batches(a, b)
        assert all(not torch.equal(x.xs[0], x.xs[1]) for x in b)  # each peer its own crop and flip
    assert dev.skipped_images == cpu.skipped_images == 1 and list(dev.skipped) == list(cpu.skipped)
    again = list(_data(cfg, "device", workers=2).epoch_batches(1, [0, 1], 5, 0))  # loader processes: same pixels
    _same_batches(b, again, tol=0)
    for split in dev.eval_sets:
        ea, eb = list(cpu.eval_batches(4, split=split)), list(dev.eval_batches(4, split=split))
        assert len(ea) == len(eb)
        for (xa, ya), (xb, yb) in zip(ea, eb):
            assert torch.equal(ya, yb) and xb.shape == xa.shape and (xa - xb).abs().max() <= ONE_LEVEL
    mean = torch.cat([x for x, _ in eb]).mean().item()
    assert abs(mean) < 3  # normalised


def test_device_path_replica_slices_are_the_whole_batch(webvision_root):
    cfg = _cfg("webvision", webvision_root)
    whole = list(_data(cfg, "device").epoch_batches(1, [0, 1], 7, 0))
    parts = [list(_data(cfg, "device").epoch_batches(1, [0, 1], 7, 0, shard=Shard(j, 2))) for j in range(2)]
    for b, batch in enumerate(whole):
        assert torch.equal(torch.cat([p[b].ids for p in parts]), batch.ids)
        for k in (0, 1):
            assert torch.equal(torch.cat([p[b].xs[k] for p in parts]), batch.xs[k])


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="decoding with nvJPEG needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_device_path_skips_and_counts_unreadable_files_and_decodes_other_formats_on_the_cpu(tmp_path, device):
    root = make_imagefolder(tmp_path, per_class=4)  # 4 JPEGs + 1 PNG per class
    data = jpeg_bytes(0, 1, (40, 48))
    sos = data.index(b"\xff\xda")
    # a whole-looking JPEG (header, end marker) whose scan is garbage: the batched decode fails, then the file alone
    (root / "train" / "cat" / "0000.jpg").write_bytes(data[:sos] + b"\xff\xda\x00\x0c" + bytes(200) + b"\xff\xd9")
    (root / "train" / "dog" / "0002.jpg").write_bytes(b"not an image at all")
    (root / "train" / "fox" / "0003.jpg").write_bytes(data[: len(data) // 3])
    cfg = _cfg("imagefolder", root, "noise.rate=0")
    cpu, dev = _data(cfg, "cpu"), _data(cfg, "device", device)
    messages = []
    dev.log = messages.append
    (root / "train" / "cat" / "0002.jpg").unlink()  # vanishes after the list was read
    a, b = list(cpu.epoch_batches(0, [0, 1], 4, 0)), list(dev.epoch_batches(0, [0, 1], 4, 0))
    _same_batches(a, b, ONE_LEVEL if device == "cpu" else 64 * ONE_LEVEL)  # nvJPEG: see the test on CUDA below
    assert sorted(dev.skipped) == sorted(cpu.skipped) and dev.skipped_images == 4
    assert len(messages) == 4 and all("skipped unreadable image" in m for m in messages)
    kept = torch.cat([x.ids for x in b]).cpu()
    pngs = [j for j, rel in enumerate(dev.train.rel.tolist()) if rel.endswith(b".png")]
    assert set(pngs) <= set(kept.tolist())  # PNGs decoded in the loader, cut on the device like the rest


def test_device_path_all_unreadable_replica_slice_stops_with_one_line(tmp_path):
    root = make_imagefolder(tmp_path, classes=("cat", "dog"), per_class=2, png=False)
    for f in (root / "train").rglob("*.jpg"):
        f.write_bytes(b"garbage")
    d = _data(_cfg("imagefolder", root), "device")
    with pytest.raises(DataError, match="every image of replica 1's slice"):
        list(d.epoch_batches(0, [0], 4, 0, shard=Shard(1, 2)))
    assert list(_data(_cfg("imagefolder", root), "device").epoch_batches(0, [0], 4, 0)) == []


# ----------------------------------------------------------------------------- choosing the decoder


def test_auto_decodes_on_the_gpu_only_for_a_cuda_worker(webvision_root):
    assert decode_mode("auto", "cpu") == "cpu" and decode_mode("auto", torch.device("cuda:0")) == "device"
    assert decode_mode("cpu", "cuda") == "cpu" and decode_mode("cuda", "cuda:1") == "device"
    cfg = _cfg("webvision", webvision_root)
    assert cfg.data.decode == "auto"
    assert prepare_data(cfg.data, cfg.noise, "cpu").decode == "cpu"
    assert build_streamed(cfg.data, cfg.noise, device="cuda").decode == "device"  # resolved, nothing decoded yet


def test_decode_cuda_on_a_cpu_worker_is_one_line_naming_the_key(webvision_root):
    cfg = _cfg("webvision", webvision_root, "data.decode=cuda")
    with pytest.raises(DataError) as info:
        prepare_data(cfg.data, cfg.noise, "cpu")
    assert str(info.value).startswith("data.decode: cuda") and "\n" not in str(info.value)
    assert build_streamed(cfg.data, cfg.noise).decode == "cpu"  # the preflight's look at the lists: no device yet


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["data.decode=gpu"], "data.decode: 'gpu' is not one of auto, cpu, cuda"),
        (["data.dataset=imagefolder", "data.decode=cuda", "ray.use_gpu=false"], "data.decode: cuda decodes on"),
        (["data.dataset=cifar100", "data.decode=cuda"], "data.decode: cuda applies to streamed datasets"),
    ],
)
def test_decode_config_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_cli_decode_cuda_without_gpus_is_one_line_exit_2_before_ray(tmp_path, capsys, monkeypatch):
    import cmd_dist
    from cmd_dist import cli

    root = make_imagefolder(tmp_path / "data", per_class=2)
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "cmd_dist.launch.job", None)
    monkeypatch.delattr(cmd_dist.launch, "job", raising=False)
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        cli.main(
            ["train", "configs/demo.yaml", "data.dataset=imagefolder", f"data.root={root}", "data.decode=cuda"]
            + ["ray.use_gpu=false", f"output_dir={out}"]
        )
    err = capsys.readouterr().err.splitlines()
    assert info.value.code == 2 and len(err) == 1 and "data.decode" in err[0] and not out.exists()


# ----------------------------------------------------------------------------- on a GPU


@CUDA
def test_nvjpeg_path_on_cuda_gives_the_cpu_paths_batches(webvision_root):
    cfg = _cfg("webvision", webvision_root, "data.decode=cuda")
    dev = prepare_data(cfg.data, cfg.noise, "cuda")
    assert dev.decode == "device"
    dev.log = lambda msg: None
    cpu = _data(cfg, "cpu")
    a, b = list(cpu.epoch_batches(0, [0, 1], 5, 0)), list(dev.epoch_batches(0, [0, 1], 5, 0))
    assert len(a) == len(b) and dev.skipped_images == cpu.skipped_images == 1
    for x, y in zip(a, b):
        assert y.ids.device.type == y.xs[0].device.type == "cuda" and y.xs[0].dtype == torch.float32
        assert torch.equal(x.ids, y.ids.cpu()) and torch.equal(x.y, y.y.cpu())
        for xa, xb in zip(x.xs, y.xs):
            # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a few levels apart on these noisy
            # images; another crop or flip of them is some 19 levels apart on average
            diff = (xa - xb.cpu()).abs() / ONE_LEVEL
            assert diff.mean() < 3.0 and diff.max() < 64, (diff.mean(), diff.max())
    (xa, ya), (xb, yb) = next(iter(cpu.eval_batches(4))), next(iter(dev.eval_batches(4)))
    assert torch.equal(ya, yb.cpu()) and ((xa - xb.cpu()).abs() / ONE_LEVEL).mean() < 3.0


@CUDA
def test_cutting_views_on_cuda_never_waits_for_the_device():
    images = [im.cuda() for im in _images(3, torch.uint8)]
    params = np.stack(
        [view_params(im.shape[1], im.shape[2], 64, (0, 1), 0, 0, i, True) for i, im in enumerate(images)], 1
    )
    order, groups = plan_groups([tuple(im.shape[1:]) for im in images])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = torch.from_numpy(np.ascontiguousarray(params[:, order])).pin_memory().cuda(non_blocking=True)
        out = resized_crops([images[j] for j in order], p, groups, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = _cut([im.cpu() for im in images], params, 64)
    torch.testing.assert_close(out.cpu().index_select(1, torch.from_numpy(np.argsort(order))), ref, atol=0.5, rtol=0)


# ----------------------------------------------------------------------------- the prepared GPU script


def test_gpu_check_stage_d_runs_the_input_pipeline_rows(tmp_path):
    """benchmarks/gpu_check.py --data-budget: the data_throughput rows in the table (on CPU: the CUDA rows skipped)."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("cmd_gpu_check_d", f"{REPO}/benchmarks/gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gc
    spec.loader.exec_module(gc)
    out = tmp_path / "out"
    args = ["--device", "cpu", "--tiny", "--data-root", str(tmp_path), "--out", str(out), "--skip", "a", "b", "c"]
    info = gc.main(args + ["--data-budget", "300"])
    d = info["data"]
    assert d["rc"] == 0 and d["tests_rc"] == 0, (d["log_tail"], d["tests_tail"])
    assert "skipped" in d["tests_tail"] or "passed" in d["tests_tail"]  # the CUDA tests ran (here: skip) first
    assert [r["key"] for r in d["rows"]] == ["a", "b", "c", "e", "f"] and all(r["images_per_s"] > 0 for r in d["rows"])
    assert "rows (g), (h) skipped" in d["skipped"][0]
    table = (out / "gpu_check.md").read_text()
    assert "| (d) | (e) cnn_small training step fed by (b) | |" in table and "of the resident step (f)" in table
    assert gc.main(args)["data"] is None  # no --data-budget: no stage d
