"""One filesystem interface for a run's files: a folder on this machine, or a folder behind a URI.

``output_dir`` may be a folder (local, or shared by every node: NFS, EFS) or a URI that pyarrow opens
(``s3://bucket/runs``, ``gs://bucket/runs``, ``hdfs://namenode:8020/runs``, ``abfs://...``,
``file:///shared/runs``). :func:`open_folder` gives either as a :class:`Folder`: a :class:`LocalFolder`
(plain files, written atomically: temporary name, fsync, rename) or a :class:`Remote` (pyarrow; object stores
write an object whole or not at all, a ``file://``/``hdfs://`` file is written under a temporary name and
renamed). Every path given to a folder's methods is relative to it and '/'-separated, and the code above this
module never asks which kind it holds (``Folder.local`` says where the files can be read on this machine, for
the one decision that depends on it: whether reading every checkpoint file is cheap).

Imports nothing of cmd-dist but the error types; pyarrow only for a URI.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

from cmd_dist.errors import ConfigError, first_line

#: URI schemes pyarrow opens as a filesystem (pyarrow.fs.FileSystem.from_uri), shown in the error message.
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
URI_EXAMPLES = "s3://bucket/runs, gs://bucket/runs, hdfs://namenode:8020/runs or file:///shared/runs"
_CHUNK = 8 << 20


# ----------------------------------------------------------------------------- locations: a path or a URI


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
        raise ConfigError(
            f"{key}: cannot open {uri!r} ({first_line(e)}); check the URI and this machine's credentials for it, "
            f"or use a folder every node sees"
        ) from None
    return fs, path.rstrip("/") or "/"


def arrow_storage(location: str | os.PathLike) -> tuple[Any | None, str]:
    """What Ray Train and Tune take as ``(storage_filesystem, storage_path)``: a URI's pyarrow filesystem and the
    path inside it (ConfigError when it cannot be opened), or ``(None, the folder)``."""
    if is_uri(location):
        return open_filesystem(str(location).rstrip("/"))
    return None, str(location)


def absolute(location: str | os.PathLike) -> Path | str:
    """A folder as an absolute Path (``~`` expanded: Ray workers run elsewhere), a URI as a str without its
    trailing '/'."""
    if is_uri(location):
        return str(location).rstrip("/")
    return Path(location).expanduser().resolve()


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


# ----------------------------------------------------------------------------- the interface


class Folder(Protocol):
    """A folder of files; ``rel`` is '/'-separated and relative to it."""

    #: The folder as the user names it (a path, or the URI).
    shown: str
    #: Where its files are on this machine's filesystem; None behind a URI (reading a file means a download).
    local: Path | None

    def uri(self, rel: str = "") -> str:
        """A file's name as the user sees it (``shown/rel``)."""

    def is_file(self, rel: str) -> bool: ...

    def is_dir(self, rel: str = "") -> bool: ...

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's content, or None if there is none."""

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file whole (never half-written under its name); its folders are created."""

    def upload(self, local: Path, rel: str) -> None:
        """Copy the file ``local`` of this machine to ``rel`` (written whole, like :meth:`write_bytes`)."""

    def download(self, rel: str, local: Path) -> bool:
        """Copy ``rel`` to the file ``local`` of this machine (written atomically); False if it does not exist."""

    def delete_file(self, rel: str) -> None:
        """Delete a file; nothing if it is not there (or cannot be deleted)."""

    def delete_dir(self, rel: str) -> None:
        """Delete a folder and everything in it; nothing if it is not there (or cannot be deleted)."""

    def files(self, rel: str = "", recursive: bool = True) -> list[str]:
        """Every file under ``rel`` (relative to this folder, sorted); empty when ``rel`` does not exist."""

    def dirs(self, rel: str = "") -> list[str]:
        """The folders directly under ``rel`` (relative to this folder, sorted)."""


def open_folder(location: str | os.PathLike, key: str = "output_dir") -> Folder:
    """The folder at ``location``: a :class:`Remote` for a URI (ConfigError naming ``key`` when it cannot be
    opened), else a :class:`LocalFolder`."""
    if is_uri(location):
        return Remote.open(str(location).rstrip("/"), key)
    return LocalFolder(Path(location))


def _write_atomically(path: Path, write: Callable[[IO[bytes]], None], sync: bool) -> None:
    """``write`` into a temporary name beside ``path``, then rename; on any failure the temporary file goes."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename; on any failure (full disk, ...) the temporary file is removed."""
    _write_atomically(Path(path), lambda f: f.write(data), sync=True)


def _copy_stream(src: IO[bytes], dst: IO[bytes]) -> None:
    while chunk := src.read(_CHUNK):
        dst.write(chunk)


# ----------------------------------------------------------------------------- a folder on this machine


class LocalFolder:
    """A folder of this machine's filesystem (or one every node mounts); writes are atomic and fsynced."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.local = Path(path)
        self.shown = str(self.local)

    def path(self, rel: str = "") -> Path:
        return self.local / rel if rel else self.local

    def uri(self, rel: str = "") -> str:
        return str(self.path(rel))

    def is_file(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def is_dir(self, rel: str = "") -> bool:
        return self.path(rel).is_dir()

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self.path(rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)

    def upload(self, local: Path, rel: str) -> None:
        path = self.path(rel)
        if Path(local) == path:
            return  # already there
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "rb") as src:
            _write_atomically(path, lambda f: _copy_stream(src, f), sync=True)

    def download(self, rel: str, local: Path) -> bool:
        path = self.path(rel)
        if Path(local) == path:
            return path.is_file()  # already here
        try:
            src = open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        with src:
            _write_atomically(Path(local), lambda f: _copy_stream(src, f), sync=False)
        return True

    def delete_file(self, rel: str) -> None:
        try:
            self.path(rel).unlink(missing_ok=True)
        except OSError:
            pass

    def delete_dir(self, rel: str) -> None:
        shutil.rmtree(self.path(rel), ignore_errors=True)

    def files(self, rel: str = "", recursive: bool = True) -> list[str]:
        return self._entries(rel, recursive, Path.is_file)

    def dirs(self, rel: str = "") -> list[str]:
        return self._entries(rel, False, Path.is_dir)

    def _entries(self, rel: str, recursive: bool, keep: Callable[[Path], bool]) -> list[str]:
        top = self.path(rel)
        if not top.is_dir():
            return []
        found = top.rglob("*") if recursive else top.iterdir()
        return sorted(p.relative_to(self.local).as_posix() for p in found if keep(p))


# ----------------------------------------------------------------------------- a folder behind a URI


class Remote:
    """A folder inside a pyarrow filesystem (behind a URI)."""

    local = None

    def __init__(self, fs: Any, root: str, shown: str) -> None:
        self.fs, self.root, self.shown = fs, root.rstrip("/") or "/", shown.rstrip("/")
        # Filesystems with an atomic rename get a temporary name first; object stores write whole objects.
        self.renames = fs.type_name in ("local", "hdfs")

    @classmethod
    def open(cls, uri: str, key: str = "output_dir") -> Remote:
        fs, root = open_filesystem(uri, key)
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
                _copy_stream(src, f)

        self._open_output(rel, copy)

    def read_bytes(self, rel: str) -> bytes | None:
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
        try:
            src = self.fs.open_input_stream(self.path(rel))
        except (FileNotFoundError, OSError):
            if not self.is_file(rel):
                return False
            raise
        local.parent.mkdir(parents=True, exist_ok=True)
        with src:
            _write_atomically(Path(local), lambda f: _copy_stream(src, f), sync=False)
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
        import pyarrow.fs

        return self._entries(rel, recursive, pyarrow.fs.FileType.File)

    def dirs(self, rel: str = "") -> list[str]:
        import pyarrow.fs

        return self._entries(rel, False, pyarrow.fs.FileType.Directory)

    def _entries(self, rel: str, recursive: bool, kind: Any) -> list[str]:
        import pyarrow.fs

        sel = pyarrow.fs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True)
        root = PurePosixPath(self.root)
        infos = self.fs.get_file_info(sel)
        return sorted(str(PurePosixPath(i.path).relative_to(root)) for i in infos if i.type == kind)
