"""Per-epoch checkpoints: the folder format (written atomically, verified on load, loaded with weights_only=True)
and the policy that picks, keeps and clears them, once, for a folder and for a URI.

A checkpoint folder ``run_dir/checkpoint_<epoch>`` holds one ``peer<k>.pt`` per peer (written by
the worker hosting it) and ``peer<k>.sha256`` beside it; rank 0 writes ``metrics.json`` and, last,
``epoch.txt`` once every worker's files are there. A file is first written under a temporary name and
then renamed, so a crash never leaves a half-written file under the final name (and a failed write, e.g.
a full disk, leaves no temporary file); the checksum catches truncation or corruption afterwards.

Which checkpoint a run resumes from and which ones it keeps are decided here, from the files alone, for any
:class:`~cmd_dist.runs.fs.Folder`: the newest *complete* checkpoint (marker written, every peer's files there,
verified) is the one to resume from (:func:`newest_complete`), and retention never deletes it
(:func:`prune`). Where the files are on this machine they are verified whole (checksums, safe load); behind a
URI retention and the restart message judge a checkpoint from its listing (markers and file names), and only
the one a run resumes from is downloaded and verified.

torch only to (de)serialize a peer's state.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from cmd_dist.errors import CheckpointError, first_line
from cmd_dist.runs.fs import Folder, atomic_write_bytes

CHECKPOINT_PREFIX = "checkpoint_"
#: The files of one peer in a checkpoint folder.
PEER_FILES = (".pt", ".sha256")


def peer_files(name: str, peers: Any) -> list[str]:
    """The files of these peers in checkpoint folder ``name`` (relative to the run folder)."""
    return [f"{name}/peer{k}{ext}" for k in peers for ext in PEER_FILES]


def save_peer_state(folder: Path, peer: int, state: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = Path(folder) / f"peer{peer}.pt"
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())
    return path


def load_peer_state(folder: Path, peer: int) -> dict[str, Any]:
    path = Path(folder) / f"peer{peer}.pt"
    try:
        data = path.read_bytes()
        want = path.with_suffix(".sha256").read_text().strip()
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file {e.filename} is missing") from None
    if hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupted (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} cannot be loaded safely: {first_line(e)}") from None


def checkpoint_folder(run_dir: Path, epoch: int) -> Path:
    """Where epoch ``epoch``'s checkpoint lives (1-based: the state after that many epochs)."""
    return Path(run_dir) / f"{CHECKPOINT_PREFIX}{epoch:06d}"


def checkpoint_epoch(folder: Path) -> int:
    """The epoch a checkpoint folder's marker names, or -1 when the marker is missing or unreadable."""
    try:
        return int((Path(folder) / "epoch.txt").read_text())
    except (OSError, ValueError):
        return -1


def folder_epoch(folder: Path | str) -> int:
    """The epoch a checkpoint folder (or its name) is named for (known before its marker is written), or -1."""
    try:
        return int(PurePosixPath(folder).name.removeprefix(CHECKPOINT_PREFIX))
    except ValueError:
        return -1


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every ``checkpoint_*`` folder of a run, complete or not."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())


def check_checkpoint(folder: Path, num_peers: int) -> int:
    """The epoch of a complete checkpoint: marker present, every peer file verified, each peer at that epoch.

    Raises CheckpointError naming what is wrong (no marker: the run stopped while writing it).
    """
    epoch = checkpoint_epoch(folder)
    if epoch < 0:
        raise CheckpointError("incomplete (no epoch.txt: the run stopped while writing it)")
    if folder_epoch(folder) >= 0 and folder_epoch(folder) != epoch:
        raise CheckpointError(f"epoch.txt says {epoch}, the folder name {folder_epoch(folder)}")
    for k in range(num_peers):
        state_epoch = int(load_peer_state(folder, k).get("epoch", -1))
        if state_epoch != epoch:
            raise CheckpointError(f"peer{k}.pt holds epoch {state_epoch}, not {epoch}")
    return epoch


def write_epoch_marker(folder: Path, epoch: int) -> None:
    atomic_write_bytes(Path(folder) / "epoch.txt", str(epoch).encode())


# ----------------------------------------------------------------------------- the policy, for any Folder


def marker_epoch(run: Folder, name: str) -> int:
    """The epoch checkpoint folder ``name``'s marker names, or -1 when it is missing or unreadable."""
    data = run.read_bytes(f"{name}/epoch.txt")
    try:
        return int(data) if data is not None else -1
    except ValueError:
        return -1


def checkpoint_names(run: Folder) -> list[str]:
    """Every ``checkpoint_*`` folder of a run, complete or not, newest first (by the epoch in its name; a folder
    whose name holds none, by its marker)."""
    names = [d for d in run.dirs() if d.startswith(CHECKPOINT_PREFIX)]

    def epoch(name: str) -> int:
        named = folder_epoch(name)
        return named if named >= 0 else marker_epoch(run, name)

    return sorted(names, key=lambda n: (epoch(n), n), reverse=True)


def check_listed(run: Folder, name: str, num_peers: int) -> int:
    """The epoch of checkpoint ``name`` if its marker and every peer's files are there (names only, nothing read
    but the marker); CheckpointError naming what is missing otherwise."""
    epoch = marker_epoch(run, name)
    if epoch < 0:
        raise CheckpointError("incomplete (no epoch.txt: the run stopped while writing it)")
    if folder_epoch(name) >= 0 and folder_epoch(name) != epoch:
        raise CheckpointError(f"epoch.txt says {epoch}, the folder name {folder_epoch(name)}")
    there = set(run.files(name))
    for rel in peer_files(name, range(num_peers)):
        if rel not in there:
            raise CheckpointError(f"checkpoint file {run.uri(rel)} is missing")
    return epoch


def is_complete(run: Folder, name: str, num_peers: int) -> bool:
    """Checkpoint ``name`` is complete: listed whole and, where its files are on this machine, verified."""
    try:
        check_listed(run, name, num_peers)
        if run.local is not None:
            check_checkpoint(run.local / name, num_peers)
    except CheckpointError:
        return False
    return True


def newest_complete(
    run: Folder, num_peers: int, verify: Callable[[str], Any], warn: Callable[[str], None] = print
) -> str | None:
    """The name of the newest checkpoint that is listed whole and passes ``verify(name)`` (which raises
    CheckpointError: e.g. :func:`check_checkpoint` of its files, downloaded first behind a URI); the newer
    ones that fail are reported once each through ``warn`` and skipped."""
    for name in checkpoint_names(run):
        try:
            check_listed(run, name, num_peers)
            verify(name)
            return name
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {run.uri(name)}: {e}")
    return None


def newest_epoch(run: Folder, num_peers: int) -> int:
    """The epoch of the newest complete checkpoint (-1: none), without a warning (:func:`is_complete`)."""
    for name in checkpoint_names(run):
        if is_complete(run, name, num_peers):
            return marker_epoch(run, name)
    return -1


def select_pruned(folders: list[tuple[Any, int, bool]], keep: int) -> list[Any]:
    """Which checkpoint folders retention deletes, given ``(folder, folder epoch, complete)`` for each.

    Keeps the ``keep`` newest complete ones; never deletes the newest complete one (there is always one
    to resume from), and deletes an incomplete or corrupt folder only when a newer complete one exists,
    so a checkpoint being written right now (always the newest) is never touched (:func:`prune` applies it).
    """
    good = 0
    doomed = []
    for folder, _, ok in sorted(folders, key=lambda f: (f[1], str(f[0])), reverse=True):
        if ok and good < keep:
            good += 1
        elif good:
            doomed.append(folder)
        # else: nothing complete is newer: this may be the checkpoint being written
    return doomed


def prune(run: Folder, keep: int, num_peers: int, verified: set[str]) -> list[str]:
    """Retention: keep the ``keep`` newest complete checkpoints; delete older folders and broken ones
    (:func:`select_pruned`). Returns the deleted folders' names.

    ``verified`` caches the names of folders already found complete (their files never change once they are),
    so pruning reads each checkpoint once; it is updated.
    """
    entries = []
    for name in checkpoint_names(run):
        ok = name in verified or is_complete(run, name, num_peers)
        if ok:
            verified.add(name)
        entries.append((name, folder_epoch(name), ok))
    doomed = select_pruned(entries, keep)
    for name in doomed:
        run.delete_dir(name)
        verified.discard(name)
    return doomed


def stale(run: Folder, keep: str | None, start_epoch: int) -> list[str]:
    """The checkpoint folders a run resuming after ``start_epoch`` clears before training: those past the resume
    point (about to be retrained) and those without a marker, except ``keep`` (the one it resumes from)."""
    return [
        name
        for name in checkpoint_names(run)
        if name != keep and (folder_epoch(name) > start_epoch or marker_epoch(run, name) < 0)
    ]
