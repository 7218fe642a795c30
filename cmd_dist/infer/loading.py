"""A trained run opened for use: its config, one checkpoint's peers (verified), the dataset's description and the
class names; every command that uses what was trained (``evaluate``, ``predict``, ``export``) starts here.

``open_trained_run(RUN, checkpoint)`` takes a run folder or a URI (``output_dir`` may be one). Behind a URI only
``config.yaml``, ``summary.json`` and the chosen checkpoint's files are downloaded, into a staging folder private
to this process (:class:`~cmd_dist.runs.storage.RunStore`), removed when the :class:`TrainedRun` is closed or
collected. The checkpoint is one of

- ``best``: ``best_checkpoint/``, the epoch with the best mean accuracy on the eval split (in the ``search``
  protocol the held-out validation split; in ``final`` the test split, kept for inspection: see the README);
- ``last``: the newest *complete* checkpoint (marker written, every peer's file verified), the one
  ``cmd-dist train --resume`` would continue from (:func:`cmd_dist.runs.checkpoint.newest_complete`);
- an epoch number: ``checkpoint_<epoch>/``, which must be complete.

Every peer's file is checked against its checksum and loaded with ``torch.load(weights_only=True)``
(:func:`cmd_dist.runs.checkpoint.load_peer_state`); a peer holding another epoch than the marker is refused. The
class count is the trained classifier's (the rows of the state's last 2-D weight), so a streamed dataset's run
opens without its image folders; the networks are rebuilt exactly as :func:`cmd_dist.train.peers.build_peer`
builds them (:func:`cmd_dist.models.build_model` with the dataset's channels and input size). Ray-free.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmd_dist.config import Config, load_config
from cmd_dist.data.class_names import class_names as dataset_class_names
from cmd_dist.data.labels import dataset_spec
from cmd_dist.data.streamed import streamed_spec
from cmd_dist.data.types import STREAMED, DatasetSpec
from cmd_dist.errors import CheckpointError, ConfigError, RunError
from cmd_dist.models import build_model
from cmd_dist.runs.checkpoint import (
    CHECKPOINT_PREFIX,
    checkpoint_epoch,
    checkpoint_names,
    is_complete,
    load_peer_state,
    marker_epoch,
)
from cmd_dist.runs.fs import absolute, open_folder
from cmd_dist.runs.storage import RunStore

BEST = "best_checkpoint"
CHECKPOINT_CHOICES = "best, last or an epoch number"


@dataclass
class TrainedRun:
    """One checkpoint of a trained run, ready to use (see the module docstring)."""

    run: str  # as the user named it: a folder or a URI
    run_dir: Path  # a local folder holding config.yaml, summary.json (when the run wrote one) and the checkpoint
    cfg: Config
    checkpoint: str  # "best_checkpoint" or "checkpoint_000012"
    epoch: int  # the epoch that checkpoint holds
    states: dict[int, dict]  # peer index -> the peer's state (checksum verified, weights_only load)
    spec: DatasetSpec  # the run's dataset: num_classes, channels, size, mean, std
    class_names: list[str]  # len == spec.num_classes
    peer_names: list[str]  # cfg.peers[k].name, in peer order
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json ({} when the run wrote none yet)
    store: RunStore | None = field(default=None, repr=False)  # keeps a URI run's staging folder alive

    def peer_index(self, peer: int | str) -> int:
        """A peer's index from its index or name; RunError naming the run's peers otherwise."""
        if isinstance(peer, int) and 0 <= peer < len(self.peer_names):
            return peer
        if peer in self.peer_names:
            return self.peer_names.index(peer)
        raise RunError(
            f"--peer: {peer!r} is not a peer of {self.run} (its peers: {', '.join(self.peer_names)}); "
            f"name one of them, or ensemble"
        )

    def model(self, peer: int | str, device: torch.device | str = "cpu") -> torch.nn.Module:
        """Peer ``peer``'s network with this checkpoint's weights, in eval mode, on ``device``."""
        k = self.peer_index(peer)
        net = build_model(self.cfg.peers[k].arch, self.spec.num_classes, self.spec.channels, self.spec.size)
        net.load_state_dict(self.states[k]["model"])
        return net.to(device).eval()

    def models(self, device: torch.device | str = "cpu") -> dict[str, torch.nn.Module]:
        """Every peer's network (:meth:`model`), by name, in peer order."""
        return {name: self.model(k, device) for k, name in enumerate(self.peer_names)}

    @property
    def streamed(self) -> bool:
        """The run's dataset is streamed from image files (evaluation view: resize + centre crop)."""
        return self.cfg.data.dataset in STREAMED

    def close(self) -> None:
        """Remove a URI run's staging folder (nothing for a folder)."""
        if self.store is not None:
            self.store.close()


def warn(msg: str) -> None:
    print(f"cmd-dist: {msg}", file=sys.stderr, flush=True)


def open_trained_run(run: str, checkpoint: str = "best", log=warn) -> TrainedRun:
    """Open checkpoint ``checkpoint`` (``best``, ``last`` or an epoch number as text) of run ``run``.

    Errors are one line naming the value and the fix: RunError (not a run folder, a bad ``checkpoint`` word),
    CheckpointError (no such checkpoint, an incomplete one, a checksum that does not match); ``log`` is told about
    newer checkpoints ``last`` skips.
    """
    location = absolute(run)
    folder = open_folder(location, key="RUN")
    if not folder.is_file("config.yaml"):
        raise RunError(_not_a_run(run, location))
    store = RunStore(folder.shown, folder)
    try:
        store.download("config.yaml", "summary.json")
        try:
            cfg = load_config(store.dir / "config.yaml")
        except ConfigError as e:
            raise RunError(f"{folder.uri('config.yaml')}: {e}") from None
        n = len(cfg.peers)
        name = _checkpoint_name(store, checkpoint, n, log)
        epoch, states = _load_checkpoint(store, name, n)
        spec = _spec(cfg, states)
        summary_file = store.dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    except BaseException:
        store.close()
        raise
    return TrainedRun(
        run=str(run),
        run_dir=store.dir,
        cfg=cfg,
        checkpoint=name,
        epoch=epoch,
        states=states,
        spec=spec,
        class_names=dataset_class_names(cfg.data, cfg.noise, spec.num_classes),
        peer_names=[p.name for p in cfg.peers],
        summary=summary if isinstance(summary, dict) else {},
        store=store if store.staged else None,
    )


def _not_a_run(run: str, location: Path | str) -> str:
    """Why ``run`` is not a run folder, and what to pass instead."""
    name = str(location).rstrip("/").rsplit("/", 1)[-1]
    if name == BEST or name.startswith(CHECKPOINT_PREFIX):
        parent = str(location).rstrip("/").rsplit("/", 1)[0]
        return (
            f"{run} is a checkpoint folder, not a run folder; pass the run folder {parent} and choose the checkpoint "
            f"with --checkpoint ({CHECKPOINT_CHOICES})"
        )
    return f"{run} is not a run folder (no config.yaml there); pass a folder written by cmd-dist train"


def complete_checkpoints(store: RunStore, num_peers: int) -> list[str]:
    """What ``--checkpoint`` can name in this run: ``best`` (when complete) and the complete epochs, newest first
    (judged from the listing and markers behind a URI, verified where the files are local)."""
    names = ["best"] if is_complete(store.folder, BEST, num_peers) else []
    return names + [
        str(marker_epoch(store.folder, c))
        for c in checkpoint_names(store.folder)
        if is_complete(store.folder, c, num_peers)
    ]


def _checkpoint_name(store: RunStore, checkpoint: str, num_peers: int, log) -> str:
    """The folder name of ``checkpoint`` (best / last / an epoch); CheckpointError when there is none such."""
    word = str(checkpoint).strip().lower()
    if word == "last":
        local = store.newest_complete_checkpoint(num_peers, warn=log)
        if local is None:
            raise CheckpointError(
                f"{store.shown()} has no complete checkpoint yet (no checkpoint_<epoch>/ with its epoch.txt); "
                f"wait for the run's first checkpoint, or use --checkpoint best"
            )
        return local.name
    if word == "best":
        name = BEST
    elif word.isdigit():
        name = f"{CHECKPOINT_PREFIX}{int(word):06d}"
    else:
        raise RunError(f"--checkpoint: {checkpoint!r} is not {CHECKPOINT_CHOICES}")
    if not store.folder.is_dir(name) or marker_epoch(store.folder, name) < 0:
        there = complete_checkpoints(store, num_peers)
        shown = ", ".join(there[:8]) + (", ..." if len(there) > 8 else "") if there else "none"
        state = "does not exist" if not store.folder.is_dir(name) else "is incomplete (no epoch.txt)"
        raise CheckpointError(
            f"--checkpoint {checkpoint}: {store.shown(name)} {state}; this run has: {shown} "
            f"(retention keeps the newest ray.keep_checkpoints epochs)"
        )
    return name


def _load_checkpoint(store: RunStore, name: str, num_peers: int) -> tuple[int, dict[int, dict]]:
    """(epoch, every peer's state) of checkpoint ``name``: downloaded behind a URI, each file verified."""
    local = store.fetch_checkpoint(name, range(num_peers))
    try:
        epoch = checkpoint_epoch(local)
        if epoch < 0:
            raise CheckpointError(f"{local} is incomplete (no epoch.txt: the run stopped while writing it)")
        states = {k: load_peer_state(local, k) for k in range(num_peers)}
        for k, state in states.items():
            if int(state.get("epoch", -1)) != epoch:
                raise CheckpointError(f"{local}/peer{k}.pt holds epoch {state.get('epoch')}, its epoch.txt {epoch}")
            if not isinstance(state.get("model"), dict):
                raise CheckpointError(f"{local}/peer{k}.pt holds no model weights")
    except CheckpointError as e:
        message = str(e).replace(str(store.dir), store.folder.shown)
        raise CheckpointError(f"{message}; choose another with --checkpoint ({CHECKPOINT_CHOICES})") from None
    return epoch, states


def trained_classes(state: dict[str, Any]) -> int:
    """The class count of a peer's trained classifier: the rows of the last 2-D weight of its state dict."""
    weights = [t for key, t in state["model"].items() if key.endswith("weight") and t.ndim == 2]
    if not weights:
        raise CheckpointError("a peer's weights hold no linear classifier")
    return int(weights[-1].shape[0])


def _spec(cfg: Config, states: dict[int, dict]) -> DatasetSpec:
    """The dataset description the peers were built with (class count: the trained classifier's)."""
    num_classes = trained_classes(states[0])
    if cfg.data.dataset in STREAMED:
        return streamed_spec(cfg.data, num_classes)
    spec = dataset_spec(cfg.data, cfg.noise)
    if spec.num_classes != num_classes:
        raise CheckpointError(
            f"the checkpoint's classifier has {num_classes} classes, its config's dataset {spec.num_classes}"
        )
    return spec
