"""Image datasets streamed from disk: mini-WebVision, Food-101N and any ImageFolder layout.

Only the file lists live in memory (paths as one numpy bytes array, so forked loader workers share it
without copying); images are read, decoded and augmented batch by batch in torch ``DataLoader``
worker processes with torchvision's decoders (libjpeg-turbo, PNG, WebP) and its v2 functional
transforms on uint8 tensors. The training device receives uint8 crops and normalises them there.
With ``data.decode`` on the device (the default on a CUDA worker), the loader processes only read the
files and draw the crops; nvJPEG decodes each batch and batched tensor ops cut every view on the GPU
(:mod:`cmd_dist.data.device_decode`).

CMD compares the peers' predictions sample by sample, so every peer sees the same samples in the
same batches: the order of an epoch is a function of (seed, epoch) only, and each peer's crop and
flip of sample ``i`` is a function of (seed, epoch, peer, i) only. Any placement of peers over
workers and any number of loader processes give the same batches and the same pixels.

Unreadable or corrupt images are skipped with a warning (once per file) and counted; every peer
meets the same files in the same batches, so they all drop the same samples.

The training list is the list as read, cut by ``data.train_subset`` (:func:`_subset`), the ``search`` protocol's
held-out 10% and Food-101N's verified-val images (:func:`_search_split`), all by
:meth:`~cmd_dist.data.image_lists.ImageList.take`, so each training image keeps its index in the list as read
(``ImageList.origin``): ``cmd-dist label-issues`` maps its flags back to the shipped list through it.

This module holds the dataset the training loop reads (:class:`StreamedData`, a
:class:`~cmd_dist.data.types.TrainData`) and its construction from the config; the file lists are read by
:mod:`cmd_dist.data.image_lists`, the views cut on the CPU by :mod:`cmd_dist.data.views` and on the device by
:mod:`cmd_dist.data.device_decode`.
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

from cmd_dist.data.device_decode import BatchReader, DeviceDecoder
from cmd_dist.data.image_lists import ImageList, read_food101n, read_imagefolder, read_webvision
from cmd_dist.data.noise import corrupt_labels, noise_rate, split_train_val
from cmd_dist.data.types import WHOLE, Batch, DatasetSpec, Shard
from cmd_dist.data.views import BatchDecoder, BatchRequest, sample_order
from cmd_dist.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one core per loader process; the pool is the parallelism


def _identity(batch):
    return batch


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
    _nvjpeg: DeviceDecoder = field(default_factory=DeviceDecoder, repr=False, compare=False)  # data.decode: device

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

    def _loader(self, dataset: Dataset, requests: list[BatchRequest], pin: bool) -> Iterator[dict]:
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

    def _items(self, images: ImageList, requests: list[BatchRequest], dev: torch.device, keep_empty: bool = False):
        """Batches on ``dev``: x normalised float [views, B, 3, S, S], y, clean, ids; bad: the files skipped."""
        if self.decode == "device":
            for raw in self._loader(BatchReader(images, self.spec.size, self.augment), requests, False):
                item = self._nvjpeg.batch(images, raw, dev, self.spec.size, self.augment, *self._stats(dev))
                self._note_bad(item["bad"])
                if item["ids"].numel() or keep_empty:
                    yield item
            return
        for item in self._loader(BatchDecoder(images, self.spec.size, self.augment), requests, dev.type == "cuda"):
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
            reqs.append(BatchRequest(ids[lo:hi], epoch, seed, tuple(peers)))
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
            BatchRequest(np.arange(s, min(n, s + batch_size)), 0, 0, ())
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


def streamed_spec(data_cfg, num_classes: int) -> DatasetSpec:
    """What the peers of a streamed dataset take: RGB ``data.image_size`` crops (random-resized when training,
    resize + centre crop when evaluating), normalised with ImageNet's mean and std; no pad-crop."""
    return DatasetSpec(num_classes, 3, data_cfg.image_size, 0, True, IMAGENET_MEAN, IMAGENET_STD)


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


def _search_split(data_cfg, noise_cfg, lists: dict, train: ImageList):
    """Protocol ``search``: (train, {"val": held-out images}, splits read besides train); test is never read."""
    ds = data_cfg.dataset
    if ds == "webvision":
        return train, {"val": lists["webvision_val"]}, ["webvision_val"]
    if ds == "food101n" and data_cfg.food_train == "food101n":
        ids, flags = lists["verified"]["val"]
        val_pos = np.unique(ids[flags == 1])
        # Held out: the human-verified right labels of verified_val.tsv; removed from training.
        keep = np.setdiff1d(np.arange(len(lists["train"])), np.unique(ids))
        val = lists["train"].take(val_pos, "food101n-verified-val")
        val.clean = val.labels.copy()
        train = _subset(lists["train"].take(keep), data_cfg.train_subset, noise_cfg.seed)
        return train, {"val": val}, ["verified_val"]
    if ds == "imagefolder" and "val" in lists:
        return train, {"val": lists["val"]}, ["val"]
    # appendix A.2: 90% to train, 10% held out (labels as given: real noise has no clean ones)
    tr, va = split_train_val(len(train), data_cfg.val_fraction, seed=noise_cfg.seed)
    val = train.take(va.numpy(), "heldout-val")
    val.labels = val.clean.copy() if (val.clean >= 0).all() else val.labels
    return train.take(tr.numpy()), {"val": val}, []  # the held-out images are training images


def _final_split(data_cfg, lists: dict) -> tuple[dict[str, ImageList], list[str]]:
    """Protocol ``final``: ({"test": ..., extra test sets}, splits read besides train)."""
    if data_cfg.dataset == "webvision":
        if "imagenet_val" in lists:  # the "Mini" setting's test set, WebVision val scored beside it
            evals = {"test": lists["imagenet_val"], "webvision_val": lists["webvision_val"]}
            return evals, ["imagenet_val", "webvision_val"]
        return {"test": lists["webvision_val"]}, ["webvision_val"]
    if "test" not in lists:
        raise DataError(
            f"image folder {Path(data_cfg.root) / 'test'} not found; data.protocol=final "
            f"reports test accuracy (or use data.protocol=search with val/)"
        )
    return {"test": lists["test"]}, ["test"]


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
    spec = streamed_spec(data_cfg, c)
    train: ImageList = _subset(lists["train"], data_cfg.train_subset, noise_cfg.seed)
    ds = data_cfg.dataset
    if ds == "imagefolder" and noise_cfg.kind not in ("none", "human"):
        noisy, _ = corrupt_labels(torch.from_numpy(train.labels), c, noise_cfg.kind, noise_cfg.rate, noise_cfg.seed)
        train = train.relabelled(noisy.numpy(), train.labels.copy())
    if data_cfg.protocol == "search":
        split = "val"
        train, evals, extra = _search_split(data_cfg, noise_cfg, lists, train)
    else:
        split = "test"
        evals, extra = _final_split(data_cfg, lists)
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
        splits_read=["train", *extra],
        noise_rate=rate,
        workers=default_workers(data_cfg) if workers is None else workers,
        augment=data_cfg.augment,
        device="cpu" if device is None else device,
        decode=decode,
    )
