"""Datasets as uint8 tensors on the training device, with whole-batch augmentation there.

CIFAR pickles are parsed directly with a restricted unpickler (untrusted files: numpy arrays,
lists, numbers, bytes and strings only). scikit-learn's digits ship offline for demos and tests.
The training set is corrupted with synthetic noise (Sec. 5.1) or takes CIFAR-N's human labels
(:mod:`cmd_dist.noisy_labels`), and is split as in appendix A.2. Datasets larger than memory
(``webvision``, ``food101n``, ``imagefolder``) are streamed from disk by :mod:`cmd_dist.streaming`.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cmd_dist.noise import corrupt_labels, noise_rate, split_train_val


class DataError(RuntimeError):
    """A missing or unreadable dataset file (one-line message naming the file)."""


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    channels: int
    size: int
    pad: int
    flip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


SPECS = {
    # Appendix A.1: pad 4, random crop 32 (+ horizontal flip, the standard CIFAR recipe).
    "cifar100": DatasetSpec(100, 3, 32, 4, True, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar10": DatasetSpec(10, 3, 32, 4, True, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # Digits are 8x8: a 1-pixel shift, no flip (a flipped 2 is not a 2).
    "digits": DatasetSpec(10, 1, 8, 1, False, (0.3,), (0.35,)),
}

STREAMED = ("webvision", "food101n", "imagefolder")


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Protocol-2 pickles written by Python 3 rebuild bytes with codecs.encode(str, "latin1"): pure.
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays; anything else is refused, never run."""

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays and plain data allowed)")


def safe_unpickle(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"dataset file {path} not found") from None
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"dataset file {path} is not a plain CIFAR pickle: {e}") from None
    except Exception as e:  # truncated or garbage bytes
        raise DataError(f"dataset file {path} is corrupted ({type(e).__name__}: {e}); re-download it") from None
    if not isinstance(obj, dict):
        raise DataError(f"dataset file {path} does not hold a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_files(dataset: str, root: Path, split: str, coarse: bool = False) -> tuple[Path, list[str], str]:
    if dataset == "cifar100":
        key = "coarse_labels" if coarse else "fine_labels"
        return root / "cifar-100-python", ["train"] if split == "train" else ["test"], key
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return root / "cifar-10-batches-py", names, "labels"


def _maybe_download(dataset: str, root: Path, folder: Path) -> None:
    """Fetch CIFAR with torchvision when it is missing; offline, a one-line error says what to do.

    Only into a ``data.root`` that exists: a mistyped root must not create folders or start a download.
    """
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist; set data.root to the folder that contains {folder.name}/")
    try:
        from torchvision import datasets

        cls = datasets.CIFAR100 if dataset == "cifar100" else datasets.CIFAR10
        cls(str(root), train=True, download=True)
    except Exception:
        raise DataError(
            f"dataset folder {folder} not found and could not be downloaded; put the python-pickle "
            f"CIFAR files there or set data.root to the folder that contains {folder.name}/"
        ) from None


def load_cifar(dataset: str, root: str | Path, split: str, coarse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR split as (uint8 [N, 3, 32, 32], int64 [N]); ``coarse``: CIFAR-100's 20 superclasses."""
    root = Path(root)
    folder, names, label_key = _cifar_files(dataset, root, split, coarse)
    if not folder.is_dir():
        _maybe_download(dataset, root, folder)
    xs, ys = [], []
    for name in names:
        d = safe_unpickle(folder / name)
        data, labels = d.get("data"), d.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"dataset file {folder / name} has no uint8 N x 3072 'data' array")
        if labels is None or len(labels) != data.shape[0]:
            raise DataError(f"dataset file {folder / name} has no '{label_key}' list matching its images")
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.as_tensor(np.asarray(labels, dtype=np.int64)))
    return torch.cat(xs), torch.cat(ys)


def load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1,797 8x8 images, offline) with a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.as_tensor(d.target, dtype=torch.int64)
    train_idx, test_idx = split_train_val(len(y), 0.2, seed=0)
    idx = train_idx if split == "train" else test_idx
    return x[idx], y[idx]


def load_split(dataset: str, root: str | Path, split: str, coarse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset == "digits":
        return load_digits(split)
    return load_cifar(dataset, root, split, coarse)


def uses_coarse_labels(noise_cfg) -> bool:
    """CIFAR-100N's ``noisy_coarse`` trains the 20-superclass task (clean labels: the pickle's coarse_labels)."""
    from cmd_dist.noisy_labels import COARSE_SETS

    return noise_cfg is not None and noise_cfg.kind == "human" and noise_cfg.label_set in COARSE_SETS


def dataset_spec(data_cfg, noise_cfg=None) -> DatasetSpec:
    spec = SPECS[data_cfg.dataset]
    return replace(spec, num_classes=20) if uses_coarse_labels(noise_cfg) else spec


def training_labels(data_cfg, noise_cfg, clean: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The labels trained on, for the whole training set in file order: synthetic, human (CIFAR-N) or clean."""
    if noise_cfg.kind == "none":
        return clean.clone()
    if noise_cfg.kind == "human":
        from cmd_dist.noisy_labels import LabelFileError, human_labels, label_file_path

        try:
            path = label_file_path(data_cfg.dataset, data_cfg.root, noise_cfg.label_file)
            return human_labels(data_cfg.dataset, noise_cfg.label_set, path, clean, num_classes)
        except LabelFileError as e:
            raise DataError(str(e)) from None
    noisy, _ = corrupt_labels(clean, num_classes, noise_cfg.kind, noise_cfg.rate, noise_cfg.seed)
    return noisy


@dataclass
class Batch:
    """One training batch for this worker's peers: the same samples, each peer's own augmentation."""

    xs: list[torch.Tensor]  # one normalised float input per local peer, on the device
    y: torch.Tensor  # noisy (training) labels, int64
    clean: torch.Tensor  # clean labels, int64 (-1 where unknown)
    ids: torch.Tensor  # sample ids (positions in the training set), int64
    #: This worker's fraction of the global batch (its replica's slice; 1.0 without replicas).
    share: float = 1.0


@dataclass(frozen=True)
class Shard:
    """Replica ``index`` of ``count`` of a peer: it trains on its slice of every global batch.

    Slices are contiguous and as equal as possible (``torch.tensor_split``'s rule: the first
    ``n % count`` slices hold one sample more), so the replicas of one peer together cover the
    global batch exactly once, and replica j of every peer holds the same samples.
    """

    index: int = 0
    count: int = 1

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this replica's slice of a global batch of ``n`` samples."""
        base, extra = divmod(n, self.count)
        start = self.index * base + min(self.index, extra)
        return start, start + base + (1 if self.index < extra else 0)

    def takes(self, batch_index: int) -> bool:
        """Evaluation is split by whole batches: replica j scores batches j, j + count, ..."""
        return batch_index % self.count == self.index


WHOLE = Shard()


def epoch_order(seed: int, epoch: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The sample order of an epoch: the same for every peer and every worker, a function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def augment_generator(seed: int, peer: int, epoch: int, device: torch.device | str) -> torch.Generator:
    """Peer k's augmentation randomness for an epoch (peers see the same samples, cropped differently)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 1009 + peer)


@dataclass
class PeerData:
    """Everything a training worker needs, resident on its device.

    The training loop reads it only through :meth:`epoch_batches` and :meth:`eval_batches` (the
    interface streamed datasets implement too).
    """

    spec: DatasetSpec
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # noisy labels used for training
    train_clean: torch.Tensor  # clean labels (to measure memorisation)
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    eval_split: str  # "val" (search protocol) or "test" (final protocol)
    splits_read: list[str] = field(default_factory=list)
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    augment: bool = True

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def noise_rate(self) -> float:
        """The realised fraction of training labels that differ from the clean ones."""
        return float((self.train_labels != self.train_clean).float().mean()) if self.num_train else 0.0

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.num_train / batch_size)

    def epoch_batches(
        self, epoch: int, peers: list[int], batch_size: int, seed: int, shard: Shard = WHOLE
    ) -> Iterator[Batch]:
        """The epoch's batches in the shared order of (seed, epoch); the last one may be smaller.

        No host synchronisation: the order is drawn once per epoch and sliced on the device. With a
        ``shard`` (a replica of a peer) only that slice of each global batch is built, and each sample
        gets exactly the augmentation it gets without replicas: the random crop offsets and flips are
        drawn for the whole global batch from the peer's generator, then sliced.
        """
        dev = self.train_x.device
        order = epoch_order(seed, epoch, self.num_train, dev)
        gens = [augment_generator(seed, k, epoch, dev) for k in peers]
        for start in range(0, self.num_train, batch_size):
            gidx = order[start : start + batch_size]
            lo, hi = shard.bounds(int(gidx.shape[0]))
            idx = gidx[lo:hi]
            xb = self.train_x[idx]
            xs = []
            for g in gens:
                if self.augment:
                    params = augment_params(int(gidx.shape[0]), self.spec.pad, self.spec.flip, g, dev)
                    oy, ox, f = (None if t is None else t[lo:hi] for t in params)
                    xs.append(normalize(apply_augment(xb, self.spec.pad, oy, ox, f), self.mean, self.std))
                else:
                    xs.append(normalize(xb, self.mean, self.std))
            yield Batch(xs, self.train_labels[idx], self.train_clean[idx], idx, (hi - lo) / int(gidx.shape[0]))

    def eval_batches(self, batch_size: int, shard: Shard = WHOLE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised images, labels) of the eval split (validation or test), in order (a replica: its batches)."""
        for b, i in enumerate(range(0, self.eval_x.shape[0], batch_size)):
            if shard.takes(b):
                yield normalize(self.eval_x[i : i + batch_size], self.mean, self.std), self.eval_y[i : i + batch_size]

    @property
    def skipped_images(self) -> int:
        """Unreadable images skipped: none for in-memory data (streamed datasets count theirs)."""
        return 0


def prepare_data(data_cfg, noise_cfg, device: torch.device | str = "cpu"):
    """Load, corrupt (whole training set, seeded) and split; the search protocol never reads test.

    Streamed datasets return a :class:`cmd_dist.streaming.StreamedData` (file lists only).
    """
    if data_cfg.dataset in STREAMED:
        from cmd_dist.streaming import build_streamed

        return build_streamed(data_cfg, noise_cfg, device=device)
    spec = dataset_spec(data_cfg, noise_cfg)
    coarse = uses_coarse_labels(noise_cfg)
    x, clean = load_split(data_cfg.dataset, data_cfg.root, "train", coarse)
    # Human labels are matched to the whole training set in file order, before any subset.
    noisy = training_labels(data_cfg, noise_cfg, clean, spec.num_classes)
    if data_cfg.train_subset:
        x, clean, noisy = x[: data_cfg.train_subset], clean[: data_cfg.train_subset], noisy[: data_cfg.train_subset]
    read = ["train"]
    if data_cfg.protocol == "search":
        train_idx, val_idx = split_train_val(len(clean), data_cfg.val_fraction, seed=noise_cfg.seed)
        ex, ey, split = x[val_idx], clean[val_idx], "val"
        x, noisy, clean = x[train_idx], noisy[train_idx], clean[train_idx]
    else:
        ex, ey = load_split(data_cfg.dataset, data_cfg.root, "test", coarse)
        if data_cfg.test_subset:
            ex, ey = ex[: data_cfg.test_subset], ey[: data_cfg.test_subset]
        split = "test"
        read.append("test")
    dev = torch.device(device)
    shape = (1, spec.channels, 1, 1)
    return PeerData(
        spec=spec,
        train_x=x.to(dev),
        train_labels=noisy.to(dev),
        train_clean=clean.to(dev),
        eval_x=ex.to(dev),
        eval_y=ey.to(dev),
        eval_split=split,
        splits_read=read,
        mean=torch.tensor(spec.mean, device=dev).view(shape),
        std=torch.tensor(spec.std, device=dev).view(shape),
        augment=data_cfg.augment,
    )


def normalize(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() / 255.0 - mean) / std


def augment_params(
    b: int, pad: int, flip: bool, generator: torch.Generator, device: torch.device | str
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The random draws of :func:`augment` for a batch of ``b`` (crop offsets y, x; flip), in its order."""
    oy = ox = f = None
    if pad:
        oy = torch.randint(0, 2 * pad + 1, (b,), device=device, generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (b,), device=device, generator=generator)
    if flip:
        f = torch.rand(b, device=device, generator=generator) < 0.5
    return oy, ox, f


def apply_augment(
    x: torch.Tensor, pad: int, oy: torch.Tensor | None, ox: torch.Tensor | None, f: torch.Tensor | None
) -> torch.Tensor:
    """Crop after zero padding at offsets (oy, ox) and flip where ``f``, with one gather for the batch."""
    b, _, h, w = x.shape
    dev = x.device
    if pad:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]  # [B,1,H,1]
        cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]  # [B,1,1,W]
        bidx = torch.arange(b, device=dev)[:, None, None, None]
        cidx = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        x = xp[bidx, cidx, rows, cols]
    if f is not None:
        x = torch.where(f[:, None, None, None], x.flip(3), x)
    return x


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop after zero padding (and horizontal flip), batched on x's device.

    No per-image Python: offsets are drawn for the whole batch and applied with one gather.
    """
    return apply_augment(x, pad, *augment_params(x.shape[0], pad, flip, generator, x.device))


@dataclass
class DataCheck:
    """What the preflight learnt about the data: training-set size and realised noise rate."""

    num_train: int
    noise_rate: float
    labels: str  # e.g. "symmetric noise 40%", "CIFAR-10N worst (human)"

    def line(self) -> str:
        rate = "unknown (no clean labels)" if math.isnan(self.noise_rate) else f"{100 * self.noise_rate:.2f}%"
        return f"training labels: {self.labels}; realised noise rate {rate} of {self.num_train:,} training images"


def describe_labels(data_cfg, noise_cfg) -> str:
    if noise_cfg is None:
        return "as shipped"
    if noise_cfg.kind == "human":
        name = {"cifar10": "CIFAR-10N", "cifar100": "CIFAR-100N"}.get(data_cfg.dataset, data_cfg.dataset)
        return f"{name} {noise_cfg.label_set} (human annotations)"
    if noise_cfg.kind == "none":
        return "as shipped" + (" (real web noise)" if data_cfg.dataset in ("webvision", "food101n") else "")
    return f"{noise_cfg.kind} noise at rate {noise_cfg.rate:g}"


def check_data(data_cfg, noise_cfg=None) -> DataCheck:
    """Before Ray starts: read the files a run needs (DataError names a bad one).

    In-memory datasets are parsed and their labels built exactly as the workers will (so a missing or
    mismatched CIFAR-N file stops the run here); streamed datasets read their file lists and check
    the class folders, without opening an image.
    """
    if data_cfg.dataset in STREAMED:
        from cmd_dist.streaming import build_streamed

        noise = noise_cfg or SimpleNamespace(kind="none", rate=0.0, seed=0, label_set="", label_file=None)
        d = build_streamed(data_cfg, noise, workers=0)
        return DataCheck(d.num_train, d.noise_rate, describe_labels(data_cfg, noise_cfg))
    coarse = uses_coarse_labels(noise_cfg)
    _, clean = load_split(data_cfg.dataset, data_cfg.root, "train", coarse)
    noisy = (
        training_labels(data_cfg, noise_cfg, clean, dataset_spec(data_cfg, noise_cfg).num_classes)
        if noise_cfg
        else clean
    )
    if data_cfg.train_subset:
        noisy, clean = noisy[: data_cfg.train_subset], clean[: data_cfg.train_subset]
    n = clean.shape[0]
    if data_cfg.protocol == "final":
        load_split(data_cfg.dataset, data_cfg.root, "test", coarse)
    else:
        train_idx, _ = split_train_val(n, data_cfg.val_fraction, seed=noise_cfg.seed if noise_cfg else 0)
        noisy, clean, n = noisy[train_idx], clean[train_idx], int(train_idx.numel())
    return DataCheck(n, noise_rate(noisy, clean), describe_labels(data_cfg, noise_cfg))
