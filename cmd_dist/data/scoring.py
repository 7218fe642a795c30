"""One split of a run's dataset to score trained peers on (``cmd-dist evaluate``), with the labels and the evaluation
view the training run's own evaluation used.

The splits follow the run's protocol (appendix A.2, :mod:`cmd_dist.data.noise`): ``search`` trained on 90% of the
training set and validated on the other 10% (``val``, clean labels); ``final`` trained on all of it and tested on
the test set (``test``). So:

- ``test``: the test set (``data.test_subset`` applies, as it did in training); a search run never read it while
  training, but may be scored on it afterwards;
- ``val``: the search protocol's held-out split, the same images (same seed, same fraction) the run validated on;
  a final-protocol run has none (every training image was trained on): a :class:`ConfigError`;
- ``train``: the images the peers trained on, scored against their *clean* labels where those are known (the
  synthetic or human noise is what they were trained against; accuracy on the clean labels measures what they
  learnt rather than memorised); a streamed dataset without clean labels (WebVision, Food-101N) scores the labels
  as given, and says so in ``labels``.

Resident datasets (digits, CIFAR) come from :func:`~cmd_dist.data.resident.load_split` and are normalised as the
trainer normalises them; streamed ones through :func:`~cmd_dist.data.streamed.build_streamed`'s evaluation batches
(resize to ``image_size / 0.875`` and centre crop, unreadable images skipped and counted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from cmd_dist.data.augment import normalize
from cmd_dist.data.labels import dataset_spec, uses_coarse_labels
from cmd_dist.data.noise import split_train_val
from cmd_dist.data.resident import load_split
from cmd_dist.data.streamed import build_streamed
from cmd_dist.data.types import STREAMED, DatasetSpec
from cmd_dist.errors import ConfigError

SCORING_SPLITS = ("test", "val", "train")


@dataclass
class ScoringSet:
    """A split to score: ``batches(batch_size)`` yields (normalised images on the device, labels)."""

    split: str
    spec: DatasetSpec
    size: int  # images listed (a streamed set may skip unreadable ones: ``skipped``)
    labels: str  # "clean" or "as given (no clean labels)"
    batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    skipped: Callable[[], int] = lambda: 0


def check_split(split: str, protocol: str) -> None:
    """``val`` exists only in the search protocol; an unknown split is an error too."""
    if split not in SCORING_SPLITS:
        raise ConfigError(f"--split: {split!r} is not one of {', '.join(SCORING_SPLITS)}")
    if split == "val" and protocol == "final":
        raise ConfigError(
            "--split val: this run used data.protocol final (it trained on every training image, so no validation "
            "split was held out); use --split test, or --split train for the images it trained on"
        )


def scoring_set(data_cfg, noise_cfg, split: str, device: torch.device | str = "cpu") -> ScoringSet:
    """The ``split`` of the run's dataset, as the module docstring describes."""
    check_split(split, data_cfg.protocol)
    if data_cfg.dataset in STREAMED:
        return _streamed_set(data_cfg, noise_cfg, split, device)
    spec = dataset_spec(data_cfg, noise_cfg)
    coarse = uses_coarse_labels(noise_cfg)
    if split == "test":
        x, y = load_split(data_cfg.dataset, data_cfg.root, "test", coarse)
        if data_cfg.test_subset:
            x, y = x[: data_cfg.test_subset], y[: data_cfg.test_subset]
    else:  # the training set, cut as prepare_resident cuts it
        x, y = load_split(data_cfg.dataset, data_cfg.root, "train", coarse)
        if data_cfg.train_subset:
            x, y = x[: data_cfg.train_subset], y[: data_cfg.train_subset]
        if data_cfg.protocol == "search":
            train_idx, val_idx = split_train_val(len(y), data_cfg.val_fraction, seed=noise_cfg.seed)
            idx = val_idx if split == "val" else train_idx
            x, y = x[idx], y[idx]
    dev = torch.device(device)
    shape = (1, spec.channels, 1, 1)
    mean, std = torch.tensor(spec.mean, device=dev).view(shape), torch.tensor(spec.std, device=dev).view(shape)

    def batches(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, int(y.shape[0]), batch_size):
            yield normalize(x[i : i + batch_size].to(dev), mean, std), y[i : i + batch_size].to(dev)

    return ScoringSet(split, spec, int(y.shape[0]), "clean", batches)


def _streamed_set(data_cfg, noise_cfg, split: str, device) -> ScoringSet:
    # A search run scored on the test set: the final protocol's lists give it (the training lists are not used).
    cfg = dataclasses.replace(data_cfg, protocol="final") if split == "test" else data_cfg
    data = build_streamed(cfg, noise_cfg, device=device)
    labels = "clean"
    if split == "train":
        train = data.train
        if (train.clean >= 0).all():
            train = train.relabelled(train.clean.copy(), train.clean)
        else:
            labels = "as given (no clean labels)"
        data.evals["train"] = train
    images = data.evals[split]
    if split != "train" and (images.clean < 0).any():
        labels = "as given (no clean labels)"

    def batches(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from data.eval_batches(batch_size, split=split)

    return ScoringSet(split, data.spec, len(images), labels, batches, lambda: data.skipped_images)
