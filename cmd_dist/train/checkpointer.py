"""The one owner of a run's checkpoints, as every worker sees them: :meth:`Checkpointer.load_latest` and
:meth:`Checkpointer.save`.

A checkpoint ``run_dir/checkpoint_<epoch>`` is complete once its marker ``epoch.txt`` is there, and the
marker is written last: every worker writes (and, for a URI, uploads) its peers' files, then all meet at a
barrier, then rank 0 writes ``metrics.json`` and the marker (and uploads them, the marker last) and applies
retention (``ray.keep_checkpoints``, never the newest complete checkpoint). ``best_checkpoint/`` holds the
epoch with the best mean accuracy on the eval split: on a checkpoint epoch written from the same states
as the checkpoint (no second copy), otherwise held as a host copy until the next checkpoint epoch,
then written the same way, its old marker removed first. Resuming takes the newest complete checkpoint
(rank 0 chooses, every rank follows) and clears the folders past it, locally and on the URI, before anyone
writes. The file format, the marker and retention's rule are :mod:`cmd_dist.runs.checkpoint`'s; the copies
to and from a URI are :class:`~cmd_dist.runs.storage.RunStore`'s.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmd_dist.runs.checkpoint import (
    atomic_write_bytes,
    checkpoint_epoch,
    checkpoint_folder,
    checkpoint_folders,
    folder_epoch,
    load_peer_state,
    save_peer_state,
    write_epoch_marker,
)
from cmd_dist.runs.storage import RunStore
from cmd_dist.train.exchange import Exchange

BEST = "best_checkpoint"


@dataclass
class Restored:
    """What :meth:`Checkpointer.load_latest` found: this worker's peers' states (none for a fresh run)."""

    epoch: int = 0  # epochs done
    states: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: The run had already trained every epoch (e.g. the same run name again): nothing is left to train.
    finished: bool = False
    #: The last epoch's metrics, when ``finished`` (its checkpoint's metrics.json, or {}).
    metrics: dict[str, Any] = field(default_factory=dict)


class Checkpointer:
    """Checkpoints of one run for one worker (collective: every rank calls every method, in the same order).

    ``epochs``: the run's length; ``every``: a checkpoint every that many epochs and after the last;
    ``keep``: how many complete checkpoints retention keeps.
    """

    def __init__(
        self,
        store: RunStore,
        exchange: Exchange,
        num_peers: int,
        epochs: int,
        every: int,
        keep: int,
        log: Callable[[str], None] = print,
    ) -> None:
        self.store, self.exchange, self.num_peers = store, exchange, num_peers
        self.epochs, self.every, self.keep, self.log = epochs, every, keep, log
        self.run_dir = store.dir
        self.best_dir = self.run_dir / BEST
        self.best_score = -math.inf
        #: The best epoch not yet on disk: (CPU copies of the states, metrics, epoch).
        self.best_pending: tuple[dict[int, dict], dict, int] | None = None
        #: Checkpoint folders known complete (written or verified by this run): retention trusts them.
        self.verified: set[Path] = set()

    def load_latest(self) -> Restored:
        """This worker's peers' states from the newest complete checkpoint; then, unless the run is finished,
        the folders past it are cleared (rank 0, after a barrier nobody writes before) and the best score so
        far is read from ``best_checkpoint/``."""
        ex = self.exchange
        # Every rank must pick the same folder: rank 0 decides (and warns once), the others follow.
        choice = self.store.newest_complete_checkpoint(self.num_peers, warn=self.log) if ex.rank == 0 else None
        name = ex.gather_objects(choice.name if choice else None)[0]
        folder = self.store.fetch_checkpoint(name, ex.local_peers) if name else None
        restored = Restored()
        if folder is not None:
            restored.states = {k: load_peer_state(folder, k) for k in ex.local_peers}
            restored.epoch = int(restored.states[ex.local_peers[-1]]["epoch"])
            self.verified.add(folder)
            if restored.epoch >= self.epochs:
                metrics = folder / "metrics.json"
                restored.finished = True
                restored.metrics = json.loads(metrics.read_text()) if metrics.is_file() else {}
                return restored
        if ex.rank == 0:
            if folder is not None:
                self.log(
                    f"resuming from {self.store.shown(folder.name)} (epoch {restored.epoch} done), training epoch "
                    f"{restored.epoch + 1} onwards"
                )
            self._clear_stale(folder, restored.epoch)
        ex.gather_objects(None)  # nobody writes a checkpoint before the stale ones are gone
        self.store.download(f"{BEST}/metrics.json")
        self.best_score = self._stored_best_score()
        return restored

    def save(self, epoch: int, states: dict[int, dict[str, Any]], metrics: dict[str, Any], score: float) -> bool:
        """After ``epoch`` epochs: ``states`` (this worker's peers that write files), the epoch's gathered
        ``metrics`` and its ``score`` (mean eval-split accuracy). A better score is held as the best; on a
        checkpoint epoch the held best is written, then the checkpoint. Returns whether one was written."""
        checkpoint_now = not (epoch % self.every and epoch != self.epochs)
        if score > self.best_score:  # written now from ``states`` itself, or held as a host copy until then
            self.best_score = score
            self.best_pending = (states if checkpoint_now else to_cpu(states), metrics, epoch)
        if not checkpoint_now:
            return False
        if self.best_pending is not None:
            self._save_best(*self.best_pending)
            self.best_pending = None
        self._save_checkpoint(states, metrics, epoch)
        return True

    def _clear_stale(self, keep: Path | None, start_epoch: int) -> None:
        """Folders past the resume point are from epochs about to be retrained (or broken): cleared, here and on
        the URI, so an epoch's folder only ever holds that epoch's files."""
        for stale in checkpoint_folders(self.run_dir):
            if stale != keep and (folder_epoch(stale) > start_epoch or checkpoint_epoch(stale) < 0):
                shutil.rmtree(stale, ignore_errors=True)
        self.store.clear_stale(keep, start_epoch)

    def _save_checkpoint(self, states: dict[int, dict], metrics: dict, epoch: int) -> None:
        """Every worker writes (and uploads) its peers' files; after a barrier rank 0 writes the marker, last,
        uploads it and prunes.

        A write that fails (full disk, read-only folder) raises OSError after removing its temporary
        file; the folder then has no marker, so it is never resumed from, and the next prune removes it.
        """
        folder = checkpoint_folder(self.run_dir, epoch)
        folder.mkdir(parents=True, exist_ok=True)
        for k, state in states.items():
            save_peer_state(folder, k, state)
        self.store.upload_checkpoint_files(folder, states)
        self.exchange.gather_objects(None)
        if self.exchange.rank == 0:
            atomic_write_bytes(folder / "metrics.json", json.dumps(metrics).encode())
            write_epoch_marker(folder, epoch)
            self.store.upload_marker(folder)
            self.verified.add(folder)  # written and checksummed just now, by this run
            self.store.prune(self.keep, self.num_peers, self.verified)

    def _save_best(self, states: dict[int, dict], metrics: dict, epoch: int) -> None:
        """``best_checkpoint/``: rank 0 removes the old marker; after a barrier every worker writes its peers'
        files; after another, rank 0 writes metrics.json and epoch.txt last, so a marker means a consistent set."""
        self.best_dir.mkdir(parents=True, exist_ok=True)
        if self.exchange.rank == 0:
            (self.best_dir / "epoch.txt").unlink(missing_ok=True)
            self.store.delete_uploaded(f"{BEST}/epoch.txt")
        self.exchange.gather_objects(None)
        for k, state in states.items():
            save_peer_state(self.best_dir, k, state)
        self.store.upload(*(f"{BEST}/peer{k}{ext}" for k in states for ext in (".pt", ".sha256")))
        self.exchange.gather_objects(None)
        if self.exchange.rank == 0:
            atomic_write_bytes(self.best_dir / "metrics.json", json.dumps(metrics).encode())
            write_epoch_marker(self.best_dir, epoch)
            self.store.upload(f"{BEST}/metrics.json", f"{BEST}/epoch.txt")

    def _stored_best_score(self) -> float:
        """The mean eval accuracy of ``best_checkpoint/`` (kept across resumes), or -inf."""
        try:
            stored = json.loads((self.best_dir / "metrics.json").read_text())
            return float(stored[f"{stored['eval_split']}_acc"])
        except (OSError, ValueError, KeyError):
            return -math.inf


def to_cpu(obj: Any) -> Any:
    """A copy of a (nested) state with every tensor on the host: the best epoch, held until it is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
