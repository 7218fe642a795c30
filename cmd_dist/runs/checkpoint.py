"""Per-epoch checkpoints: written atomically, verified on load, loaded with weights_only=True.

A checkpoint folder ``run_dir/checkpoint_<epoch>`` holds one ``peer<k>.pt`` per peer (written by
the worker hosting it, straight into the run folder, which every worker sees) and ``peer<k>.sha256``
beside it; rank 0 writes ``metrics.json`` and, last, ``epoch.txt`` once every worker's files are
there. A file is first written under a temporary name and then renamed, so a crash never leaves a
half-written file under the final name (and a failed write, e.g. a full disk, leaves no temporary
file); the checksum catches truncation or corruption afterwards.

Which checkpoint a run resumes from and which ones it keeps are decided here, from the files alone:
the newest *complete* checkpoint (marker written, every peer file verified) is the one to resume
from, and retention never deletes it (:func:`prune_checkpoints`).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cmd_dist.errors import CheckpointError, RunFolderBusy


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename; on any failure (full disk, ...) the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


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
        raise CheckpointError(f"checkpoint file {path} cannot be loaded safely: {str(e).splitlines()[0]}") from None


def verify_checkpoint(folder: Path, num_peers: int) -> None:
    for k in range(num_peers):
        load_peer_state(folder, k)


CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_folder(run_dir: Path, epoch: int) -> Path:
    """Where epoch ``epoch``'s checkpoint lives (1-based: the state after that many epochs)."""
    return Path(run_dir) / f"{CHECKPOINT_PREFIX}{epoch:06d}"


def checkpoint_epoch(folder: Path) -> int:
    """The epoch a checkpoint folder's marker names, or -1 when the marker is missing or unreadable."""
    try:
        return int((Path(folder) / "epoch.txt").read_text())
    except (OSError, ValueError):
        return -1


def folder_epoch(folder: Path) -> int:
    """The epoch a checkpoint folder is named for (known before its marker is written), or -1."""
    try:
        return int(Path(folder).name.removeprefix(CHECKPOINT_PREFIX))
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


def newest_complete_checkpoint(
    run_dir: Path, num_peers: int, warn: Callable[[str], None] = print, extra: Path | None = None
) -> Path | None:
    """The complete checkpoint with the highest epoch (``extra``, e.g. one Ray handed back, competes too).

    Newer folders that fail verification are reported once each through ``warn`` and skipped.
    """
    folders = checkpoint_folders(run_dir)
    if extra is not None and Path(extra).is_dir() and Path(extra) not in folders:
        folders.append(Path(extra))
    folders.sort(key=lambda p: (max(folder_epoch(p), checkpoint_epoch(p)), p.name), reverse=True)
    for folder in folders:
        try:
            check_checkpoint(folder, num_peers)
            return folder
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {folder}: {e}")
    return None


def select_pruned(folders: list[tuple[Any, int, bool]], keep: int) -> list[Any]:
    """Which checkpoint folders retention deletes, given ``(folder, folder epoch, complete)`` for each.

    Keeps the ``keep`` newest complete ones; never deletes the newest complete one (there is always one
    to resume from), and deletes an incomplete or corrupt folder only when a newer complete one exists,
    so a checkpoint being written right now (always the newest) is never touched. The same rule serves
    a run folder (:func:`prune_checkpoints`) and a run folder behind a URI (``cmd_dist.runs.storage``).
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


def prune_checkpoints(run_dir: Path, keep: int, num_peers: int, verified: set[Path] | None = None) -> list[Path]:
    """Keep the ``keep`` newest complete checkpoints; delete older folders and broken ones (:func:`select_pruned`).

    ``verified`` caches folders already checked (their files are immutable once complete), so pruning
    reads each checkpoint once. Returns the deleted folders.
    """
    verified = verified if verified is not None else set()
    entries = []
    for folder in checkpoint_folders(run_dir):
        ok = folder in verified
        if not ok:
            try:
                check_checkpoint(folder, num_peers)
                ok = True
                verified.add(folder)
            except CheckpointError:
                ok = False
        entries.append((folder, folder_epoch(folder), ok))
    removed = select_pruned(entries, keep)
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
        verified.discard(folder)
    return removed


def write_epoch_marker(folder: Path, epoch: int) -> None:
    atomic_write_bytes(Path(folder) / "epoch.txt", str(epoch).encode())


# ----------------------------------------------------------------------------- run-folder lock


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.lock`` for as long as a run owns its folder.

    The kernel drops the lock when the process dies however it dies, so a crashed run never leaves
    a stale lock behind; the file records who holds it, for the message a second run prints.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl
        import json
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(self.path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
            raise RunFolderBusy(
                f"run folder {self.path.parent} is in use by another cmd-dist run ({who}); wait for it to "
                f"finish, or choose another run_name"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
