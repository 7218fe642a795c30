"""Where a run's files live: a local (or shared, e.g. NFS) folder, or a filesystem URI that pyarrow reads.

``output_dir`` may be ``/shared/runs`` or ``s3://bucket/runs``, ``gs://bucket/runs``, ``hdfs://...``,
``file:///shared/runs``: every node of a cluster must see it. A :class:`RunStore` is one run folder in
either kind; the launcher, the workers and the CLI write through it. A local folder is written in place
(atomic renames, as before); a URI is written with pyarrow (objects appear whole or not at all), and what
TensorBoard and the metrics log write is staged in a local folder and copied up after every epoch.
Ray Train writes the checkpoints itself, to the same place (``RunConfig(storage_path, storage_filesystem)``).
Ray-free: the tests use it with pyarrow's in-memory mock filesystem as well as on a real cluster.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from cmd_dist.checkpoint import atomic_write_bytes
from cmd_dist.config import ConfigError


def is_uri(location: str | os.PathLike) -> bool:
    """``scheme://...`` (s3, gs, hdfs, file, ...); anything else is a local path."""
    return "://" in str(location)


def filesystem_for(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a URI; an unknown scheme or bad URI is a ConfigError."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError, pyarrow.ArrowException) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"output_dir: {uri!r} is not a filesystem URI pyarrow can open ({first}); use a shared folder "
            f"(/shared/runs) or e.g. s3://bucket/runs, gs://bucket/runs, file:///shared/runs"
        ) from None
    return fs, path.rstrip("/")


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` for a local path or a URI (``s3://b/runs`` + ``x`` = ``s3://b/runs/x``)."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location).joinpath(*parts))


class RunStore:
    """One run folder, local or behind a URI. Paths given to the methods are relative to the run folder."""

    def __init__(self, location: str | os.PathLike, filesystem: Any = None) -> None:
        self.location = str(location)
        if filesystem is not None:  # an explicit pyarrow filesystem (tests: the mock one) and a path in it
            self.local: Path | None = None
            self.fs, self.root = filesystem, self.location.rstrip("/")
        elif is_uri(self.location):
            self.local = None
            self.fs, self.root = filesystem_for(self.location)
        else:
            self.local = Path(self.location)
            self.fs, self.root = None, str(self.local)

    @property
    def is_local(self) -> bool:
        return self.local is not None

    def _path(self, rel: str) -> str:
        return str(PurePosixPath(self.root, rel)) if rel else self.root

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local is not None:
            path = self.local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            return
        path = self._path(rel)
        self.fs.create_dir(str(PurePosixPath(path).parent), recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's content, or None if it does not exist."""
        if self.local is not None:
            try:
                return (self.local / rel).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None
        import pyarrow.fs

        path = self._path(rel)
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def delete(self, rel: str) -> None:
        if self.local is not None:
            (self.local / rel).unlink(missing_ok=True)
            return
        try:
            self.fs.delete_file(self._path(rel))
        except (FileNotFoundError, OSError):
            pass

    def mkdir(self, rel: str = "") -> None:
        if self.local is not None:
            (self.local / rel).mkdir(parents=True, exist_ok=True)
        else:
            self.fs.create_dir(self._path(rel), recursive=True)

    def files(self, rel: str = "") -> list[str]:
        """Every file under ``rel`` (recursive), relative to the run folder, sorted."""
        if self.local is not None:
            base = self.local / rel
            return sorted(str(p.relative_to(self.local)) for p in base.rglob("*") if p.is_file())
        import pyarrow.fs

        sel = pyarrow.fs.FileSelector(self._path(rel), recursive=True, allow_not_found=True)
        return sorted(
            str(PurePosixPath(i.path).relative_to(self.root))
            for i in self.fs.get_file_info(sel)
            if i.type == pyarrow.fs.FileType.File
        )

    def upload(self, local_dir: Path, rel: str = "") -> int:
        """Copy every file under ``local_dir`` to ``rel`` (overwriting); returns how many were copied."""
        count = 0
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                target = str(PurePosixPath(rel, path.relative_to(local_dir).as_posix())) if rel else None
                self.write_bytes(target or path.relative_to(local_dir).as_posix(), path.read_bytes())
                count += 1
        return count

    def download(self, rel: str, dest: Path) -> bool:
        """Copy one file to ``dest``; False if it does not exist."""
        data = self.read_bytes(rel)
        if data is None:
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return True


def ray_storage(output_dir: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train's RunConfig: the filesystem is None for a local path."""
    if not is_uri(output_dir):
        return output_dir, None
    fs, path = filesystem_for(output_dir)
    return path, fs
