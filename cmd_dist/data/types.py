"""Types every dataset shares: the dataset description, one training batch, a replica's shard, and the
:class:`TrainData` protocol the training loop reads resident and streamed datasets through.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, get_args, runtime_checkable

import torch


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


#: Every dataset a run can name (``data.dataset``): the resident ones of :data:`SPECS` and the streamed ones.
DatasetName = Literal["cifar100", "cifar10", "digits", "webvision", "food101n", "imagefolder"]
DATASETS: tuple[str, ...] = get_args(DatasetName)
#: Streamed from disk (cmd_dist.data.streamed); the others are loaded into device memory.
STREAMED = ("webvision", "food101n", "imagefolder")
#: Datasets whose labels carry real (web) noise: no synthetic noise on top.
REAL_NOISE_DATASETS = ("webvision", "food101n")


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


@runtime_checkable
class TrainData(Protocol):
    """What the training loop reads of a dataset, resident (:class:`~cmd_dist.data.resident.PeerData`) or streamed
    (:class:`~cmd_dist.data.streamed.StreamedData`). Nothing else of a dataset is reached from the loop."""

    spec: DatasetSpec
    eval_split: str  # "val" (search protocol) or "test" (final protocol)
    splits_read: list[str]  # the splits this run read (the search protocol never reads test)
    skipped: dict[str, str]  # unreadable images met so far: path -> reason (none for resident data)

    @property
    def num_train(self) -> int: ...

    @property
    def noise_rate(self) -> float: ...  # realised fraction of training labels that differ from the clean ones

    @property
    def skipped_images(self) -> int: ...

    @property
    def eval_sets(self) -> list[str]: ...  # eval_split first, then extra sets scored beside it (never select)

    def steps_per_epoch(self, batch_size: int) -> int: ...

    def epoch_batches(
        self, epoch: int, peers: list[int], batch_size: int, seed: int, *, shard: Shard = ...
    ) -> Iterator[Batch]: ...

    def eval_batches(
        self, batch_size: int, *, split: str | None = None, shard: Shard = ...
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
