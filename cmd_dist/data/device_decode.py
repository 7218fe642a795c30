"""Decoding on the training device (``data.decode: cuda``, ``auto`` on a CUDA worker).

Loader processes only read the files, parse the JPEG headers and draw every view's crop box and flip with
train_view's own draws (:class:`BatchReader`); the training process decodes the batch's JPEGs with nvJPEG in one
call and cuts all views with two batched matrix products per group of similar sizes (antialiased bilinear
resampling written as matrices, the flip folded into them; :class:`DeviceDecoder`). Files nvJPEG should not get
(PNG, WebP, GIF, lossless or arithmetic-coded JPEGs, a JPEG without its end marker) are decoded in the loader
process by torchvision's CPU decoders, as the CPU path does; a JPEG nvJPEG refuses goes to the CPU decoder too.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from cmd_dist.data.image_lists import ImageList
from cmd_dist.data.views import EVAL_CROP_FRACTION, BatchDataset, BatchRequest, decode_reason, random_resized_crop_box

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


def to_device(array: np.ndarray, dev: torch.device) -> torch.Tensor:
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
            return to_device(_decode_on_cpu(blob).numpy(), dev)
        except Exception as e:  # noqa: BLE001
            return decode_reason(e)


class BatchReader(BatchDataset):
    """data.decode on the device: a loader process reads one batch's files and draws its views (see above)."""

    def __getitem__(self, req: BatchRequest) -> dict:
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
                bad.append((i, str(path), decode_reason(e)))
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


class DeviceDecoder:
    """The training process's half: a loader process's files decoded by nvJPEG and every view cut on the device.

    One per dataset: it keeps a side stream per device for nvJPEG (see :meth:`side_stream`).
    """

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def side_stream(self, dev: torch.device):
        """A side stream for nvJPEG: torchvision's decoder may write to memory freed on the caller's stream
        before that stream's queued kernels have read it (pytorch/vision#9606); decoded images that live on
        a stream of their own, handed over with record_stream, cannot collide with the training step."""
        if dev.type != "cuda":
            return None
        if dev not in self.streams:
            self.streams[dev] = torch.cuda.Stream(dev)
        return self.streams[dev]

    def nvjpeg(self, blobs: list[torch.Tensor], dev: torch.device) -> list[torch.Tensor | str]:
        """The batch's JPEGs decoded on ``dev`` in one call; one by one (then on the CPU) when the call fails."""
        from torchvision.io import ImageReadMode, decode_jpeg

        side = self.side_stream(dev)
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

    def decoded(self, images: ImageList, raw: dict, dev: torch.device) -> tuple[list[int], list, list]:
        """(positions in the batch, images on ``dev``, files skipped) of a :class:`BatchReader` item."""
        bad = list(raw["bad"])
        imgs: list = [None if isinstance(d, bytearray) else to_device(d, dev) for d in raw["data"]]
        jpegs = [j for j, d in enumerate(raw["data"]) if isinstance(d, bytearray)]
        if jpegs:
            decoded = self.nvjpeg([torch.frombuffer(raw["data"][j], dtype=torch.uint8) for j in jpegs], dev)
            for j, img in zip(jpegs, decoded):
                if isinstance(img, str):
                    i = int(raw["ids"][j])
                    bad.append((i, str(images.path(i)), img))
                else:
                    imgs[j] = img
        keep = [j for j, img in enumerate(imgs) if img is not None]
        return keep, [imgs[j] for j in keep], bad

    def batch(self, images: ImageList, raw: dict, dev: torch.device, size: int, augment: bool, mean, std) -> dict:
        """Normalised float views [views, B, 3, size, size] on ``dev``, y, clean, ids, and the files skipped."""
        req = raw["req"]
        keep, imgs, bad = self.decoded(images, raw, dev)
        ids = raw["ids"][keep]
        views = max(1, len(req.peers))
        params = []
        for i, j, img in zip(ids.tolist(), keep, imgs):
            hw = (int(img.shape[1]), int(img.shape[2]))
            if hw == tuple(raw["hw"][j]):  # the header's size, as a rule
                params.append(raw["params"][j])
            else:  # the views drawn again from the decoded size (what the CPU path draws from)
                params.append(view_params(*hw, size, req.peers, req.seed, req.epoch, i, augment))
        n = len(imgs)
        if not n:
            empty = torch.empty(0, dtype=torch.long, device=dev)
            x = torch.empty(views, 0, 3, size, size, device=dev)
            return {"x": x, "y": empty, "clean": empty, "ids": empty, "bad": bad}
        order, groups = plan_groups([(int(im.shape[1]), int(im.shape[2])) for im in imgs])
        host = np.concatenate(
            [ids, images.labels[ids], images.clean[ids], np.argsort(order), np.stack(params, 1)[:, order].ravel()]
        )
        on_dev = to_device(host.astype(np.int64), dev)  # one copy for labels, ids and every view's crop
        x = resized_crops([imgs[j] for j in order], on_dev[4 * n :].view(views, n, VIEW_PARAMS), groups, size)
        x = (x.index_select(1, on_dev[3 * n : 4 * n]).round_() - mean) / std  # the CPU path's uint8 steps
        return {"x": x, "y": on_dev[n : 2 * n], "clean": on_dev[2 * n : 3 * n], "ids": on_dev[:n], "bad": bad}
