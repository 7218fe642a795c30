"""A local Ray kept to this machine and this user: its token file (readable by this user only), its servers on
loopback, and the reaper that takes every process of it down when the driver dies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cmd_dist.launch import environment  # noqa: F401 - Ray's environment defaults, before Ray is imported

# isort: split
import ray


def ensure_local_token() -> None:
    """A local Ray with token authentication needs a token: Ray's own default file, ``~/.ray/auth_token``.

    Ray 2.60 creates that file itself when it is missing, but readable by every user of the machine (mode 0644
    under the umask); created here first, it is readable by this user only. A token given in RAY_AUTH_TOKEN or
    RAY_AUTH_TOKEN_PATH is used as it is; nothing happens with RAY_AUTH_MODE=disabled.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # the user's token (Ray reuses it for every local cluster)
    except OSError:
        return  # an unwritable home: Ray says so itself, in one line
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    with os.fdopen(fd, "w") as f:
        f.write(generate_new_authentication_token())


class loopback_node:
    """While a local Ray starts: its node is 127.0.0.1, so every Ray server binds to loopback.

    Ray 2.60 turns ``_node_ip_address="127.0.0.1"`` into the machine's routable address (its processes then
    listen on all interfaces and ``workers/rank*.json`` records that address) unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's switch for single-machine clusters: set for the processes Ray
    starts (they inherit it) and in this process's copy of the constant, then restored.
    """

    def __init__(self, active: bool) -> None:
        self.active = active

    def __enter__(self) -> None:
        if not self.active:
            return
        from ray._private import ray_constants

        self._saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), ray_constants.ENABLE_RAY_CLUSTER
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False

    def __exit__(self, *exc: object) -> None:
        if not self.active:
            return
        from ray._private import ray_constants

        env, ray_constants.ENABLE_RAY_CLUSTER = self._saved
        if env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = env


# The reaper: a small process that outlives this one and, the moment this process dies however it dies (SIGKILL
# included), SIGKILLs every process of the local Ray it started. Ray 2.60 alone lets the training workers run on
# for seconds after the driver is killed (they kept writing checkpoints into the run folder) and leaves its
# dashboard and runtime-env agents running for good. It learns of the death from a pipe whose write end only this
# process holds (EOF), and knows the Ray processes from polling /proc: this process's children started from
# Ray's package (GCS, raylet, monitors) and all their descendants (agents, workers), each with its start time,
# so a pid used again later is never killed.
_REAPER_SOURCE = r"""
import os, select, signal, sys

fd, driver, ray_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
seen = {}


def table():
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/" + name + "/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            out[int(name)] = (int(rest[1]), rest[19])  # parent pid, start time
    return out


def from_ray(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            args = f.read().split(b"\0")[:2]
    except OSError:
        return False
    return any(a.decode(errors="replace").startswith(ray_dir) for a in args)


def scan():
    procs = table()
    children = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    alive = [p for p, start in seen.items() if procs.get(p, (0, None))[1] == start]
    stack = alive + [p for p in children.get(driver, []) if p not in seen and from_ray(p)]
    found = {}
    while stack:
        pid = stack.pop()
        if pid in procs and pid not in found and pid != os.getpid():
            found[pid] = procs[pid][1]
            stack.extend(children.get(pid, []))
    seen.clear()
    seen.update(found)


while True:
    ready, _, _ = select.select([fd], [], [], 0.5)
    if ready and not os.read(fd, 1):
        break  # EOF: the driver is gone
    scan()
for _ in range(3):  # a process may start another while the first round kills
    scan()
    for pid in seen:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""
_REAPER: subprocess.Popen | None = None


def start_reaper() -> None:
    """Start the reaper (above) once per process, before the local Ray starts (Linux only: it reads /proc)."""
    global _REAPER
    if _REAPER is not None or not os.path.isdir("/proc/self"):
        return
    read_end, write_end = os.pipe()  # neither inheritable: Ray's processes never hold the write end
    _REAPER = subprocess.Popen(
        [sys.executable, "-c", _REAPER_SOURCE, str(read_end), str(os.getpid()), os.path.dirname(ray.__file__)],
        pass_fds=(read_end,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C or kill of this process group leaves it to do its work
    )
    os.close(read_end)
    _REAPER.pipe = write_end  # open until this process ends: its death is the reaper's signal


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
