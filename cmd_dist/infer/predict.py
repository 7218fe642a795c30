"""``cmd-dist predict``'s Ray-free parts: the peers' class probabilities for a batch of views (one peer, or the
peers' ensemble), the top-k rows, the CSV they go to, and the local path (a torch DataLoader in this process).

**The ensemble** is the mean of the peers' softmax outputs, p = (1/N) sum_k softmax(f_k(x)): two peers trained
together are a ready ensemble (DivideMix, Li et al., ICLR 2020, tests with its two networks' outputs combined, as
issue 20 notes; the paper's Sec. 2 recalls KDCL [13], whose teacher is the ensemble of all its students; the mean
over N keeps a probability). ``--peer NAME`` takes one peer's softmax alone.

**The CSV** follows timm's ``inference.py`` with ``--results-separate-col`` (one column per rank, so a spreadsheet
reads it): ``filename`` (the path as listed, timm's ``--fullname``), then ``index_0 .. index_{k-1}`` (class
indices, most probable first), ``label_0 ..`` (their class names), ``prob_0 ..`` (their probabilities, 6
significant digits). It is written under a temporary name beside ``--out`` and renamed when complete, so a
crash or Ctrl-C never leaves half a file under the real name.

**The local path** (no ``--address``): the peers are built once, on the GPU when there is one; a DataLoader reads
and transforms the files in ``min(8, CPUs)`` worker processes (none for a single batch: starting them costs more
than it saves), pinned memory on CUDA. Unreadable files come back from the workers as a reason and are skipped.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cmd_dist.data.types import DatasetSpec
from cmd_dist.errors import ConfigError
from cmd_dist.infer.images import UnreadableImage, load_view, normalize

ENSEMBLE = "ensemble"


class PeerProbabilities:
    """Class probabilities of the chosen peer (or the peers' ensemble) for uint8 views, on ``device``."""

    def __init__(self, models: dict[str, torch.nn.Module], spec: DatasetSpec, peer: str = ENSEMBLE, device="cpu"):
        if peer != ENSEMBLE and peer not in models:
            raise ConfigError(
                f"--peer: {peer!r} is not a peer of this run (its peers: {', '.join(models)}); name one, or ensemble"
            )
        self.spec = spec
        self.device = torch.device(device)
        chosen = models if peer == ENSEMBLE else {peer: models[peer]}
        self.models = [m.to(self.device).eval() for m in chosen.values()]

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, S, S] -> float32 [B, num_classes] on the CPU: the mean of the chosen peers' softmax."""
        x = normalize(views.to(self.device, non_blocking=True), self.spec)
        probs = sum(torch.softmax(m(x).float(), dim=1) for m in self.models) / len(self.models)
        return probs.cpu()


def top_k(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities) of the k most probable classes of each row, most probable first."""
    values, indices = torch.topk(probs, min(k, probs.shape[1]), dim=1, largest=True, sorted=True)
    return indices.numpy(), values.numpy()


def csv_header(k: int) -> list[str]:
    """timm ``inference.py``'s column names (``--results-separate-col``), filename first."""
    return (
        ["filename"]
        + [f"index_{i}" for i in range(k)]
        + [f"label_{i}" for i in range(k)]
        + [f"prob_{i}" for i in range(k)]
    )


@dataclass
class PredictionCsv:
    """The predictions CSV, written atomically: rows go to ``.NAME.tmpPID`` beside ``path``, renamed on close."""

    path: Path
    k: int
    class_names: list[str]
    rows: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def __enter__(self) -> PredictionCsv:
        self.path = Path(self.path)
        if self.path.is_dir():
            raise ConfigError(f"--out {self.path}: is a folder; name a file, e.g. {self.path / 'preds.csv'}")
        if not self.path.parent.is_dir():
            raise ConfigError(f"--out {self.path}: the folder {self.path.parent} does not exist; create it first")
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._file = open(self._tmp, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._writer.writerow(csv_header(self.k))
        return self

    def write(self, files: list[str], indices: np.ndarray, probs: np.ndarray) -> None:
        """One row per file: its top-k indices (most probable first), their names and probabilities."""
        for name, idx, p in zip(files, indices.tolist(), probs.tolist()):
            labels = [self.class_names[i] for i in idx]
            self._writer.writerow([name, *idx, *labels, *(f"{v:.6g}" for v in p)])
        self.rows += len(files)

    def skip(self, file: str, reason: str) -> None:
        """An unreadable file: said on stderr at once, counted, no row."""
        self.unreadable.append((file, reason))
        print(f"cmd-dist: skipped unreadable image {file}: {reason}", file=sys.stderr, flush=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._file.flush()
            if exc_type is None:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


class ViewDataset(Dataset):
    """Item i: (i, the evaluation view of file i or an empty tensor, the reason it is unreadable or "")."""

    def __init__(self, files: list[str], spec: DatasetSpec, streamed: bool) -> None:
        self.files, self.spec, self.streamed = files, spec, streamed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        try:
            return i, load_view(self.files[i], self.spec, self.streamed), ""
        except (UnreadableImage, OSError) as e:
            reason = str(e) if isinstance(e, UnreadableImage) else f"{type(e).__name__}: {e.strerror or e}"
            return i, torch.empty(0, dtype=torch.uint8), reason


def collate_views(items: list[tuple[int, torch.Tensor, str]]) -> dict:
    """A batch: the readable views stacked with their file indices, and the unreadable ones with their reasons."""
    ok = [(i, v) for i, v, why in items if not why]
    return {
        "ids": [i for i, _ in ok],
        "x": torch.stack([v for _, v in ok]) if ok else None,
        "bad": [(i, why) for i, _, why in items if why],
    }


def default_workers(files: int, batch_size: int) -> int:
    """Loader processes: one per CPU up to 8, none when everything fits in one batch."""
    return 0 if files <= batch_size else min(8, os.cpu_count() or 1)


def local_batches(
    files: list[str], spec: DatasetSpec, streamed: bool, batch_size: int, device: torch.device, workers: int | None
) -> Iterator[dict]:
    """The files' views in batches of ``batch_size``, in order, read by a DataLoader."""
    workers = default_workers(len(files), batch_size) if workers is None else workers
    loader = DataLoader(
        ViewDataset(files, spec, streamed),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_views,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    yield from loader


def predict_local(
    probs_of: PeerProbabilities,
    files: list[str],
    out: PredictionCsv,
    streamed: bool,
    batch_size: int = 256,
    workers: int | None = None,
) -> None:
    """Every file's top-k row into ``out`` (opened), in the files' order; unreadable files skipped and listed."""
    for batch in local_batches(files, probs_of.spec, streamed, batch_size, probs_of.device, workers):
        for i, why in batch["bad"]:
            out.skip(files[i], why)
        if batch["ids"]:
            indices, probs = top_k(probs_of(batch["x"]), out.k)
            out.write([files[i] for i in batch["ids"]], indices, probs)
