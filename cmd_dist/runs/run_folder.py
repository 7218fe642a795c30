"""A run folder from the driver's side, a folder or a URI alike: made ready for a run (locked, its config
checked and written), its files read and written one at a time, its checkpoints' state judged without
downloading them, and what ``cmd-dist report`` reads copied out of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from cmd_dist.errors import ConfigError, first_line
from cmd_dist.runs.checkpoint import CHECKPOINT_PREFIX, newest_epoch
from cmd_dist.runs.fs import is_uri, join, open_folder, split_location
from cmd_dist.runs.lock import hold_run_lock


def open_run_folder(output_dir: str, run_name: str, config_yaml: str, git_rev: str, lock: bool = True) -> Path | str:
    """The run folder ``output_dir/run_name`` (a Path, or a str behind a URI), ready for a run: locked until
    this process exits (:func:`~cmd_dist.runs.lock.hold_run_lock`), ``config.yaml`` checked against
    ``config_yaml`` and written with ``git_rev.txt``.

    ``output_dir`` is already absolute (:func:`~cmd_dist.runs.fs.absolute`). ``lock=False`` leaves the lock out:
    a tune trial's folder behind a URI, covered by its search's lock (a trial killed with its search would
    otherwise leave a lock that refuses ``--resume`` for a while). A config that differs from the one there,
    a URI that cannot be opened, a folder that cannot be written: ConfigError (one line naming the fix).
    """
    run_dir = join(output_dir, run_name)
    folder = open_folder(run_dir)  # an unknown scheme, missing credentials: one line now
    try:
        if lock:
            hold_run_lock(run_dir)
        existing = folder.read_bytes("config.yaml")
        if existing is not None and existing.decode() != config_yaml:
            raise ConfigError(
                f"run_name: {run_name!r} already exists in {output_dir} with a different config; "
                f"use 'cmd-dist train --resume {run_dir}' to continue it, or choose a new run_name"
            )
        folder.write_bytes("config.yaml", config_yaml.encode())
        folder.write_bytes("git_rev.txt", (git_rev + "\n").encode())
    except OSError as e:
        if is_uri(run_dir):
            why, fix = first_line(e), "check the URI and this machine's credentials for it"
        else:
            why, fix = e.strerror or e, "choose a writable output_dir with free space"
        raise ConfigError(f"output_dir: cannot write the run folder {run_dir} ({why}); {fix}") from None
    return run_dir


def read_run_file(location: str | os.PathLike, rel: str) -> bytes | None:
    """One file of a run folder (a path or a URI), or None."""
    return open_folder(location).read_bytes(rel)


def write_run_file(location: str | os.PathLike, rel: str, data: bytes) -> None:
    """Write one file of a run folder (atomically in a folder; a whole object behind a URI)."""
    open_folder(location).write_bytes(rel, data)


def worker_records(location: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's ``workers/rank<r>.json`` records (unreadable or damaged ones skipped)."""
    folder = open_folder(location)
    out = []
    for rel in folder.files("workers", recursive=False):
        name = PurePosixPath(rel).name
        if not (name.startswith("rank") and name.endswith(".json")):
            continue
        try:
            out.append(json.loads(folder.read_bytes(rel) or b""))
        except (OSError, ValueError):
            continue
    return out


def newest_checkpoint_epoch(location: str | os.PathLike, num_peers: int) -> int:
    """The newest complete checkpoint's epoch (-1: none); behind a URI judged from its listing and markers."""
    return newest_epoch(open_folder(location), num_peers)


# ----------------------------------------------------------------------------- reading runs back (report)

#: The files ``cmd-dist report`` reads from a run or search folder.
REPORT_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "search.yaml", "results.csv")
_SKIPPED_DIRS = ("tb", "workers", "best_checkpoint", "report")


def mirror_for_report(uri: str | os.PathLike, dest: Path) -> Path:
    """Where ``cmd-dist report`` reads the runs under ``uri`` on this machine: a folder is read where it is; behind
    a URI, what it reads (config, metrics, summaries, search results) is copied into ``dest/<last part of the
    URI>``, keeping the layout (never a checkpoint or event file)."""
    folder = open_folder(uri)
    if folder.local is not None:
        return folder.local
    local = Path(dest) / (split_location(uri)[1] or "run")
    for rel in folder.files():
        parts = PurePosixPath(rel).parts
        if parts[-1] not in REPORT_FILES:
            continue
        if any(p.startswith(CHECKPOINT_PREFIX) or p in _SKIPPED_DIRS or p.startswith(".") for p in parts[:-1]):
            continue
        folder.download(rel, local / rel)
    return local


def upload_folder(local: Path, uri: str) -> int:
    """Copy every file under ``local`` to ``uri`` (keeping the layout); returns how many."""
    folder = open_folder(uri)
    count = 0
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            folder.upload(path, path.relative_to(local).as_posix())
            count += 1
    return count
