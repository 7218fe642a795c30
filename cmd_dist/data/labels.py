"""The labels a run trains on: synthetic noise (Sec. 5.1), CIFAR-N's human labels, or the clean ones."""

from __future__ import annotations

from dataclasses import replace

import torch

from cmd_dist.data.noise import corrupt_labels
from cmd_dist.data.types import REAL_NOISE_DATASETS, SPECS, DatasetSpec
from cmd_dist.errors import DataError


def uses_coarse_labels(noise_cfg) -> bool:
    """CIFAR-100N's ``noisy_coarse`` trains the 20-superclass task (clean labels: the pickle's coarse_labels)."""
    from cmd_dist.data.human_labels import COARSE_SETS

    return noise_cfg is not None and noise_cfg.kind == "human" and noise_cfg.label_set in COARSE_SETS


def dataset_spec(data_cfg, noise_cfg=None) -> DatasetSpec:
    spec = SPECS[data_cfg.dataset]
    return replace(spec, num_classes=20) if uses_coarse_labels(noise_cfg) else spec


def training_labels(data_cfg, noise_cfg, clean: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The labels trained on, for the whole training set in file order: synthetic, human (CIFAR-N) or clean."""
    if noise_cfg.kind == "none":
        return clean.clone()
    if noise_cfg.kind == "human":
        from cmd_dist.data.human_labels import LabelFileError, human_labels, label_file_path

        try:
            path = label_file_path(data_cfg.dataset, data_cfg.root, noise_cfg.label_file)
            return human_labels(data_cfg.dataset, noise_cfg.label_set, path, clean, num_classes)
        except LabelFileError as e:
            raise DataError(str(e)) from None
    noisy, _ = corrupt_labels(clean, num_classes, noise_cfg.kind, noise_cfg.rate, noise_cfg.seed)
    return noisy


def describe_labels(data_cfg, noise_cfg) -> str:
    if noise_cfg is None:
        return "as shipped"
    if noise_cfg.kind == "human":
        name = {"cifar10": "CIFAR-10N", "cifar100": "CIFAR-100N"}.get(data_cfg.dataset, data_cfg.dataset)
        return f"{name} {noise_cfg.label_set} (human annotations)"
    if noise_cfg.kind == "none":
        return "as shipped" + (" (real web noise)" if data_cfg.dataset in REAL_NOISE_DATASETS else "")
    return f"{noise_cfg.kind} noise at rate {noise_cfg.rate:g}"
