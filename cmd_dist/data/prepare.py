"""The data layer's entry: build a run's :class:`~cmd_dist.data.types.TrainData` (resident or streamed) and
the preflight check that reads the files before Ray starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from cmd_dist.data.labels import dataset_spec, describe_labels, training_labels, uses_coarse_labels
from cmd_dist.data.noise import noise_rate, split_train_val
from cmd_dist.data.resident import load_split, prepare_resident
from cmd_dist.data.streamed import build_streamed
from cmd_dist.data.types import STREAMED, TrainData


def prepare_data(data_cfg, noise_cfg, device: torch.device | str = "cpu") -> TrainData:
    """Load, corrupt (whole training set, seeded) and split; the search protocol never reads test.

    Streamed datasets return a :class:`cmd_dist.data.streamed.StreamedData` (file lists only), the others a
    :class:`cmd_dist.data.resident.PeerData` resident on ``device``.
    """
    if data_cfg.dataset in STREAMED:
        return build_streamed(data_cfg, noise_cfg, device=device)
    return prepare_resident(data_cfg, noise_cfg, device)


@dataclass
class DataCheck:
    """What the preflight learnt about the data: training-set size and realised noise rate."""

    num_train: int
    noise_rate: float
    labels: str  # e.g. "symmetric noise 40%", "CIFAR-10N worst (human)"

    def line(self) -> str:
        rate = "unknown (no clean labels)" if math.isnan(self.noise_rate) else f"{100 * self.noise_rate:.2f}%"
        return f"training labels: {self.labels}; realised noise rate {rate} of {self.num_train:,} training images"


def check_data(data_cfg, noise_cfg=None) -> DataCheck:
    """Before Ray starts: read the files a run needs (DataError names a bad one).

    In-memory datasets are parsed and their labels built exactly as the workers will (so a missing or
    mismatched CIFAR-N file stops the run here); streamed datasets read their file lists and check
    the class folders, without opening an image.
    """
    if data_cfg.dataset in STREAMED:
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
