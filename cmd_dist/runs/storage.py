"""A run folder as the training code sees it: :class:`RunStore`, over a folder or a URI alike.

``store.dir`` is a local folder with the run folder's layout, where the engine writes exactly as it does for a
local run; ``store.folder`` is the run folder itself (a :class:`~cmd_dist.runs.fs.Folder`). For a folder the
two are the same place and the copies between them are nothing. For a URI, ``store.dir`` is a staging folder
private to this process (never shared with another process or run) and the store copies files between it and
the URI:

- each worker uploads its peers' checkpoint files right after writing them; after a barrier rank 0 uploads
  ``metrics.json`` and, last, the marker ``epoch.txt``, so a checkpoint on the URI is complete iff its marker
  is there (a :class:`~cmd_dist.runs.fs.Remote` writes a file whole or not at all);
- rank 0 prunes with :func:`cmd_dist.runs.checkpoint.prune` (never the newest complete checkpoint, never the
  one being written) and uploads ``metrics.jsonl`` and the TensorBoard event files after every epoch; the
  driver writes ``config.yaml``, ``git_rev.txt`` and ``summary.json`` there;
- on start, rank 0 picks the newest complete checkpoint (:func:`cmd_dist.runs.checkpoint.newest_complete`;
  behind a URI it is downloaded and verified: checksums, ``weights_only`` load), every worker downloads its
  own peers' files of it.

Ray-free; the tests use it with pyarrow's in-memory mock filesystem, with ``file://`` and with folders.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

from cmd_dist.errors import CheckpointError
from cmd_dist.runs import checkpoint
from cmd_dist.runs.checkpoint import CHECKPOINT_PREFIX, check_checkpoint, peer_files
from cmd_dist.runs.fs import (
    Folder,
    LocalFolder,
    open_folder,
    split_location,
)

#: Environment variable naming where staging folders go (default: the system's temporary folder).
STAGING_ENV = "CMD_DIST_STAGING_DIR"


# ----------------------------------------------------------------------------- staging folders of URI runs


def staging_root() -> Path:
    return Path(os.environ.get(STAGING_ENV) or tempfile.gettempdir()) / "cmd-dist-staging"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_prefix(uri: str) -> str:
    run_name = split_location(uri)[1] or "run"
    return f"{hashlib.sha1(uri.rstrip('/').encode()).hexdigest()[:10]}-{run_name[:40]}-p"


def remove_dead_staging(uri: str) -> int:
    """Remove this host's staging folders of run ``uri`` left by processes that died (a killed worker); returns
    how many. Folders of live processes stay (``cmd-dist tune`` runs this on every node for its trials)."""
    root = staging_root()
    prefix = _staging_prefix(uri)
    removed = 0
    for old in root.glob(f"{glob.escape(prefix)}*"):
        try:
            pid = int(old.name[len(prefix) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(old, ignore_errors=True)
            removed += 1
    return removed


def make_staging(uri: str) -> Path:
    """A fresh staging folder for this process and this run (``<hash of the URI>-<run>-p<pid>-<random>``).

    Staging folders of the same run left by processes that died on this host (a killed worker) are removed.
    """
    root = staging_root()
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(uri)
    return Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(uri)}{os.getpid()}-", dir=root))


# ----------------------------------------------------------------------------- the store


class RunStore:
    """One run folder as the engine sees it: ``dir`` (where it writes) and ``folder`` (the run folder).

    ``RunStore(location)`` opens ``location`` (a path or a URI); ``folder`` may be given instead (the tests
    pass a mock filesystem). The copies between ``dir`` and ``folder`` (:meth:`upload`, :meth:`download`,
    :meth:`delete_uploaded`, :meth:`sync_logs`, :meth:`upload_checkpoint_files`) are nothing when ``dir`` is
    the run folder; every other method is the same for both.
    """

    def __init__(self, location: str | os.PathLike, folder: Folder | None = None) -> None:
        self.location = str(location)
        self.folder = folder if folder is not None else open_folder(location)
        #: ``dir`` is a staging copy of a run folder behind a URI (else it is the run folder).
        self.staged = self.folder.local is None
        self._finalizer = None
        if not self.staged:
            self.dir = self.folder.local
        else:
            self.dir = make_staging(self.location)
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self._sent: dict[str, tuple[int, int]] = {}

    @classmethod
    def open(cls, location: str | os.PathLike | RunStore) -> RunStore:
        if isinstance(location, RunStore):
            return location
        folder = open_folder(location)
        return cls(folder.shown, folder)

    @property
    def is_uri(self) -> bool:
        return self.staged

    def shown(self, rel: str = "") -> str:
        """A file's name as the user sees it (the URI's, not the staging folder's)."""
        return self.folder.uri(rel)

    def close(self) -> None:
        """Remove the staging folder (a URI store); nothing for a folder."""
        if self._finalizer is not None:
            self._finalizer()

    # ------------------------------------------------------------------------------ copies of a staged run

    def upload(self, *rels: str) -> None:
        """Copy these files of ``dir`` to the run folder, in this order (the caller puts a marker last)."""
        if not self.staged:
            return
        for rel in rels:
            self.folder.upload(self.dir / rel, rel)

    def download(self, *rels: str) -> None:
        """Copy these files of the run folder into ``dir`` where they exist there (a missing one is skipped)."""
        if not self.staged:
            return
        for rel in rels:
            if not self.folder.download(rel, self.dir / rel):
                (self.dir / rel).unlink(missing_ok=True)

    def delete_uploaded(self, *rels: str) -> None:
        """Delete these files' uploaded copies (the engine deletes the ones in ``dir`` itself)."""
        if not self.staged:
            return
        for rel in rels:
            self.folder.delete_file(rel)

    def sync_logs(self) -> int:
        """Upload ``metrics.jsonl`` and the TensorBoard files that changed since the last call; returns how many."""
        if not self.staged:
            return 0
        changed = []
        paths = [self.dir / "metrics.jsonl", *sorted((self.dir / "tb").rglob("*"))]
        for path in paths:
            if not path.is_file() or path.name.startswith("."):
                continue
            st = path.stat()
            rel = path.relative_to(self.dir).as_posix()
            if self._sent.get(rel) != (st.st_size, st.st_mtime_ns):
                self.folder.upload(path, rel)
                self._sent[rel] = (st.st_size, st.st_mtime_ns)
                changed.append(rel)
        return len(changed)

    # ------------------------------------------------------------------------------ checkpoints

    def newest_complete_checkpoint(self, num_peers: int, warn: Callable[[str], None] = print) -> Path | None:
        """The newest complete checkpoint, as a folder in ``dir`` (rank 0 decides; behind a URI it is downloaded
        whole and verified here); newer candidates that fail are reported through ``warn`` and skipped."""
        name = checkpoint.newest_complete(self.folder, num_peers, lambda n: self._verify(n, num_peers), warn)
        return self.dir / name if name is not None else None

    def _verify(self, name: str, num_peers: int) -> None:
        local = self.fetch_checkpoint(name, range(num_peers))
        try:
            check_checkpoint(local, num_peers)
        except CheckpointError as e:
            if self.staged:
                shutil.rmtree(local, ignore_errors=True)
            raise CheckpointError(str(e).replace(str(self.dir), self.folder.shown)) from None

    def fetch_checkpoint(self, name: str, peers: Iterable[int]) -> Path:
        """The local folder of checkpoint ``name`` holding (at least) these peers' files (downloaded for a URI)."""
        for rel in [*peer_files(name, peers), f"{name}/metrics.json", f"{name}/epoch.txt"]:
            if not (self.dir / rel).is_file():
                self.folder.download(rel, self.dir / rel)
        return self.dir / name

    def clear_stale(self, keep: Path | None, start_epoch: int) -> None:
        """Delete the run folder's checkpoint folders past the resume point or without a marker (except
        ``keep``); the engine clears the ones in ``dir`` itself."""
        for name in checkpoint.stale(self.folder, keep.name if keep is not None else None, start_epoch):
            self.folder.delete_dir(name)

    def upload_checkpoint_files(self, folder: Path, peers: Iterable[int]) -> None:
        """A worker's part of a checkpoint: its peers' files go up; its older local checkpoint folders are
        dropped (they are uploaded), so staging holds one checkpoint at most."""
        if not self.staged:
            return
        self.upload(*peer_files(folder.name, peers))
        for old in self.dir.glob(f"{CHECKPOINT_PREFIX}*"):
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)

    def upload_marker(self, folder: Path) -> None:
        """Rank 0, after every worker's files are up: ``metrics.json``, then the marker, last."""
        self.upload(f"{folder.name}/metrics.json", f"{folder.name}/epoch.txt")

    def prune(self, keep: int, num_peers: int, verified: set[Path]) -> list[str]:
        """Retention (:func:`cmd_dist.runs.checkpoint.prune`); ``verified`` holds the folders in ``dir`` known to
        be complete. Returns the deleted folders as the user names them."""
        names = {p.name for p in verified}
        doomed = checkpoint.prune(self.folder, keep, num_peers, names)
        verified.difference_update(self.dir / n for n in doomed)
        verified.update(self.dir / n for n in names)
        return [self.folder.uri(n) for n in doomed]


# ----------------------------------------------------------------------------- a folder's checkpoints, by path


def newest_complete_checkpoint(run_dir: Path, num_peers: int, warn: Callable[[str], None] = print) -> Path | None:
    """The newest complete checkpoint folder of a run folder (see :meth:`RunStore.newest_complete_checkpoint`)."""
    return RunStore(run_dir, LocalFolder(run_dir)).newest_complete_checkpoint(num_peers, warn)


def prune_checkpoints(run_dir: Path, keep: int, num_peers: int, verified: set[Path] | None = None) -> list[Path]:
    """Retention in a run folder (see :meth:`RunStore.prune`); returns the deleted folders."""
    store = RunStore(run_dir, LocalFolder(run_dir))
    return [Path(p) for p in store.prune(keep, num_peers, verified if verified is not None else set())]
