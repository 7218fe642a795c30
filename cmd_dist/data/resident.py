"""Datasets as uint8 tensors on the training device, with whole-batch augmentation there.

CIFAR pickles are parsed directly with a restricted unpickler (untrusted files: numpy arrays,
lists, numbers, bytes and strings only). scikit-learn's digits ship offline for demos and tests.
The training set is corrupted with synthetic noise (Sec. 5.1) or takes CIFAR-N's human labels
(:mod:`cmd_dist.data.human_labels`), and is split as in appendix A.2.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cmd_dist.data.augment import apply_augment, augment_generator, augment_params, epoch_order, normalize
from cmd_dist.data.labels import dataset_spec, training_labels, uses_coarse_labels
from cmd_dist.data.noise import split_train_val
from cmd_dist.data.types import WHOLE, Batch, DatasetSpec, Shard
from cmd_dist.errors import DataError

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
    idx = shipped_index("digits", "train" if split == "train" else "test", len(y))
    return x[idx], y[idx]


#: scikit-learn's ``load_digits()`` holds 1,797 images; cmd-dist's digits "train" is a fixed 80% of them.
DIGITS_SHIPPED = 1797


def shipped_index(dataset: str, split: str, n: int) -> torch.Tensor:
    """The index in the dataset as shipped of each image of ``load_split(dataset, ..., split)``: digits, the
    fixed 80/20 split of ``load_digits()`` (``n`` = 1,797); CIFAR, the position in the pickles (0..n-1)."""
    if dataset == "digits":
        train_idx, test_idx = split_train_val(n, 0.2, seed=0)
        return train_idx if split == "train" else test_idx
    return torch.arange(n)


def load_split(dataset: str, root: str | Path, split: str, coarse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset == "digits":
        return load_digits(split)
    return load_cifar(dataset, root, split, coarse)


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
    skipped: dict[str, str] = field(default_factory=dict)  # never filled: in-memory data has no unreadable images
    #: Per training position: the image's index in the training set as shipped (CIFAR: in the train pickles;
    #: digits: in ``load_digits()``), and that set's size (issue 21: ``cmd-dist label-issues``).
    train_origin: torch.Tensor | None = None
    shipped_train: int = 0

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

    def eval_batches(
        self, batch_size: int, split: str | None = None, shard: Shard = WHOLE
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised images, labels) of the eval split (validation or test), in order (a replica: its batches)."""
        if split not in (None, self.eval_split):
            raise ValueError(f"in-memory data has one eval set ({self.eval_split!r}), not {split!r}")
        for b, i in enumerate(range(0, self.eval_x.shape[0], batch_size)):
            if shard.takes(b):
                yield normalize(self.eval_x[i : i + batch_size], self.mean, self.std), self.eval_y[i : i + batch_size]

    @property
    def skipped_images(self) -> int:
        """Unreadable images skipped: none for in-memory data (streamed datasets count theirs)."""
        return 0

    @property
    def eval_sets(self) -> list[str]:
        return [self.eval_split]


def prepare_resident(data_cfg, noise_cfg, device: torch.device | str = "cpu") -> PeerData:
    """An in-memory dataset on ``device``: labels corrupted on the whole training set (seeded), then split."""
    spec = dataset_spec(data_cfg, noise_cfg)
    coarse = uses_coarse_labels(noise_cfg)
    x, clean = load_split(data_cfg.dataset, data_cfg.root, "train", coarse)
    shipped = DIGITS_SHIPPED if data_cfg.dataset == "digits" else len(clean)
    origin = shipped_index(data_cfg.dataset, "train", shipped)
    # Human labels are matched to the whole training set in file order, before any subset.
    noisy = training_labels(data_cfg, noise_cfg, clean, spec.num_classes)
    if data_cfg.train_subset:
        n = data_cfg.train_subset
        x, clean, noisy, origin = x[:n], clean[:n], noisy[:n], origin[:n]
    read = ["train"]
    if data_cfg.protocol == "search":
        train_idx, val_idx = split_train_val(len(clean), data_cfg.val_fraction, seed=noise_cfg.seed)
        ex, ey, split = x[val_idx], clean[val_idx], "val"
        x, noisy, clean, origin = x[train_idx], noisy[train_idx], clean[train_idx], origin[train_idx]
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
        train_origin=origin,
        shipped_train=shipped,
    )
