"""Per-epoch checkpoints: written atomically, verified on load, loaded with weights_only=True.

A checkpoint folder holds one ``peer<k>.pt`` per peer (written by the worker hosting it; Ray Train
merges the workers' files into one folder) and ``peer<k>.sha256`` beside it. A file is first
written under a temporary name and then renamed, so a crash never leaves a half-written file under
the final name; the checksum catches truncation or corruption afterwards.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated or altered."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def candidate_checkpoints(latest: Path | None, search_dir: Path | None) -> list[Path]:
    """The latest checkpoint first, then older sibling ``checkpoint_*`` folders, newest first."""
    seen: list[Path] = []
    if latest is not None:
        seen.append(Path(latest))
    roots = {Path(latest).parent} if latest is not None else set()
    if search_dir is not None:
        roots.add(Path(search_dir))
    others = []
    for root in roots:
        if root.is_dir():
            others += [p for p in root.glob("checkpoint_*") if p.is_dir() and p not in seen]
    others.sort(key=lambda p: _epoch_of(p), reverse=True)
    return seen + others


def _epoch_of(folder: Path) -> int:
    try:
        return int((folder / "epoch.txt").read_text())
    except (OSError, ValueError):
        return -1


def write_epoch_marker(folder: Path, epoch: int) -> None:
    atomic_write_bytes(Path(folder) / "epoch.txt", str(epoch).encode())


def first_valid_checkpoint(candidates: list[Path], num_peers: int, warn=print) -> Path | None:
    """The first candidate whose every peer file verifies; each rejected one is reported."""
    for folder in candidates:
        try:
            verify_checkpoint(folder, num_peers)
            return folder
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {folder}: {e}")
    return None
