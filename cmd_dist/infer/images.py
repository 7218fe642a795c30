"""New images for a trained run's peers: which files an INPUT names, how one is read, and the run's evaluation view.

- **Listing** (:func:`list_images`): a file is taken as named (whatever its suffix: the user chose it); a folder
  is walked recursively for files whose suffix is an image format's (:data:`IMAGE_SUFFIXES`, any case), hidden
  files and folders skipped, in sorted order, so the same INPUT always gives the same rows in the same order.
- **Reading** (:func:`read_image`): torchvision.io first (libjpeg-turbo, libpng, libwebp, GIF: the decoder the
  streamed datasets train through, :func:`cmd_dist.data.views.decode`), always as RGB; formats torchvision does
  not read (BMP, TIFF, ...) through PIL. A file neither reads raises :class:`UnreadableImage` with a short reason;
  the callers list it and go on (never a crash).
- **The evaluation view** (:func:`eval_transform`), uint8 in, uint8 out, ``spec.channels`` x ``spec.size`` x
  ``spec.size``:

  * a streamed dataset's run (WebVision, Food-101N, imagefolder): exactly what its evaluation saw,
    :func:`cmd_dist.data.views.eval_view` (shorter side to size / 0.875, centre crop: 256 -> 224);
  * a resident dataset's run (CIFAR 32 x 32 RGB, digits 8 x 8 grayscale): those networks were tested on whole
    images of that size, never cropped, so the shorter side goes to ``spec.size`` and the centre square is kept
    (an image already of that size passes unchanged); one channel is the ITU-R 601 luma of the RGB image
    (torchvision's ``rgb_to_grayscale``, PIL's "L"); a gray file keeps its values exactly. scikit-learn's digits
    are light strokes on black: a dark digit on white paper must be inverted by the user first; nothing guesses.

Ray-free: the local DataLoader path and the Ray Data path (cmd_dist/launch/predict.py) call the same functions, so
both give the same pixels.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from cmd_dist.data.types import DatasetSpec
from cmd_dist.data.views import decode_reason, eval_view
from cmd_dist.errors import DataError

#: Suffixes a folder walk takes (a file named on the command line is taken whatever its suffix).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class UnreadableImage(ValueError):
    """A file that is no image either decoder reads (truncated, corrupt, another format); the message is why."""


def list_images(inputs: Iterable[str]) -> list[str]:
    """The image files the INPUT paths name, in order (a folder: its images, recursively, sorted), duplicates once.

    DataError (one line) for an INPUT that does not exist or when no image file is found at all.
    """
    inputs = list(inputs)
    found: dict[str, None] = {}
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            for f in _walk(path):
                found.setdefault(str(f), None)
        elif path.is_file():
            found.setdefault(str(path), None)
        else:
            raise DataError(f"INPUT {name}: no such file or folder; pass image files or folders holding them")
    if not found:
        shown = " ".join(inputs[:3]) + (" ..." if len(inputs) > 3 else "")
        raise DataError(
            f"INPUT {shown}: no image files there (looked for {', '.join(s[1:] for s in IMAGE_SUFFIXES)}, "
            f"recursively); pass image files or folders holding them"
        )
    return list(found)


def _walk(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(
            Path(root) / f for f in sorted(files) if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
        )
    return out


def read_image(data: bytes) -> torch.Tensor:
    """An image file's bytes as uint8 RGB [3, H, W] (a GIF: its first frame); UnreadableImage otherwise."""
    from torchvision.io import ImageReadMode, decode_image

    if not data:
        raise UnreadableImage("empty file")
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        if "Unsupported image file" not in str(e):
            raise UnreadableImage(decode_reason(e)) from None
        img = _read_with_pil(data)
    return img[0] if img.ndim == 4 else img  # an animated GIF: [frames, 3, H, W]


def _read_with_pil(data: bytes) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise UnreadableImage(
            "not an image file torchvision or PIL reads (jpeg, png, webp, gif, bmp, tiff, ...)"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:  # a known format, broken
        raise UnreadableImage(f"{type(e).__name__}: {str(e)[-120:]}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def eval_transform(img: torch.Tensor, spec: DatasetSpec, streamed: bool) -> torch.Tensor:
    """The run's evaluation view of one uint8 RGB image: uint8 [spec.channels, spec.size, spec.size]."""
    from torchvision.transforms.v2 import functional as TF

    if streamed:
        out = eval_view(img, spec.size)
    else:
        if min(img.shape[-2:]) != spec.size:
            img = TF.resize(img, [spec.size], antialias=True)
        out = TF.center_crop(img, [spec.size, spec.size])
    if spec.channels == 1:  # a gray file (decoded as three equal channels) keeps its exact values
        gray = torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
        out = out[:1] if gray else TF.rgb_to_grayscale(out, num_output_channels=1)
    return out.contiguous()


def load_view(path: str, spec: DatasetSpec, streamed: bool) -> torch.Tensor:
    """The evaluation view of the file at ``path`` (OSError and UnreadableImage propagate)."""
    with open(path, "rb") as f:
        data = f.read()
    return eval_transform(read_image(data), spec, streamed)


def normalize(x: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """uint8 [B, C, S, S] -> the float input the peers were trained on ((x / 255 - mean) / std, as in training)."""
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std
