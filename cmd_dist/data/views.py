"""One image's views on the CPU: decoding (torchvision.io: libjpeg-turbo, PNG, WebP), the training view (an
Inception-style random-resized crop and a flip, torchvision's v2 functional ops on uint8) and the evaluation view
(resize + centre crop), and the loader dataset that decodes one whole batch per request.

Peer k's view of sample i is drawn from a generator seeded with (seed, epoch, k, i) only, so any placement of
peers over workers and any number of loader processes give the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cmd_dist.data.image_lists import ImageList

#: Evaluation resizes the shorter side to image_size / 0.875 and takes the centre crop (ImageNet habit:
#: 256 -> 224, 342 -> 299).
EVAL_CROP_FRACTION = 0.875


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


def decode_reason(e: Exception) -> str:
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
class BatchRequest:
    """One batch a loader process is asked for: its samples and what seeds their views."""

    ids: np.ndarray  # positions in the list
    epoch: int
    seed: int
    peers: tuple[int, ...]  # () = evaluation view


class BatchDataset(Dataset):
    """Map-style dataset whose items are whole batches (one :class:`BatchRequest` each), read in DataLoader
    workers: the CPU decoder below and the device decoder's reader share this."""

    def __init__(self, images: ImageList, size: int, augment: bool = True) -> None:
        self.images = images
        self.size = size
        self.augment = augment

    def __len__(self) -> int:  # pragma: no cover - items come from the request sampler
        return 0


class BatchDecoder(BatchDataset):
    """A DataLoader worker decodes one batch per request on the CPU."""

    def __getitem__(self, req: BatchRequest) -> dict:
        views, keep, bad = [], [], []
        for i in req.ids.tolist():
            path = self.images.path(i)
            try:
                img = decode(path)
            except Exception as e:  # noqa: BLE001 - any failure to read or decode skips the image
                bad.append((i, str(path), decode_reason(e)))
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
