"""Image datasets streamed from disk: mini-WebVision, Food-101N and any ImageFolder layout.

Only the file lists live in memory (paths as one numpy bytes array, so forked loader workers share it
without copying); images are read, decoded and augmented batch by batch in torch ``DataLoader``
worker processes with torchvision's decoders (libjpeg-turbo, PNG, WebP) and its v2 functional
transforms on uint8 tensors. The training device receives uint8 crops and normalises them there.
With ``data.decode`` on the device (the default on a CUDA worker), the loader processes only read the
files and draw the crops; nvJPEG decodes each batch and batched tensor ops cut every view on the GPU
("decoding on the training device" below).

CMD compares the peers' predictions sample by sample, so every peer sees the same samples in the
same batches: the order of an epoch is a function of (seed, epoch) only, and each peer's crop and
flip of sample ``i`` is a function of (seed, epoch, peer, i) only. Any placement of peers over
workers and any number of loader processes give the same batches and the same pixels.

Unreadable or corrupt images are skipped with a warning (once per file) and counted; every peer
meets the same files in the same batches, so they all drop the same samples.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cmd_dist.data.noise import corrupt_labels, noise_rate, split_train_val
from cmd_dist.data.types import WHOLE, Batch, DatasetSpec, Shard
from cmd_dist.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
#: Evaluation resizes the shorter side to image_size / 0.875 and takes the centre crop (ImageNet habit:
#: 256 -> 224, 342 -> 299).
EVAL_CROP_FRACTION = 0.875


# ----------------------------------------------------------------------------- file lists


@dataclass
class ImageList:
    """Paths (relative to ``base``), the labels trained or scored on, and the clean labels (-1: unknown)."""

    base: Path
    rel: np.ndarray  # bytes paths, dtype "S"
    labels: np.ndarray  # int64
    clean: np.ndarray  # int64, -1 where the correct class is not known
    name: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, i: int) -> Path:
        return self.base / self.rel[i].decode()

    def take(self, idx: np.ndarray, name: str | None = None) -> ImageList:
        return ImageList(self.base, self.rel[idx], self.labels[idx], self.clean[idx], name or self.name)


def _image_list(base: Path, rel: list[str], labels: list[int], clean=None, name: str = "") -> ImageList:
    lab = np.asarray(labels, dtype=np.int64)
    cl = lab.copy() if clean is None else np.asarray(clean, dtype=np.int64)
    return ImageList(base, np.array([r.encode() for r in rel], dtype=np.bytes_), lab, cl, name)


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{what} {path} not found; set data.root to the folder that holds it")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path} could not be read ({type(e).__name__})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _path_label_list(path: Path, what: str, num_classes: int) -> tuple[list[str], list[int]]:
    """``relative/path label`` lines (the WebVision info lists), keeping labels below num_classes."""
    rel, labels = [], []
    for n, line in enumerate(_read_lines(path, what), 1):
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{what} {path} line {n}: expected 'PATH LABEL', got {line[:80]!r}")
        y = int(parts[1])
        if y < 0:
            raise DataError(f"{what} {path} line {n}: negative label {y}")
        if y < num_classes:
            rel.append(parts[0])
            labels.append(y)
    return rel, labels


def read_webvision(root: Path, num_classes: int, sources: tuple[str, ...] = ("google",)) -> dict[str, ImageList]:
    """WebVision 1.0 (DivideMix layout): train lists, WebVision val, ImageNet val when present.

    ``webvision/info/train_filelist_<source>.txt`` (``google``: the "Mini" setting; add ``flickr`` for the full
    2.4M-image set) and ``val_filelist.txt`` hold ``path label`` lines; the first ``num_classes`` classes are kept.
    ``imagenet/val/<c>/`` (c = 0..num_classes-1, or the synset id of ``webvision/info/synsets.txt`` line c) is the
    ILSVRC12 test set of the "Mini" setting.
    """
    wv = root / "webvision"
    rel, y = [], []
    lists = [wv / "info" / f"train_filelist_{source}.txt" for source in sources]
    for path in lists:
        r, labels = _path_label_list(path, "WebVision train list", num_classes)
        rel += r
        y += labels
    names = " + ".join(str(p) for p in lists)
    if not rel:
        raise DataError(f"WebVision train list {names} has no image of the first {num_classes} classes")
    if max(y) < num_classes - 1:
        raise DataError(
            f"WebVision train list {names} has labels 0..{max(y)} only; "
            f"data.num_classes={num_classes} needs 0..{num_classes - 1} (set data.num_classes={max(y) + 1})"
        )
    out = {"train": _image_list(wv, rel, y, np.full(len(y), -1), "webvision-train")}
    vrel, vy = _path_label_list(wv / "info" / "val_filelist.txt", "WebVision val list", num_classes)
    val_dir = wv / "val_images_256"
    if not val_dir.is_dir():
        raise DataError(f"WebVision val folder {val_dir} not found; it holds the images of val_filelist.txt")
    out["webvision_val"] = _image_list(val_dir, vrel, vy, name="webvision-val")
    inet = root / "imagenet" / "val"
    if inet.is_dir():
        synsets_file = wv / "info" / "synsets.txt"
        synsets = [ln.split()[0] for ln in _read_lines(synsets_file, "synsets")] if synsets_file.is_file() else []
        irel, iy = [], []
        for c in range(num_classes):
            folder = inet / str(c)
            if not folder.is_dir() and c < len(synsets) and (inet / synsets[c]).is_dir():
                folder = inet / synsets[c]
            if not folder.is_dir():
                raise DataError(
                    f"ImageNet val class folder {inet / str(c)} not found (class {c} of "
                    f"data.num_classes={num_classes}); add it or remove {inet}"
                )
            files = _images_in(folder)
            irel += [f"{folder.name}/{f}" for f in files]
            iy += [c] * len(files)
        out["imagenet_val"] = _image_list(inet, irel, iy, name="imagenet-val")
    return out


def _images_in(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


def _skip_header(lines: list[str]) -> list[str]:
    return lines[1:] if lines and lines[0].startswith("class_name") else lines


def read_food101n(root: Path, train_set: str = "food101n") -> dict[str, ImageList]:
    """Food-101N (Lee et al. 2018) training images, tested on Food-101's clean test set.

    ``Food-101N_release/meta/imagelist.tsv`` lists the 310k noisy web images (``class/key.jpg``);
    ``verified_train.tsv`` / ``verified_val.tsv`` carry a human verification flag for some of them
    (1: the label is right). Those flags give the clean labels we know (verified right) and the noise
    rate (the share verified wrong). ``train_set: food101`` trains on Food-101's own 75,750 training
    images instead (``food-101/meta/train.txt``; the setting of the CMD paper's appendix A.1).
    """
    food = root / "food-101"
    classes_file = food / "meta" / "classes.txt"
    rel_root = root / "Food-101N_release"
    if train_set == "food101n":
        classes_file = (
            rel_root / "meta" / "classes.txt" if (rel_root / "meta" / "classes.txt").is_file() else classes_file
        )
    classes = _skip_header(_read_lines(classes_file, "Food-101 class list"))
    index = {c: i for i, c in enumerate(classes)}

    def label_of(entry: str, where: Path, n: int) -> int:
        cls = entry.split("/", 1)[0]
        if cls not in index:
            raise DataError(f"{where} line {n}: class {cls!r} is not in {classes_file}")
        return index[cls]

    test_file = food / "meta" / "test.txt"
    tlines = _read_lines(test_file, "Food-101 test list")
    trel = [f"{e}.jpg" if not e.lower().endswith(IMAGE_EXTENSIONS) else e for e in tlines]
    ty = [label_of(e, test_file, n) for n, e in enumerate(tlines, 1)]
    _require_dir(food / "images", "Food-101 image folder")
    out = {"test": _image_list(food / "images", trel, ty, name="food101-test"), "classes": classes}

    if train_set == "food101":
        f = food / "meta" / "train.txt"
        lines = _read_lines(f, "Food-101 train list")
        rel = [f"{e}.jpg" if not e.lower().endswith(IMAGE_EXTENSIONS) else e for e in lines]
        y = [label_of(e, f, n) for n, e in enumerate(lines, 1)]
        out["train"] = _image_list(food / "images", rel, y, np.full(len(y), -1), "food101-train")
        return out

    f = rel_root / "meta" / "imagelist.tsv"
    lines = _skip_header(_read_lines(f, "Food-101N image list"))
    y = [label_of(e, f, n) for n, e in enumerate(lines, 2)]
    _require_dir(rel_root / "images", "Food-101N image folder")
    train = _image_list(rel_root / "images", lines, y, np.full(len(y), -1), "food101n-train")
    position = {e: i for i, e in enumerate(lines)}
    verified: dict[str, np.ndarray] = {}
    for split in ("train", "val"):
        vf = rel_root / "meta" / f"verified_{split}.tsv"
        rows = _skip_header(_read_lines(vf, f"Food-101N verified_{split} list"))
        ids, flags = [], []
        for n, row in enumerate(rows, 2):
            parts = row.split("\t") if "\t" in row else row.split()
            if len(parts) != 2 or parts[1] not in ("0", "1"):
                raise DataError(f"{vf} line {n}: expected 'class/key.jpg<TAB>0|1', got {row[:80]!r}")
            if parts[0] in position:  # verified images outside the image list are not ours to score
                ids.append(position[parts[0]])
                flags.append(int(parts[1]))
        verified[split] = np.array([ids, flags], dtype=np.int64).reshape(2, -1)
    for split in ("train", "val"):
        ids, flags = verified[split]
        train.clean[ids[flags == 1]] = train.labels[ids[flags == 1]]
    out["train"] = train
    out["verified"] = verified  # type: ignore[assignment]  # consumed by build_streamed
    return out


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what} {path} not found; set data.root to the folder that holds it")


def read_imagefolder(root: Path) -> dict[str, ImageList]:
    """``train/<class>/*``, ``val/<class>/*`` (optional), ``test/<class>/*``: classes are train's folders, sorted."""
    train_dir = root / "train"
    _require_dir(train_dir, "image folder train split")
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise DataError(f"image folder {train_dir} has no class folders; expected train/<class>/<image>")
    out = {}
    for split in ("train", "val", "test"):
        d = root / split
        if not d.is_dir():
            continue
        present = sorted(e.name for e in os.scandir(d) if e.is_dir())
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise DataError(f"image folder {d} has class folder(s) {', '.join(unknown[:5])} that train/ lacks")
        missing = sorted(set(classes) - set(present))
        if missing:
            raise DataError(f"image folder {d} lacks class folder(s) {', '.join(missing[:5])} that train/ has")
        rel, y = [], []
        for c, name in enumerate(classes):
            files = _images_in(d / name)
            rel += [f"{name}/{f}" for f in files]
            y += [c] * len(files)
        if not rel:
            raise DataError(f"image folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        out[split] = _image_list(d, rel, y, name=f"imagefolder-{split}")
    out["classes"] = classes  # type: ignore[assignment]
    return out


# ----------------------------------------------------------------------------- decoding and augmentation


def sample_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The sample order of an epoch, shared by every peer and worker (engine.epoch_order's formula)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen)


def random_resized_crop_box(h: int, w: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, height, width) of an Inception-style random crop (torchvision's RandomResizedCrop rule)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h  # fallback: the central crop with the ratio clamped into range
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def decode(path: Path) -> torch.Tensor:
    """An image file as uint8 RGB [3, H, W]; raises on unreadable or corrupt files."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)


def _reason(e: Exception) -> str:
    """A short reason: torchvision's errors read "decode_jpeg, /path/decode_jpeg.cpp:171, Image is incomplete"."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else ""
    if ".cpp:" in text:
        text = text.rsplit(", ", 1)[-1]
    return f"{type(e).__name__}: {text[-120:]}" if text else type(e).__name__


def train_view(img: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Random-resized crop to size x size and a horizontal flip with probability 1/2 (uint8 in, uint8 out)."""
    from torchvision.transforms.v2 import functional as TF

    top, left, ch, cw = random_resized_crop_box(img.shape[1], img.shape[2], rng)
    out = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
    return TF.horizontal_flip(out) if rng.random() < 0.5 else out


def eval_view(img: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    out = TF.resize(img, [int(round(size / EVAL_CROP_FRACTION))], antialias=True)
    return TF.center_crop(out, [size, size])


@dataclass(frozen=True)
class _Request:
    ids: np.ndarray  # positions in the list
    epoch: int
    seed: int
    peers: tuple[int, ...]  # () = evaluation view


class _BatchDecoder(Dataset):
    """Map-style dataset whose items are whole batches: a DataLoader worker decodes one batch per request."""

    def __init__(self, images: ImageList, size: int, augment: bool = True) -> None:
        self.images = images
        self.size = size
        self.augment = augment

    def __len__(self) -> int:  # pragma: no cover - items come from the request sampler
        return 0

    def __getitem__(self, req: _Request) -> dict:
        views, keep, bad = [], [], []
        for i in req.ids.tolist():
            path = self.images.path(i)
            try:
                img = decode(path)
            except Exception as e:  # noqa: BLE001 - any failure to read or decode skips the image
                bad.append((i, str(path), _reason(e)))
                continue
            if req.peers and not self.augment:  # data.augment=false: every peer trains on the centre crop
                views.append(eval_view(img, self.size)[None].expand(len(req.peers), -1, -1, -1))
            elif req.peers:
                # Peer k's view of sample i depends only on (seed, epoch, k, i): any worker, any placement.
                views.append(
                    torch.stack(
                        [
                            train_view(img, self.size, np.random.default_rng([req.seed, req.epoch, k, i]))
                            for k in req.peers
                        ]
                    )
                )
            else:
                views.append(eval_view(img, self.size)[None])
            keep.append(i)
        n_views = max(1, len(req.peers))
        x = torch.stack(views, 1) if views else torch.empty(n_views, 0, 3, self.size, self.size, dtype=torch.uint8)
        ids = np.asarray(keep, dtype=np.int64)
        return {
            "x": x,  # uint8 [views, B, 3, S, S]
            "ids": torch.from_numpy(ids),
            "y": torch.from_numpy(self.images.labels[ids]),
            "clean": torch.from_numpy(self.images.clean[ids]),
            "bad": bad,
        }


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one core per loader process; the pool is the parallelism


def _identity(batch):
    return batch


# ----------------------------------------------------------------------------- decoding on the training device
#
# data.decode: cuda (auto on a CUDA worker). Loader processes only read the files, parse the JPEG headers and
# draw every view's crop box and flip with train_view's own draws; the training process decodes the batch's
# JPEGs with nvJPEG in one call and cuts all views with two batched matrix products per group of similar sizes
# (antialiased bilinear resampling written as matrices, the flip folded into them). Files nvJPEG should not get
# (PNG, WebP, GIF, lossless or arithmetic-coded JPEGs, a JPEG without its end marker) are decoded in the loader
# process by torchvision's CPU decoders, as the CPU path does; a JPEG nvJPEG refuses goes to the CPU decoder too.

#: Per view and image: y (start, length, resized length, offset), x (the same), flip. See resample_weights.
VIEW_PARAMS = 9
#: Frame headers nvJPEG decodes: baseline, extended and progressive Huffman-coded JPEGs.
_NVJPEG_SOF = (0xC0, 0xC1, 0xC2)
#: Padded pixels a group of images may hold per pixel of image (groups are sorted by size) and at most in all.
PAD_WASTE, PAD_MAX_PIXELS = 1.5, 1 << 25


def nvjpeg_size(data: bytes | bytearray) -> tuple[int, int] | None:
    """(height, width) of a whole baseline or progressive JPEG from its frame header; None for anything else.

    "Whole": the end-of-image marker is among the last bytes. A truncated file goes to the CPU decoder, which
    refuses it, where nvJPEG might decode the part that is there without complaint.
    """
    if data[:3] != b"\xff\xd8\xff" or b"\xff\xd9" not in data[-32:]:
        return None
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            if marker not in _NVJPEG_SOF or pos + 9 > n:
                return None
            h, w = int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(data[pos + 7 : pos + 9], "big")
            return (h, w) if h and w else None
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def view_params(h: int, w: int, size: int, peers: tuple[int, ...], seed: int, epoch: int, i: int, augment: bool):
    """int64 [views, VIEW_PARAMS]: sample i's view per peer, drawn exactly as train_view / eval_view cut it."""
    if peers and augment:
        rows = []
        for k in peers:
            rng = np.random.default_rng([seed, epoch, k, i])
            top, left, ch, cw = random_resized_crop_box(h, w, rng)
            rows.append((top, ch, size, 0, left, cw, size, 0, int(rng.random() < 0.5)))
        return np.asarray(rows, dtype=np.int64)
    r = int(round(size / EVAL_CROP_FRACTION))  # the shorter side to r (torchvision's rounding), then the centre
    new_h, new_w = (int(r * h / w), r) if w <= h else (r, int(r * w / h))
    row = (0, h, new_h, int(round((new_h - size) / 2.0)), 0, w, new_w, int(round((new_w - size) / 2.0)), 0)
    return np.asarray([row] * max(1, len(peers)), dtype=np.int64)


def resample_weights(
    start: torch.Tensor, length: torch.Tensor, full: torch.Tensor, offset: torch.Tensor, size: int, extent: int
) -> torch.Tensor:
    """[M, size, extent] antialiased bilinear resampling along one axis, torch's ``antialias=True`` weights.

    Row m maps ``extent`` input pixels to ``size`` outputs: pixels start..start+length-1 are resized to ``full``
    pixels, of which outputs offset..offset+size-1 are kept (a random-resized crop: start/length = the box,
    full = size, offset 0; resize + centre crop: start 0, length = the image, full = the resized side).
    """
    scale = length.float() / full.float()
    support = scale.clamp(min=1.0)  # the triangle filter widens with the downscale factor: antialiasing
    out = torch.arange(size, device=start.device, dtype=torch.float32)
    centre = (out[None] + offset[:, None].float() + 0.5) * scale[:, None]
    rel = torch.arange(extent, device=start.device, dtype=torch.float32)[None, None] - start[:, None, None].float()
    w = (1.0 - ((rel + 0.5 - centre[:, :, None]) / support[:, None, None]).abs()).clamp(min=0.0)
    w = w * ((rel >= 0) & (rel < length[:, None, None].float()))
    return w / w.sum(-1, keepdim=True)


def plan_groups(shapes: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """An order of the images (by size) and [a, b) groups of it that are padded to one tensor each."""
    order = sorted(range(len(shapes)), key=lambda j: shapes[j])
    groups, a, hh, ww, area = [], 0, 0, 0, 0
    for r, j in enumerate(order):
        h, w = shapes[j]
        nh, nw, narea = max(hh, h), max(ww, w), area + h * w
        padded = (r - a + 1) * nh * nw
        if r > a and (padded > PAD_WASTE * narea or padded > PAD_MAX_PIXELS):
            groups.append((a, r))
            a, hh, ww, area = r, h, w, h * w
        else:
            hh, ww, area = nh, nw, narea
    if order:
        groups.append((a, len(order)))
    return order, groups


def resized_crops(
    images: list[torch.Tensor], params: torch.Tensor, groups: list[tuple[int, int]], size: int
) -> torch.Tensor:
    """float [views, n, 3, size, size] in 0..255: every view of every uint8 [3, h, w] image, cut on its device.

    ``params``: int64 [views, n, VIEW_PARAMS] on that device; ``groups``: runs of ``images`` padded together
    (plan_groups). Per group and view two batched matrix products, no per-image host synchronisation.
    """
    views, parts = params.shape[0], []
    for a, b in groups:
        chunk, m = images[a:b], b - a
        hh, ww = max(im.shape[1] for im in chunk), max(im.shape[2] for im in chunk)
        buf = torch.zeros(m, hh, 3, ww, device=params.device, dtype=torch.float32)  # rows, channels, columns
        for r, im in enumerate(chunk):
            buf[r, : im.shape[1], :, : im.shape[2]] = im.permute(1, 0, 2)
        p = params[:, a:b].reshape(views * m, VIEW_PARAMS)
        wy = resample_weights(p[:, 0], p[:, 1], p[:, 2], p[:, 3], size, hh).view(views, m, size, hh)
        wx = resample_weights(p[:, 4], p[:, 5], p[:, 6], p[:, 7], size, ww).view(views, m, size, ww)
        wx = torch.where(p[:, 8].view(views, m, 1, 1) > 0, wx.flip(2), wx)  # a flip reverses the output columns
        rows = wy @ buf.view(1, m, hh, 3 * ww)  # [views, m, size, 3 * ww]
        out = rows.view(views, m, size * 3, ww) @ wx.transpose(-1, -2)  # [views, m, size * 3, size]
        parts.append(out.view(views, m, size, 3, size).transpose(2, 3))
    return torch.cat(parts, 1)


def _to_device(array: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A host array on ``dev`` without waiting for the device (pinned, non-blocking copy)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t


def _decode_on_cpu(blob: torch.Tensor) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(blob, mode=ImageReadMode.RGB)


def _decode_one(blob: torch.Tensor, dev: torch.device) -> torch.Tensor | str:
    """One JPEG on ``dev`` (nvJPEG), else torchvision's CPU decoder; the reason when neither can read it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(blob, mode=ImageReadMode.RGB, device=dev)
    except Exception:  # noqa: BLE001 - the CPU decoder has the last word, as on the CPU path
        try:
            return _to_device(_decode_on_cpu(blob).numpy(), dev)
        except Exception as e:  # noqa: BLE001
            return _reason(e)


class _BatchReader(Dataset):
    """data.decode on the device: a loader process reads one batch's files and draws its views (see above)."""

    def __init__(self, images: ImageList, size: int, augment: bool = True) -> None:
        self.images = images
        self.size = size
        self.augment = augment

    def __len__(self) -> int:  # pragma: no cover - items come from the request sampler
        return 0

    def __getitem__(self, req: _Request) -> dict:
        ids, data, hw, params, bad = [], [], [], [], []
        for i in req.ids.tolist():
            path = self.images.path(i)
            try:
                raw = bytearray(path.read_bytes())
                size = nvjpeg_size(raw)
                if size is None:  # not for nvJPEG: decoded here, as the CPU path decodes every file
                    img = _decode_on_cpu(torch.frombuffer(raw, dtype=torch.uint8))
                    size, raw = (int(img.shape[1]), int(img.shape[2])), img.numpy()
            except Exception as e:  # noqa: BLE001 - any failure to read or decode skips the image
                bad.append((i, str(path), _reason(e)))
                continue
            ids.append(i)
            data.append(raw)  # bytearray: a JPEG for nvJPEG; ndarray: a decoded image
            hw.append(size)
            params.append(view_params(*size, self.size, req.peers, req.seed, req.epoch, i, self.augment))
        return {
            "ids": np.asarray(ids, dtype=np.int64),
            "data": data,
            "hw": hw,
            "params": params,
            "bad": bad,
            "req": req,
        }


# ----------------------------------------------------------------------------- the training data


def warn(msg: str) -> None:
    print(f"cmd-dist: warning: {msg}", file=sys.stderr, flush=True)


@dataclass
class StreamedData:
    """Implements the engine's TrainData protocol for images on disk (see the module docstring)."""

    spec: DatasetSpec
    train: ImageList
    evals: dict[str, ImageList]  # the eval split first, then extra test sets (e.g. ImageNet val)
    eval_split: str
    splits_read: list[str]
    noise_rate: float
    workers: int = 1
    #: Random-resized crop + flip per peer when training (``data.augment``); false: the evaluation centre crop.
    augment: bool = True
    #: Where batches go when the caller names no device (prepare_data passes the worker's device).
    device: torch.device | str = "cpu"
    log: Callable[[str], None] = warn
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason, every unreadable file met
    #: ``cpu``: decoded and cut in the loader processes; ``device``: on the batches' device (``data.decode``).
    decode: str = "cpu"
    _moments: dict = field(default_factory=dict, repr=False, compare=False)  # device -> (mean, std) x 255
    _streams: dict = field(default_factory=dict, repr=False, compare=False)  # device -> nvJPEG side stream

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def skipped_images(self) -> int:
        return len(self.skipped)

    @property
    def eval_sets(self) -> list[str]:
        """Names of the evaluation sets: ``eval_split`` first, then extra test sets."""
        return list(self.evals)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches per epoch (fewer when a whole batch is unreadable: every peer skips the same one)."""
        return math.ceil(self.num_train / batch_size)

    def _loader(self, dataset: Dataset, requests: list[_Request], pin: bool) -> Iterator[dict]:
        loader = DataLoader(
            dataset,
            batch_size=None,
            sampler=requests,
            num_workers=self.workers,
            collate_fn=_identity,
            pin_memory=pin,
            worker_init_fn=_worker_init if self.workers else None,
            prefetch_factor=2 if self.workers else None,
        )
        yield from loader

    def _note_bad(self, bad: list) -> None:
        for _, path, reason in bad:
            if path not in self.skipped:
                self.skipped[path] = reason
                self.log(f"skipped unreadable image {path} ({reason}); {len(self.skipped)} skipped so far")

    def _items(self, images: ImageList, requests: list[_Request], dev: torch.device, keep_empty: bool = False):
        """Batches on ``dev``: x normalised float [views, B, 3, S, S], y, clean, ids; bad: the files skipped."""
        if self.decode == "device":
            for raw in self._loader(_BatchReader(images, self.spec.size, self.augment), requests, False):
                item = self._device_batch(images, raw, dev)
                self._note_bad(item["bad"])
                if item["ids"].numel() or keep_empty:
                    yield item
            return
        for item in self._loader(_BatchDecoder(images, self.spec.size, self.augment), requests, dev.type == "cuda"):
            self._note_bad(item["bad"])
            if item["ids"].numel() or keep_empty:
                yield {
                    "x": self._normalise(item["x"], dev),
                    "y": item["y"].to(dev, non_blocking=True),
                    "clean": item["clean"].to(dev, non_blocking=True),
                    "ids": item["ids"].to(dev, non_blocking=True),
                    "bad": item["bad"],
                }

    def _stats(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (x 255) on ``dev``, made once: a fresh host-to-device copy would wait for the device."""
        if dev not in self._moments:
            shape = (1, 3, 1, 1)
            mean = torch.tensor(self.spec.mean, device=dev).view(shape) * 255.0
            self._moments[dev] = (mean, torch.tensor(self.spec.std, device=dev).view(shape) * 255.0)
        return self._moments[dev]

    def _normalise(self, x: torch.Tensor, device) -> torch.Tensor:
        dev = torch.device(device)
        mean, std = self._stats(dev)
        return (x.to(dev, non_blocking=True).float() - mean) / std

    def _decode_stream(self, dev: torch.device):
        """A side stream for nvJPEG: torchvision's decoder may write to memory freed on the caller's stream
        before that stream's queued kernels have read it (pytorch/vision#9606); decoded images that live on
        a stream of their own, handed over with record_stream, cannot collide with the training step."""
        if dev.type != "cuda":
            return None
        if dev not in self._streams:
            self._streams[dev] = torch.cuda.Stream(dev)
        return self._streams[dev]

    def _nvjpeg(self, blobs: list[torch.Tensor], dev: torch.device) -> list[torch.Tensor | str]:
        """The batch's JPEGs decoded on ``dev`` in one call; one by one (then on the CPU) when the call fails."""
        from contextlib import nullcontext

        from torchvision.io import ImageReadMode, decode_jpeg

        side = self._decode_stream(dev)
        with torch.cuda.stream(side) if side is not None else nullcontext():
            try:
                imgs = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=dev)
            except Exception:  # noqa: BLE001 - one file nvJPEG refuses fails the whole call
                imgs = [_decode_one(b, dev) for b in blobs]
        if side is not None:
            main = torch.cuda.current_stream(dev)
            main.wait_stream(side)
            for img in imgs:
                if isinstance(img, torch.Tensor):
                    img.record_stream(main)
        return imgs

    def _device_batch(self, images: ImageList, raw: dict, dev: torch.device) -> dict:
        """A loader process's files decoded and cut on ``dev`` (see "decoding on the training device")."""
        req, bad = raw["req"], list(raw["bad"])
        imgs: list = [None if isinstance(d, bytearray) else _to_device(d, dev) for d in raw["data"]]
        jpegs = [j for j, d in enumerate(raw["data"]) if isinstance(d, bytearray)]
        if jpegs:
            decoded = self._nvjpeg([torch.frombuffer(raw["data"][j], dtype=torch.uint8) for j in jpegs], dev)
            for j, img in zip(jpegs, decoded):
                if isinstance(img, str):
                    i = int(raw["ids"][j])
                    bad.append((i, str(images.path(i)), img))
                else:
                    imgs[j] = img
        keep = [j for j, img in enumerate(imgs) if img is not None]
        ids, imgs = raw["ids"][keep], [imgs[j] for j in keep]
        views, size = max(1, len(req.peers)), self.spec.size
        params = []
        for i, j, img in zip(ids.tolist(), keep, imgs):
            hw = (int(img.shape[1]), int(img.shape[2]))
            if hw == tuple(raw["hw"][j]):  # the header's size, as a rule
                params.append(raw["params"][j])
            else:  # the views drawn again from the decoded size (what the CPU path draws from)
                params.append(view_params(*hw, size, req.peers, req.seed, req.epoch, i, self.augment))
        n = len(imgs)
        if not n:
            empty = torch.empty(0, dtype=torch.long, device=dev)
            x = torch.empty(views, 0, 3, size, size, device=dev)
            return {"x": x, "y": empty, "clean": empty, "ids": empty, "bad": bad}
        order, groups = plan_groups([(int(im.shape[1]), int(im.shape[2])) for im in imgs])
        host = np.concatenate(
            [ids, images.labels[ids], images.clean[ids], np.argsort(order), np.stack(params, 1)[:, order].ravel()]
        )
        on_dev = _to_device(host.astype(np.int64), dev)  # one copy for labels, ids and every view's crop
        x = resized_crops([imgs[j] for j in order], on_dev[4 * n :].view(views, n, VIEW_PARAMS), groups, size)
        mean, std = self._stats(dev)
        x = (x.index_select(1, on_dev[3 * n : 4 * n]).round_() - mean) / std  # the CPU path's uint8 steps
        return {"x": x, "y": on_dev[n : 2 * n], "clean": on_dev[2 * n : 3 * n], "ids": on_dev[:n], "bad": bad}

    def epoch_batches(
        self, epoch: int, peers: list[int], batch_size: int, seed: int, device=None, shard: Shard = WHOLE
    ) -> Iterator[Batch]:
        """The epoch's batches: same ids for every peer (a function of seed and epoch), one view per peer.

        A replica (``shard``) decodes only its slice of each global batch; a view depends only on
        (seed, epoch, peer, sample), so the slices together are exactly the unsharded batch.
        """
        order = sample_order(seed, epoch, self.num_train).numpy()
        reqs, sizes = [], []
        for s in range(0, len(order), batch_size):
            ids = order[s : s + batch_size]
            lo, hi = shard.bounds(len(ids))
            reqs.append(_Request(ids[lo:hi], epoch, seed, tuple(peers)))
            sizes.append(len(ids))
        dev = torch.device(device if device is not None else self.device)
        # Replicas must stay in step (their collectives pair up batch by batch): an all-unreadable slice
        # is an error there, while one worker simply skips a batch nobody can read.
        keep_empty = shard.count > 1
        for item, size in zip(self._items(self.train, reqs, dev, keep_empty), sizes):
            if not item["ids"].numel():
                raise DataError(
                    f"every image of replica {shard.index}'s slice of a batch ({len(item['bad'])} files) is "
                    f"unreadable; remove or repair them (see the warnings) or use fewer ray.replicas_per_peer"
                )
            yield Batch(
                xs=[item["x"][j] for j in range(len(peers))],
                y=item["y"],
                clean=item["clean"],
                ids=item["ids"],
                share=int(item["ids"].numel()) / size,
            )

    def eval_batches(
        self, batch_size: int, device=None, split: str | None = None, shard: Shard = WHOLE
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised centre crops, labels) of the eval split (or another of ``eval_sets``); a replica: its batches."""
        images = self.evals[split or self.eval_split]
        n = len(images)
        reqs = [
            _Request(np.arange(s, min(n, s + batch_size)), 0, 0, ())
            for b, s in enumerate(range(0, n, batch_size))
            if shard.takes(b)
        ]
        dev = torch.device(device if device is not None else self.device)
        for item in self._items(images, reqs, dev):
            yield item["x"][0], item["y"]


# ----------------------------------------------------------------------------- building from the config


def default_workers(data_cfg) -> int:
    """``data.workers``; null = one loader process per usable CPU but one (at least 1, at most 8)."""
    if data_cfg.workers is not None:
        return int(data_cfg.workers)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus - 1))


def streamed_num_classes(data_cfg, lists: dict) -> int:
    if data_cfg.dataset == "webvision":
        return data_cfg.num_classes or 50
    return len(lists["classes"])  # Food-101's 101 from its class list; imagefolder's folders


def read_lists(data_cfg) -> dict:
    root = Path(data_cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist; set it to the folder that holds the dataset")
    if data_cfg.dataset == "webvision":
        return read_webvision(root, data_cfg.num_classes or 50, tuple(data_cfg.webvision_sources))
    if data_cfg.dataset == "food101n":
        return read_food101n(root, data_cfg.food_train)
    return read_imagefolder(root)


def _subset(images: ImageList, n: int, seed: int) -> ImageList:
    """A seeded random subset of n images (lists are sorted by class: a prefix would be one class)."""
    if not n or n >= len(images):
        return images
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(int(seed)))[:n].sort().values.numpy()
    return images.take(idx)


def decode_mode(setting: str, device: torch.device | str) -> str:
    """``data.decode`` for a worker on ``device``: ``device`` (nvJPEG and the crops on its GPU) or ``cpu``."""
    dev = torch.device(device)
    if setting == "cuda" and dev.type != "cuda":
        raise DataError(
            f"data.decode: cuda, but this worker trains on {dev.type}; use data.decode=auto (the GPU when there "
            f"is one) or data.decode=cpu"
        )
    return "device" if setting != "cpu" and dev.type == "cuda" else "cpu"


def build_streamed(
    data_cfg, noise_cfg, workers: int | None = None, device: torch.device | str | None = None
) -> StreamedData:
    """File lists, labels (synthetic noise for imagefolder), the split of the protocol; no image is read.

    ``device``: the worker's (batches go there, ``data.decode`` is resolved for it); None: the preflight's
    look at the lists (batches on the CPU, decoded there).
    """
    decode = "cpu" if device is None else decode_mode(data_cfg.decode, device)
    lists = read_lists(data_cfg)
    c = streamed_num_classes(data_cfg, lists)
    spec = DatasetSpec(c, 3, data_cfg.image_size, 0, True, IMAGENET_MEAN, IMAGENET_STD)
    train: ImageList = _subset(lists["train"], data_cfg.train_subset, noise_cfg.seed)
    ds = data_cfg.dataset
    if ds == "imagefolder" and noise_cfg.kind not in ("none", "human"):
        noisy, _ = corrupt_labels(torch.from_numpy(train.labels), c, noise_cfg.kind, noise_cfg.rate, noise_cfg.seed)
        train = ImageList(train.base, train.rel, noisy.numpy(), train.labels.copy(), train.name)
    evals: dict[str, ImageList] = {}
    read = ["train"]
    if data_cfg.protocol == "search":
        split = "val"
        if ds == "webvision":
            evals["val"] = lists["webvision_val"]
            read.append("webvision_val")
        elif ds == "food101n" and data_cfg.food_train == "food101n":
            ids, flags = lists["verified"]["val"]
            val_pos = np.unique(ids[flags == 1])
            # Held out: the human-verified right labels of verified_val.tsv; removed from training.
            keep = np.setdiff1d(np.arange(len(lists["train"])), np.unique(ids))
            evals["val"] = lists["train"].take(val_pos, "food101n-verified-val")
            evals["val"].clean = evals["val"].labels.copy()
            train = _subset(lists["train"].take(keep), data_cfg.train_subset, noise_cfg.seed)
            read.append("verified_val")
        elif ds == "imagefolder" and "val" in lists:
            evals["val"] = lists["val"]
            read.append("val")
        else:  # appendix A.2: 90% to train, 10% held out (labels as given: real noise has no clean ones)
            tr, va = split_train_val(len(train), data_cfg.val_fraction, seed=noise_cfg.seed)
            evals["val"] = train.take(va.numpy(), "heldout-val")
            evals["val"].labels = evals["val"].clean.copy() if (evals["val"].clean >= 0).all() else evals["val"].labels
            train = train.take(tr.numpy())
    else:
        split = "test"
        if ds == "webvision":
            if "imagenet_val" in lists:
                evals["test"] = lists["imagenet_val"]
                evals["webvision_val"] = lists["webvision_val"]
                read += ["imagenet_val", "webvision_val"]
            else:
                evals["test"] = lists["webvision_val"]
                read.append("webvision_val")
        else:
            if "test" not in lists:
                raise DataError(
                    f"image folder {Path(data_cfg.root) / 'test'} not found; data.protocol=final "
                    f"reports test accuracy (or use data.protocol=search with val/)"
                )
            evals["test"] = lists["test"]
            read.append("test")
    if data_cfg.test_subset:
        evals = {k: _subset(v, data_cfg.test_subset, noise_cfg.seed) for k, v in evals.items()}
    if ds == "food101n" and data_cfg.food_train == "food101n":
        ids, flags = lists["verified"]["train"]
        rate = float((flags == 0).mean()) if flags.size else math.nan  # estimated on the verified images
    else:
        rate = noise_rate(torch.from_numpy(train.labels), torch.from_numpy(train.clean))
    return StreamedData(
        spec=spec,
        train=train,
        evals=evals,
        eval_split=split,
        splits_read=read,
        noise_rate=rate,
        workers=default_workers(data_cfg) if workers is None else workers,
        augment=data_cfg.augment,
        device="cpu" if device is None else device,
        decode=decode,
    )
