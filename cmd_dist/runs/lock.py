"""The lock of a run (or search) folder: one run at a time writes there.

A folder: :class:`RunLock`, an exclusive ``flock`` the kernel drops when the process dies. A URI:
:class:`UriRunLock`, best effort (an object store has no atomic create-if-absent): a heartbeat object refreshed
while the run lives (see docs/cluster.md). :func:`lock_run` takes either; :func:`hold_run_lock` holds a run
folder's lock until this process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cmd_dist.errors import ConfigError, RunFolderBusy, first_line
from cmd_dist.runs.fs import Remote, is_uri


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


class UriRunLock:
    """Best-effort lock of a run folder behind a URI: ``.lock`` holds the owner and a heartbeat.

    An object store cannot create-if-absent atomically, so two runs that start within a second of each other
    could both win; otherwise a second run sees a lock whose heartbeat is fresh (refreshed every
    ``HEARTBEAT_S`` by a daemon thread) and is refused (ConfigError). A run that died leaves a lock that goes
    stale after ``STALE_S`` and is then taken over. Released (deleted) by :meth:`release`.
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


def lock_run(location: str | os.PathLike) -> RunLock | UriRunLock:
    """The acquired lock of a run or search folder: a folder's ``flock`` (RunFolderBusy when another process
    holds it) or a URI's heartbeat lock (ConfigError when a live run holds it); OSError when it cannot be
    written. Release it with ``release()``."""
    if is_uri(location):
        return UriRunLock(str(location)).acquire()
    return RunLock(Path(location)).acquire()


#: Run folders this process holds the lock of (a process may train the same folder again, e.g. tests).
_HELD: dict[Path | str, RunLock | UriRunLock] = {}


def hold_run_lock(location: str | os.PathLike) -> None:
    """Hold a run folder's lock until this process exits (once per folder); ConfigError (exit 2) if another
    run holds it, or if a URI's lock cannot be written (a folder's OSError is the caller's to word).

    A folder's lock is kept only once no worker of an earlier run of it is alive (:func:`wait_for_old_workers`:
    the driver's own lock dies with a killed driver, its workers may not yet)."""
    key: Path | str = str(location).rstrip("/") if is_uri(location) else Path(location)
    if key in _HELD:
        return
    try:
        _HELD[key] = lock_run(key)
    except RunFolderBusy as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        if not is_uri(key):
            raise
        raise ConfigError(f"output_dir: cannot write the run folder {key} ({first_line(e)})") from None
    if is_uri(key):
        atexit.register(_HELD[key].release)  # the kernel drops a flock; a URI's lock object must be deleted
        return
    try:
        wait_for_old_workers(Path(key))
    except ConfigError:
        _HELD.pop(key).release()
        raise


#: Seconds a run waits for the workers of a run of the same folder whose driver died (the reaper kills local
#: ones at once; on a cluster Ray stops a dead driver's workers within seconds).
OLD_WORKERS_WAIT_S = 60.0
WORKERS_LOCK = ".workers.lock"


def wait_for_old_workers(run_dir: Path, timeout: float | None = None) -> None:
    """Wait until no worker of an earlier run of ``run_dir`` is alive; ConfigError (exit 2) after ``timeout``.

    Every worker holds a shared ``flock`` on ``run_dir/.workers.lock`` while it trains (:func:`hold_workers_lock`)
    and the kernel drops it when the worker dies, however it dies; the driver's own lock (``.lock``) dies with the
    driver, so without this a ``--resume`` right after a killed driver could race with workers still writing.
    """
    import fcntl

    timeout = OLD_WORKERS_WAIT_S if timeout is None else timeout
    try:
        fd = os.open(Path(run_dir) / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return  # open_run_folder reports an unwritable folder in its own words
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return  # released at once by the finally below: this run's workers take it shared
            except BlockingIOError:
                if time.monotonic() >= end:
                    raise ConfigError(
                        f"run folder {run_dir}: workers of an earlier run of it still hold {WORKERS_LOCK} after "
                        f"{timeout:.0f} s; stop them (`fuser -v {Path(run_dir) / WORKERS_LOCK}` lists them), then "
                        f"try again"
                    ) from None
                time.sleep(0.2)
            except OSError:
                return  # a file system without flock: nothing to wait on
    finally:
        os.close(fd)


def hold_workers_lock(run_dir: Path | str) -> int | None:
    """In a worker: a shared ``flock`` on ``run_dir/.workers.lock`` until the returned descriptor is closed."""
    import fcntl

    if is_uri(run_dir) or not Path(run_dir).is_dir():
        return None  # a URI: each worker writes through its own staging folder, no shared lock exists
    try:
        fd = os.open(Path(run_dir) / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a new driver checks for old workers
    except OSError:
        os.close(fd)
        return None
    return fd
