"""Where a run's files live: a folder (local, or shared by every node: NFS, EFS), or a filesystem URI.

``output_dir`` may be a folder or a URI that pyarrow opens (``s3://bucket/runs``, ``gs://bucket/runs``,
``hdfs://namenode:8020/runs``, ``abfs://...``, ``file:///shared/runs``). A :class:`RunStore` is one run folder
as the training code sees it: ``store.dir`` is a local folder with the run folder's layout, where the engine
writes exactly as it does for a local run. For a folder, ``store.dir`` *is* the run folder and every other
method does nothing. For a URI, ``store.dir`` is a staging folder private to this process (never shared
with another process or run) and the store copies files between it and the URI with pyarrow:

- each worker uploads its peers' checkpoint files right after writing them; after a barrier rank 0 uploads
  ``metrics.json`` and, last, the marker ``epoch.txt``, so a checkpoint on the URI is complete iff its marker
  is there (object stores write an object whole or not at all; a ``file://``/``hdfs://`` file is written
  under a temporary name and renamed);
- rank 0 prunes on the URI with the rule of :func:`cmd_dist.runs.checkpoint.select_pruned` (never the newest
  complete checkpoint, never the one being written) and uploads ``metrics.jsonl`` and the TensorBoard event
  files after every epoch; the driver writes ``config.yaml``, ``git_rev.txt`` and ``summary.json`` there;
- on start, rank 0 picks the newest complete checkpoint on the URI (downloaded and verified: checksums,
  ``weights_only`` load), every worker downloads its own peers' files of it.

:class:`UriRunLock` is the URI's run lock: an object store has no atomic create-if-absent, so it is best
effort (a heartbeat object, refreshed while the run lives; see docs/cluster.md).

Ray-free (pyarrow only); the tests use it with pyarrow's in-memory mock filesystem and with ``file://``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from cmd_dist.runs.checkpoint import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    atomic_write_bytes,
    check_checkpoint,
    checkpoint_epoch,
    folder_epoch,
    newest_complete_checkpoint,
    prune_checkpoints,
    select_pruned,
)
from cmd_dist.config import ConfigError

#: URI schemes pyarrow opens as a filesystem (pyarrow.fs.FileSystem.from_uri), shown in the error message.
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
URI_EXAMPLES = "s3://bucket/runs, gs://bucket/runs, hdfs://namenode:8020/runs or file:///shared/runs"
#: Environment variable naming where staging folders go (default: the system's temporary folder).
STAGING_ENV = "CMD_DIST_STAGING_DIR"
_CHUNK = 8 << 20


def is_uri(location: str | os.PathLike) -> bool:
    """``scheme://...`` (s3, gs, hdfs, file, ...); anything else is a local path."""
    return "://" in str(location)


def check_uri(value: str, key: str = "output_dir") -> None:
    """The URI's form (no network): a scheme pyarrow knows and a path; ConfigError naming the value and the fix."""
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in URI_SCHEMES:
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise ConfigError(
            f"{key}: {value!r} is not a filesystem URI cmd-dist can write to ({shown}; known: "
            f"{', '.join(s + '://' for s in URI_SCHEMES)}); use a folder every node sees, or e.g. {URI_EXAMPLES}"
        )
    if scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path.startswith("/")):
        raise ConfigError(
            f"{key}: {value!r}: a file:// URI needs an absolute path (three slashes: file:///shared/runs)"
        )
    if scheme != "file" and not parts.netloc:
        raise ConfigError(f"{key}: {value!r} names no bucket or host; use e.g. {URI_EXAMPLES}")


def open_filesystem(uri: str, key: str = "output_dir") -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it); a URI that cannot be opened (scheme, credentials) is a ConfigError."""
    import pyarrow.fs

    check_uri(uri, key)
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError, pyarrow.ArrowException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key}: cannot open {uri!r} ({first}); check the URI and this machine's credentials for it, or "
            f"use a folder every node sees"
        ) from None
    return fs, path.rstrip("/") or "/"


def join(location: str | os.PathLike, *parts: str) -> str | Path:
    """``location/part/...``: a str for a URI (``s3://b/runs`` + ``x`` = ``s3://b/runs/x``), else a Path."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return Path(location).joinpath(*parts)


def split_location(location: str | os.PathLike) -> tuple[str, str]:
    """(output_dir, run_name) of a run folder, a path or a URI."""
    if is_uri(location):
        parent, _, name = str(location).rstrip("/").rpartition("/")
        return parent, name
    path = Path(location)
    return str(path.parent), path.name


class Remote:
    """A folder inside a pyarrow filesystem; every path given to a method is relative to it ('/'-separated)."""

    def __init__(self, fs: Any, root: str, shown: str) -> None:
        self.fs, self.root, self.shown = fs, root.rstrip("/") or "/", shown.rstrip("/")
        # Filesystems with an atomic rename get a temporary name first; object stores write whole objects.
        self.renames = fs.type_name in ("local", "hdfs")

    @classmethod
    def open(cls, uri: str) -> Remote:
        fs, root = open_filesystem(uri)
        return cls(fs, root, uri)

    def path(self, rel: str = "") -> str:
        return str(PurePosixPath(self.root, rel)) if rel else self.root

    def uri(self, rel: str = "") -> str:
        return f"{self.shown}/{rel}" if rel else self.shown

    def _kind(self, rel: str) -> Any:
        return self.fs.get_file_info(self.path(rel)).type

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs

        return self._kind(rel) == pyarrow.fs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        import pyarrow.fs

        return self._kind(rel) == pyarrow.fs.FileType.Directory

    def _open_output(self, rel: str, write: Callable[[Any], None]) -> None:
        path = self.path(rel)
        parent = str(PurePosixPath(path).parent)
        self.fs.create_dir(parent, recursive=True)
        if not self.renames:
            with self.fs.open_output_stream(path) as f:
                write(f)
            return
        tmp = str(PurePosixPath(parent, f".{PurePosixPath(path).name}.tmp{os.getpid()}-{uuid.uuid4().hex[:6]}"))
        try:
            with self.fs.open_output_stream(tmp) as f:
                write(f)
            self.fs.move(tmp, path)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._open_output(rel, lambda f: f.write(data))

    def upload(self, local: Path, rel: str) -> None:
        def copy(f: Any) -> None:
            with open(local, "rb") as src:
                while chunk := src.read(_CHUNK):
                    f.write(chunk)

        self._open_output(rel, copy)

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's content, or None if there is none."""
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError:
            if not self.is_file(rel):
                return None
            raise

    def download(self, rel: str, local: Path) -> bool:
        """Copy one file into ``local`` (written atomically); False if it does not exist."""
        try:
            src = self.fs.open_input_stream(self.path(rel))
        except (FileNotFoundError, OSError):
            if not self.is_file(rel):
                return False
            raise
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.tmp{os.getpid()}")
        try:
            with src, open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
            os.replace(tmp, local)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return True

    def delete_file(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except (FileNotFoundError, OSError):
            pass

    def delete_dir(self, rel: str) -> None:
        try:
            self.fs.delete_dir(self.path(rel))
        except (FileNotFoundError, OSError):
            pass

    def files(self, rel: str = "", recursive: bool = True) -> list[str]:
        """Every file under ``rel``, relative to this folder, sorted."""
        import pyarrow.fs

        return self._entries(rel, recursive, pyarrow.fs.FileType.File)

    def dirs(self, rel: str = "") -> list[str]:
        """The folders directly under ``rel``, relative to this folder, sorted."""
        import pyarrow.fs

        return self._entries(rel, False, pyarrow.fs.FileType.Directory)

    def _entries(self, rel: str, recursive: bool, kind: Any) -> list[str]:
        import pyarrow.fs

        sel = pyarrow.fs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True)
        root = PurePosixPath(self.root)
        infos = self.fs.get_file_info(sel)
        return sorted(str(PurePosixPath(i.path).relative_to(root)) for i in infos if i.type == kind)

    # -------------------------------------------------------------- checkpoints on the remote, from listings

    def checkpoint_names(self) -> list[str]:
        """Every ``checkpoint_*`` folder, newest folder epoch first."""
        names = [d for d in self.dirs() if d.startswith(CHECKPOINT_PREFIX)]
        return sorted(names, key=lambda n: (folder_epoch(Path(n)), n), reverse=True)

    def marker_epoch(self, name: str) -> int:
        data = self.read_bytes(f"{name}/epoch.txt")
        try:
            return int(data) if data is not None else -1
        except ValueError:
            return -1

    def looks_complete(self, name: str, num_peers: int, files: set[str] | None = None) -> bool:
        """Marker names the folder's epoch and every peer's files are there (listing only, no download)."""
        if self.marker_epoch(name) != folder_epoch(Path(name)):
            return False
        files = files if files is not None else set(self.files(name))
        return all(f"{name}/peer{k}.pt" in files and f"{name}/peer{k}.sha256" in files for k in range(num_peers))

    def newest_checkpoint_epoch(self, num_peers: int) -> int:
        """The epoch of the newest checkpoint whose marker and files are there (-1: none), without downloading."""
        files = set(self.files())
        for name in self.checkpoint_names():
            if self.looks_complete(name, num_peers, files):
                return folder_epoch(Path(name))
        return -1


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


class RunStore:
    """One run folder as the engine sees it: ``dir`` (where it writes) plus the copies to and from a URI.

    For a folder every method is a no-op (except :meth:`newest_complete_checkpoint` and :meth:`prune`, which
    run the folder's own rules); for a URI see the module docstring.
    """

    def __init__(self, location: str | os.PathLike, remote: Remote | None = None) -> None:
        self.location = str(location)
        self.remote = remote
        if remote is None:
            self.dir = Path(location)
            self._finalizer = None
        else:
            self.dir = make_staging(self.location)
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self._sent: dict[str, tuple[int, int]] = {}

    @classmethod
    def open(cls, location: str | os.PathLike | RunStore) -> RunStore:
        if isinstance(location, RunStore):
            return location
        if is_uri(location):
            return cls(str(location).rstrip("/"), Remote.open(str(location).rstrip("/")))
        return cls(Path(location))

    @property
    def is_uri(self) -> bool:
        return self.remote is not None

    def shown(self, rel: str = "") -> str:
        """A file's name as the user sees it (the URI's, not the staging folder's)."""
        if self.remote is None:
            return str(self.dir / rel) if rel else str(self.dir)
        return self.remote.uri(rel)

    def close(self) -> None:
        """Remove the staging folder (a URI store); nothing for a folder."""
        if self._finalizer is not None:
            self._finalizer()

    # ------------------------------------------------------------------------------ plain copies

    def upload(self, *rels: str) -> None:
        """Copy these files of ``dir`` to the URI, in this order (the caller puts a marker last)."""
        if self.remote is None:
            return
        for rel in rels:
            self.remote.upload(self.dir / rel, rel)

    def download(self, *rels: str) -> None:
        """Copy these files from the URI into ``dir`` where they exist there (a missing one is skipped)."""
        if self.remote is None:
            return
        for rel in rels:
            if not self.remote.download(rel, self.dir / rel):
                (self.dir / rel).unlink(missing_ok=True)

    def delete_uploaded(self, *rels: str) -> None:
        """Delete these files on the URI (the engine deletes its local copies itself)."""
        if self.remote is None:
            return
        for rel in rels:
            self.remote.delete_file(rel)

    def sync_logs(self) -> int:
        """Upload ``metrics.jsonl`` and the TensorBoard files that changed since the last call; returns how many."""
        if self.remote is None:
            return 0
        changed = []
        paths = [self.dir / "metrics.jsonl", *sorted((self.dir / "tb").rglob("*"))]
        for path in paths:
            if not path.is_file() or path.name.startswith("."):
                continue
            st = path.stat()
            rel = path.relative_to(self.dir).as_posix()
            if self._sent.get(rel) != (st.st_size, st.st_mtime_ns):
                self.remote.upload(path, rel)
                self._sent[rel] = (st.st_size, st.st_mtime_ns)
                changed.append(rel)
        return len(changed)

    # ------------------------------------------------------------------------------ checkpoints

    def newest_complete_checkpoint(self, num_peers: int, warn: Callable[[str], None] = print) -> Path | None:
        """The newest complete checkpoint, as a folder in ``dir`` (rank 0 decides; for a URI: downloaded whole
        and verified here, newer candidates that fail are reported through ``warn`` and skipped)."""
        if self.remote is None:
            return newest_complete_checkpoint(self.dir, num_peers, warn=warn)
        files = set(self.remote.files())
        for name in self.remote.checkpoint_names():
            shown = self.remote.uri(name)
            if self.remote.marker_epoch(name) < 0:
                warn(
                    f"warning: skipping checkpoint {shown}: incomplete (no epoch.txt: the run stopped while writing it)"
                )
                continue
            if not self.remote.looks_complete(name, num_peers, files):
                warn(f"warning: skipping checkpoint {shown}: incomplete (a peer's files or the marker are missing)")
                continue
            local = self.dir / name
            self._fetch(name, range(num_peers), marker=True)
            try:
                check_checkpoint(local, num_peers)
                return local
            except CheckpointError as e:
                warn(f"warning: skipping checkpoint {shown}: {str(e).replace(str(self.dir), self.remote.shown)}")
                shutil.rmtree(local, ignore_errors=True)
        return None

    def _fetch(self, name: str, peers: Iterable[int], marker: bool) -> None:
        assert self.remote is not None
        rels = [f"{name}/peer{k}{ext}" for k in peers for ext in (".pt", ".sha256")]
        rels += [f"{name}/metrics.json"] + ([f"{name}/epoch.txt"] if marker else [])
        for rel in rels:
            if not (self.dir / rel).is_file():
                self.remote.download(rel, self.dir / rel)

    def fetch_checkpoint(self, name: str, peers: Iterable[int]) -> Path:
        """The local folder of checkpoint ``name`` holding (at least) these peers' files (downloaded for a URI)."""
        if self.remote is not None:
            self._fetch(name, peers, marker=True)
        return self.dir / name

    def clear_stale(self, keep: Path | None, start_epoch: int) -> None:
        """On the URI: delete checkpoint folders past the resume point or without a marker (except ``keep``).
        The engine clears its local folder itself."""
        if self.remote is None:
            return
        for name in self.remote.checkpoint_names():
            if keep is not None and name == keep.name:
                continue
            if folder_epoch(Path(name)) > start_epoch or self.remote.marker_epoch(name) < 0:
                self.remote.delete_dir(name)

    def upload_checkpoint_files(self, folder: Path, peers: Iterable[int]) -> None:
        """A worker's part of a checkpoint: its peers' files go up; its older local checkpoint folders are
        dropped (they are on the URI), so staging holds one checkpoint at most."""
        if self.remote is None:
            return
        self.upload(*(f"{folder.name}/peer{k}{ext}" for k in peers for ext in (".pt", ".sha256")))
        for old in self.dir.glob(f"{CHECKPOINT_PREFIX}*"):
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)

    def upload_marker(self, folder: Path) -> None:
        """Rank 0, after every worker's files are up: ``metrics.json``, then the marker, last."""
        self.upload(f"{folder.name}/metrics.json", f"{folder.name}/epoch.txt")

    def prune(self, keep: int, num_peers: int, verified: set[Path]) -> list[str]:
        """Retention: the folder's :func:`prune_checkpoints`, or the same rule on the URI (from listings)."""
        if self.remote is None:
            return [str(p) for p in prune_checkpoints(self.dir, keep, num_peers, verified)]
        known = {p.name for p in verified}
        names = self.remote.checkpoint_names()
        ok = {n: n in known or self.remote.looks_complete(n, num_peers) for n in names}  # lists that folder only
        doomed = select_pruned([(n, folder_epoch(Path(n)), ok[n]) for n in names], keep)
        for name in doomed:
            self.remote.delete_dir(name)
        return [self.remote.uri(n) for n in doomed]


# ----------------------------------------------------------------------------- driver-side helpers


def read_run_file(location: str | os.PathLike, rel: str) -> bytes | None:
    """One file of a run folder (a path or a URI), or None."""
    if is_uri(location):
        return Remote.open(str(location).rstrip("/")).read_bytes(rel)
    try:
        return (Path(location) / rel).read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def write_run_file(location: str | os.PathLike, rel: str, data: bytes) -> None:
    """Write one file of a run folder (atomically in a folder; a whole object behind a URI)."""
    if is_uri(location):
        Remote.open(str(location).rstrip("/")).write_bytes(rel, data)
        return
    path = Path(location) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def worker_records(location: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's ``workers/rank<r>.json`` records (damaged ones skipped)."""
    out = []
    if is_uri(location):
        remote = Remote.open(str(location).rstrip("/"))
        blobs = [remote.read_bytes(rel) for rel in remote.files("workers", recursive=False)]
    else:
        blobs = []
        for path in sorted(Path(location, "workers").glob("rank*.json")):
            try:
                blobs.append(path.read_bytes())
            except OSError:
                continue
    for blob in blobs:
        try:
            out.append(json.loads(blob or b""))
        except ValueError:
            continue
    return out


def newest_checkpoint_epoch(location: str | os.PathLike, num_peers: int) -> int:
    """The newest complete checkpoint's epoch (-1: none); a URI's is judged from its listing and markers."""
    if is_uri(location):
        return Remote.open(str(location).rstrip("/")).newest_checkpoint_epoch(num_peers)
    newest = newest_complete_checkpoint(Path(location), num_peers, warn=lambda _: None)
    return checkpoint_epoch(newest) if newest is not None else -1


# ----------------------------------------------------------------------------- the run lock behind a URI


class UriRunLock:
    """Best-effort lock of a run folder behind a URI: ``.lock`` holds the owner and a heartbeat.

    An object store cannot create-if-absent atomically, so two runs that start within a second of each other
    could both win; otherwise a second run sees a lock whose heartbeat is fresh (refreshed every
    ``HEARTBEAT_S`` by a daemon thread) and is refused. A run that died leaves a lock that goes stale after
    ``STALE_S`` and is then taken over. Released (deleted) by :meth:`release`.
    """

    HEARTBEAT_S = 20.0
    STALE_S = 90.0
    SETTLE_S = 1.0

    def __init__(self, location: str, remote: Remote | None = None) -> None:
        self.location = location.rstrip("/")
        self.remote = remote or Remote.open(self.location)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.remote.read_bytes(".lock") or b"{}")
        except ValueError:
            return {}

    def _write(self, since: str) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "token": self.token}
        self.remote.write_bytes(".lock", json.dumps({**info, "heartbeat": time.time()}).encode())

    def _busy(self, holder: dict[str, Any]) -> None:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
        raise ConfigError(
            f"run folder {self.location} is in use by another cmd-dist run ({who}; its heartbeat is "
            f"{time.time() - float(holder.get('heartbeat', 0)):.0f} s old); wait for it to finish, or choose "
            f"another run_name (a lock whose run died expires {self.STALE_S:.0f} s after its last heartbeat)"
        )

    def acquire(self) -> UriRunLock:
        holder = self._holder()
        if (
            holder.get("token") not in (None, self.token)
            and time.time() - float(holder.get("heartbeat", 0)) < self.STALE_S
        ):
            self._busy(holder)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write(since)
        time.sleep(self.SETTLE_S)  # a rival that wrote in the meantime wins; we read its token back
        holder = self._holder()
        if holder.get("token") != self.token:
            self._busy(holder)
        self._thread = threading.Thread(target=self._beat, args=(since,), name="cmd-dist-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self, since: str) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                self._write(since)
            except OSError:
                pass  # a hiccup of the store: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            if self._holder().get("token") == self.token:
                self.remote.delete_file(".lock")


# ----------------------------------------------------------------------------- reading runs back (report)

#: The files ``cmd-dist report`` reads from a run or search folder.
REPORT_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "search.yaml", "results.csv")
_SKIPPED_DIRS = ("tb", "workers", "best_checkpoint", "report")


def mirror_for_report(uri: str, dest: Path) -> Path:
    """Copy what ``cmd-dist report`` reads (config, metrics, summaries, search results) of the runs under
    ``uri`` into ``dest/<last part of the URI>``, keeping the layout; never a checkpoint or event file."""
    remote = Remote.open(uri.rstrip("/"))
    local = Path(dest) / (split_location(uri)[1] or "run")
    for rel in remote.files():
        parts = PurePosixPath(rel).parts
        if parts[-1] not in REPORT_FILES:
            continue
        if any(p.startswith(CHECKPOINT_PREFIX) or p in _SKIPPED_DIRS or p.startswith(".") for p in parts[:-1]):
            continue
        remote.download(rel, local / rel)
    return local


def upload_folder(local: Path, uri: str) -> int:
    """Copy every file under ``local`` to ``uri`` (keeping the layout); returns how many."""
    remote = Remote.open(uri.rstrip("/"))
    count = 0
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            remote.upload(path, path.relative_to(local).as_posix())
            count += 1
    return count
