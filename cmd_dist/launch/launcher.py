"""The one place that imports Ray for training: a Ray Train (V2) job whose workers host the peers.

By default each peer is its own Ray Train worker (its own GPU when the cluster has GPUs); with
``ray.placement=together`` one worker hosts every peer. With no address a fresh local Ray is
started (never whatever cluster Ray's ``ray_current_cluster`` file names); ``ray.address`` /
``RAY_ADDRESS`` joins a cluster, after checking within seconds that it answers.

Failures (docs/reliability.md): Ray itself never retries (``FailureConfig(max_failures=0)``); the
driver looks at what failed. A lost worker (its process died, or its node) restarts the peer group
from the newest complete checkpoint, at most ``ray.max_failures`` times, with one notice line; an
exception raised by the training code fails the run at once (:class:`RunFailed`), with the
worker's traceback, and the run folder as it was.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmd_dist.config import Config, ConfigError, dump_yaml, from_dict
from cmd_dist.errors import RunFolderBusy
from cmd_dist.runs.fs import Remote, atomic_write_bytes, is_uri, join, open_filesystem, split_location
from cmd_dist.runs.lock import RunLock, UriRunLock
from cmd_dist.runs.run_folder import newest_checkpoint_epoch, read_run_file, worker_records, write_run_file
from cmd_dist.runs.storage import RunStore

# Ray's token authentication (every gRPC and HTTP request to the cluster carries its token): on for the local
# Ray, which Ray would enable by default anyway, and for joining a cluster (the token from RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). RAY_AUTH_MODE=disabled in the environment is the only way to join a
# cluster that runs without it. Quiet defaults: no doubled prints, no usage-stats reporting.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller takes one report per health check (default every 2 s): short epochs would
# wait for it. 0.25 s halves `make demo` and changes nothing for CIFAR-sized epochs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train import (  # noqa: E402
    CheckpointConfig,
    ControllerError,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    WorkerGroupError,
)
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402


def git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


#: Run folders this process holds the lock of (a process may train the same folder again, e.g. tests).
_LOCKS: dict[Path | str, RunLock | UriRunLock] = {}


def lock_run_dir(run_dir: Path | str) -> None:
    """Hold ``run_dir``'s lock until this process exits; ConfigError (exit 2) if another run holds it.

    A folder: an exclusive ``flock``. A URI: the best-effort :class:`~cmd_dist.runs.storage.UriRunLock`
    (heartbeat object; an object store has no atomic create-if-absent), released at exit.
    """
    key = str(run_dir).rstrip("/") if is_uri(run_dir) else Path(run_dir)
    if key in _LOCKS:
        return
    if is_uri(run_dir):
        try:
            _LOCKS[key] = UriRunLock(key).acquire()
        except OSError as e:
            raise ConfigError(f"output_dir: cannot write the run folder {key} ({_first_line(e)})") from None
        import atexit

        atexit.register(_LOCKS[key].release)
        return
    try:
        _LOCKS[key] = RunLock(key).acquire()
    except RunFolderBusy as e:
        raise ConfigError(str(e)) from None
    try:
        wait_for_old_workers(key)
    except ConfigError:
        _LOCKS.pop(key).release()
        raise


#: Seconds a run waits for the workers of a run of the same folder whose driver died (the reaper kills local
#: ones at once; on a cluster Ray stops a dead driver's workers within seconds).
OLD_WORKERS_WAIT_S = 60.0
WORKERS_LOCK = ".workers.lock"


def wait_for_old_workers(run_dir: Path, timeout: float = OLD_WORKERS_WAIT_S) -> None:
    """Wait until no worker of an earlier run of ``run_dir`` is alive; ConfigError (exit 2) after ``timeout``.

    Every worker holds a shared ``flock`` on ``run_dir/.workers.lock`` while it trains (:func:`hold_workers_lock`)
    and the kernel drops it when the worker dies, however it dies; the driver's own lock (``.lock``) dies with the
    driver, so without this a ``--resume`` right after a killed driver could race with workers still writing.
    """
    import fcntl

    try:
        fd = os.open(Path(run_dir) / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return  # resolve_run_dir reports an unwritable folder in its own words
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve_run_dir(cfg: Config, lock: bool = True) -> Path | str:
    """Absolute paths (Ray workers run elsewhere) and a run name; locks the folder, writes config.yaml and git_rev.

    Returns the run folder: a Path, or a str when ``output_dir`` is a filesystem URI (``s3://``, ``file://``, ...).
    ``lock=False`` leaves a URI's best-effort lock out: a tune trial's folder, covered by its search's lock (a
    trial killed with its search would otherwise leave a lock that refuses ``--resume`` for a while).
    """
    if is_uri(cfg.output_dir):
        cfg.output_dir = cfg.output_dir.rstrip("/")
    else:
        cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    if cfg.data.dataset != "digits":
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.noise.label_file:
        cfg.noise.label_file = str(Path(cfg.noise.label_file).expanduser().resolve())
    for peer in cfg.peers:  # workers may run elsewhere: every file path absolute
        if peer.weights:
            peer.weights = str(Path(peer.weights).expanduser().resolve())
    if not cfg.run_name:
        cfg.run_name = time.strftime("cmd-%Y%m%d-%H%M%S")
    if is_uri(cfg.output_dir):
        return _resolve_uri_run_dir(cfg, lock)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir)
        existing = run_dir / "config.yaml"
        if existing.is_file() and existing.read_text() != dump_yaml(cfg):
            raise ConfigError(
                f"run_name: {cfg.run_name!r} already exists in {cfg.output_dir} with a different config; "
                f"use 'cmd-dist train --resume {run_dir}' to continue it, or choose a new run_name"
            )
        atomic_write_bytes(run_dir / "config.yaml", dump_yaml(cfg).encode())
        atomic_write_bytes(run_dir / "git_rev.txt", (git_revision() + "\n").encode())
    except OSError as e:
        raise ConfigError(
            f"output_dir: cannot write the run folder {run_dir} ({e.strerror or e}); choose a writable "
            f"output_dir with free space"
        ) from None
    return run_dir


def _resolve_uri_run_dir(cfg: Config, lock: bool = True) -> str:
    """:func:`resolve_run_dir` for a URI: the same checks and files, through pyarrow."""
    run_dir = str(join(cfg.output_dir, cfg.run_name))
    open_filesystem(run_dir)  # an unknown scheme, missing credentials: one line now
    try:
        if lock:
            lock_run_dir(run_dir)
        existing = read_run_file(run_dir, "config.yaml")
        if existing is not None and existing.decode() != dump_yaml(cfg):
            raise ConfigError(
                f"run_name: {cfg.run_name!r} already exists in {cfg.output_dir} with a different config; "
                f"use 'cmd-dist train --resume {run_dir}' to continue it, or choose a new run_name"
            )
        write_run_file(run_dir, "config.yaml", dump_yaml(cfg).encode())
        write_run_file(run_dir, "git_rev.txt", (git_revision() + "\n").encode())
    except OSError as e:
        raise ConfigError(
            f"output_dir: cannot write the run folder {run_dir} ({_first_line(e)}); check the URI and this "
            f"machine's credentials for it"
        ) from None
    return run_dir


#: Seconds to wait for a given Ray address to answer before giving up with one line.
CONNECT_TIMEOUT_S = 5.0


def ray_address(cfg: Config) -> str | None:
    """The cluster to join (``ray.address``, else RAY_ADDRESS), or None for a fresh local Ray."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A ``HOST:PORT`` address must accept a TCP connection within ``timeout``; ConfigError otherwise.

    Without this, ray.init on a dead address retries "Failed to connect to GCS" for minutes and
    ignores Ctrl-C. Other forms (``auto``, ``ray://``) are left to Ray.
    """
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (getattr(e, "strerror", None) or str(e))
        raise ConfigError(
            f"ray.address: no Ray cluster answers at {address} ({reason} after {timeout:g} s); start it "
            f"('ray start --head'), fix the address, or leave it out for a local Ray"
        ) from None


@dataclass
class Console:
    """What the driver's console shows. Quiet by default: the epoch lines, one live progress bar when
    stdout is a terminal, and errors; ``verbose`` (``--verbose``) brings Ray's own INFO logs back."""

    verbose: bool = False
    #: A live progress bar; only on a terminal (piped into a file, tqdm's carriage returns are garbage).
    progress: bool = False


CONSOLE = Console()


def set_console(verbose: bool = False, progress: bool | None = None) -> Console:
    """Called by the CLI before Ray starts; ``progress`` defaults to "stdout and stderr are a terminal"."""
    CONSOLE.verbose = verbose
    CONSOLE.progress = terminal_can_draw_a_bar() if progress is None else progress
    if CONSOLE.progress:
        _closed_bars_leave_no_line()
    return CONSOLE


def terminal_can_draw_a_bar() -> bool:
    """stdout (the epoch lines) and stderr (where the driver draws the bar) are a terminal with a width.

    A pseudo-terminal nobody gave a size (``script -qec`` run outside a terminal, CI runners, ``pty``) reports
    0 columns, and tqdm draws a 0-column bar as nothing at all: it is given ``COLUMNS`` x ``LINES`` (default
    80 x 24) here, as ``stty cols 80 rows 24`` would.
    """
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        return False
    try:
        fd = sys.stderr.fileno()
        if os.get_terminal_size(fd).columns == 0:
            import fcntl
            import struct
            import termios

            cols, rows = int(os.environ.get("COLUMNS") or 80), int(os.environ.get("LINES") or 24)
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        return os.get_terminal_size(fd).columns > 0
    except (OSError, ValueError, ImportError):
        return False


def _closed_bars_leave_no_line() -> None:
    """Ray's driver draws the workers' ``tqdm_ray`` bars with tqdm's default ``leave=True``, so the run's bar,
    closed after the last epoch's steps, stayed behind as a line between the last two epoch lines (a blank
    line on a terminal without width). Closed bars are cleared instead; ``_RunBar`` closes its bar only then."""
    try:
        from ray.experimental import tqdm_ray
    except ImportError:
        return
    bar = getattr(tqdm_ray, "_Bar", None)
    if bar is None or getattr(bar.close, "leaves_no_line", False):
        return

    def close(self: Any) -> None:
        self.bar.leave = False
        self.bar.close()

    close.leaves_no_line = True  # type: ignore[attr-defined]
    bar.close = close


def ray_log_level() -> str:
    """Core Ray's Python loggers in every process: INFO with --verbose, else ERROR (the placement-group
    cleaner warns on every poll of a state API that only exists with the dashboard). Ray Train's own
    level is set per run in :func:`build_trainer` (WARNING: its failure and restart warnings stay)."""
    return "INFO" if CONSOLE.verbose else "ERROR"


def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` / RAY_ADDRESS, or start a fresh local Ray bound to 127.0.0.1, no dashboard."""
    if ray.is_initialized():
        return
    address = ray_address(cfg)
    env_vars = {key: os.environ[key] for key in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",)}
    if not CONSOLE.verbose:
        # Ray Train's preemption watcher only logs spot-node preemptions (failures are handled either way)
        # and makes Ray's core print a C++ error line about its constructor arguments on every run.
        env_vars["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    kwargs: dict[str, Any] = dict(
        log_to_driver=True,
        logging_config=ray.LoggingConfig(log_level=ray_log_level()),
    )
    # Ray Train's placement-group cleaner (an actor) finds its cluster through RAY_ADDRESS; without it, on
    # a machine with several Ray instances, it cannot tell which is its own and dies with a traceback.
    chosen_port = None
    local = address is None
    if local:
        # "local": always a new cluster. address=None would join whatever Ray's ray_current_cluster
        # file names (a `ray start` left running, another program's Ray, or one long dead: a hang).
        address = "local"
        kwargs.update(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", include_dashboard=False)
        if not os.environ.get("RAY_GCS_SERVER_PORT"):
            chosen_port = _free_port()
            os.environ["RAY_GCS_SERVER_PORT"] = str(chosen_port)  # read by ray.init's local start
        env_vars["RAY_ADDRESS"] = f"127.0.0.1:{os.environ['RAY_GCS_SERVER_PORT']}"
        ensure_local_token()
        start_reaper()
    else:
        check_reachable(address)
    if address != "local" and not address.startswith("ray://"):
        env_vars.setdefault("RAY_ADDRESS", address)
        if address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
            kwargs["_node_ip_address"] = "127.0.0.1"  # a loopback cluster: this node is 127.0.0.1 too
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        # Inside a Ray Job (cmd-dist submit) the job's runtime env already carries these (cmd_dist/launch/submit.py),
        # and a runtime_env given here would replace the job's, whose working_dir package the workers then
        # could not download.
        kwargs["runtime_env"] = {"env_vars": env_vars}
    try:
        with _loopback_node(local):
            ray.init(address=address, **kwargs)
    except ray.exceptions.AuthenticationError as e:
        raise ConfigError(f"ray.address: {address}: {_first_line(e)}; {_TOKEN_HINT}") from None
    except ConnectionError as e:
        if local:
            raise
        # A cluster that refuses this client's token answers "Unauthenticated" until ray.init gives up (~20 s).
        raise ConfigError(
            f"ray.address: {address}: {_first_line(e)} (a missing or wrong token looks like this too: "
            f"'Unauthenticated' above); {_TOKEN_HINT}"
        ) from None
    finally:
        if chosen_port is not None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
    if not CONSOLE.verbose:
        _collapse_forwarded_tracebacks()


_TOKEN_HINT = (
    "give this machine the cluster's token (`ray get-auth-token` on the head prints it): RAY_AUTH_TOKEN=<token> or "
    "RAY_AUTH_TOKEN_PATH=<file>, or put it in ~/.ray/auth_token; RAY_AUTH_MODE=disabled only for a cluster that "
    "runs without authentication"
)


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


class _loopback_node:
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


class _CollapseTracebacks:
    """Wraps Ray's printer of the lines its workers and actors write to stderr/stdout (``log_to_driver``).

    Ray's internal actors log transient trouble with a full traceback (a state-API poll failing, a worker
    thread hit by SIGTERM while the cluster shuts down). Each traceback becomes its last line, the
    exception, so a warning that matters still shows in one line; a process told to exit (SystemExit,
    KeyboardInterrupt) shows nothing, nor do warnings Ray itself calls safe to ignore (its autoscaling
    coordinator timing out on a busy machine; this fixed-size job asks no autoscaler for anything).
    ``--verbose`` keeps everything.
    """

    def __init__(self, handler: Any) -> None:
        self._handler = handler
        self._inside: set[tuple[Any, Any]] = set()
        self._benign: set[tuple[Any, Any]] = set()

    def __call__(self, data: dict[str, Any]) -> None:
        key = (data.get("ip"), data.get("pid"))
        out = []
        for line in data.get("lines", []):
            if line.startswith(_BENIGN):
                self._benign.add(key)  # and the traceback that follows it
            elif line.startswith("Traceback (most recent call last)") or _THREAD_DIED.match(line):
                self._inside.add(key)
            elif key not in self._inside:
                out.append(line)
            elif not line.strip() or line[0] in " \t^~" or line.startswith(_CHAINED):
                continue  # a frame, a caret line, a blank, or "During handling of the above exception ..."
            else:
                self._inside.discard(key)
                if key in self._benign:
                    self._benign.discard(key)
                elif not line.startswith(("SystemExit", "KeyboardInterrupt")):
                    out.append(line)
        if out:
            self._handler({**data, "lines": out})


_THREAD_DIED = re.compile(r"^Exception (in thread|ignored in)\b")
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
_BENIGN = ("Failed to send resource request for ",)  # "... it's safe to ignore this error", says Ray


def _collapse_forwarded_tracebacks() -> None:
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its output stays as it is
        return
    with dispatcher._lock:
        dispatcher.handlers = [
            (name, _CollapseTracebacks(h) if name == "ray_print_logs" and not isinstance(h, _CollapseTracebacks) else h)
            for name, h in dispatcher.handlers
        ]


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- placement (pure)


@dataclass
class Placement:
    """Where the peers run: Ray Train workers, what each asks for, the exchange backend, one line to print."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    backend: str
    line: str
    #: Ray's placement-group strategy: STRICT_SPREAD (``ray.spread``: every worker on its own node) or PACK.
    strategy: str = "PACK"


def auto_workers(num_peers: int, total_gpus: int, use_gpu: str) -> int:
    """``ray.placement: auto``: a worker per peer, unless GPUs exist but fewer than peers.

    Then as many workers as GPUs can evenly share the peers (the largest divisor of the peer count
    that is <= the GPUs), each worker a whole GPU hosting its peers in one process: with one GPU that
    is ``together``, whose step is one CUDA graph for all peers. Fractional-GPU workers exchanging
    through gloo were slower on one GPU (README, Performance).
    """
    if use_gpu == "false" or total_gpus <= 0 or total_gpus >= num_peers:
        return num_peers
    return max(d for d in range(1, total_gpus + 1) if num_peers % d == 0)


def plan_placement(cfg: Config, nodes: list[dict[str, float]], check_nodes: bool = True) -> Placement:
    """Decide the placement from the config and the cluster's alive nodes' total resources (pure).

    ``ray.use_gpu: auto`` puts the workers on the GPUs that exist: one GPU each when there are
    enough, else GPU shares (e.g. 2 workers on 1 GPU: 0.5 each, exchanging through gloo); CPU only
    when the cluster has no GPU. ``true`` with too few GPUs, and CPU requests that no node or the
    whole cluster can hold, are a ConfigError (exit 2) before anything starts, never a wait; so is
    ``ray.spread`` (a worker per peer, each on its own node) with fewer nodes that can hold a worker
    than workers (``check_nodes``).
    """
    r = cfg.ray
    names = [p.name for p in cfg.peers]
    mode = str(r.use_gpu).lower()
    node_gpus = [int(n.get("GPU", 0.0) + 1e-9) for n in nodes]
    total_gpus = sum(node_gpus)
    replicas = r.replicas_per_peer
    # Workers that hold every peer once (W); with replicas each of them is R workers (replica-major ranks,
    # cmd_dist.train.exchange.Exchange), so the GPUs one set of peer-workers may use are total / R.
    groups = auto_workers(len(names), total_gpus // replicas, mode) if r.placement == "auto" and not r.spread else None
    if groups is None:  # ray.spread: a worker per peer, each on its own node
        groups = len(names) if r.placement != "together" else 1
    workers = groups * replicas

    def capacity(share: float) -> int:  # workers of this GPU share the cluster's GPUs hold
        return sum(g * int(1.0 / share + 1e-9) for g in node_gpus)

    use_gpu, share, note = False, 0.0, ""
    if mode == "true":
        if total_gpus == 0:
            raise ConfigError("ray.use_gpu: true, but the Ray cluster has no GPU; use ray.use_gpu=auto or false")
        share = r.gpus_per_worker
        if capacity(share) < workers:
            fit = 1.0 / math.ceil(workers / total_gpus)
            raise ConfigError(
                f"ray.use_gpu: true: {workers} workers x {share:g} GPU do not fit the cluster's {total_gpus} "
                f"GPU(s); set ray.gpus_per_worker={math.floor(fit * 10000) / 10000:g}, ray.placement=together, "
                f"or ray.use_gpu=auto"
            )
        use_gpu = True
    elif mode == "auto" and total_gpus > 0:
        use_gpu, share = True, r.gpus_per_worker
        if capacity(share) < workers:
            share = math.floor(10000 / math.ceil(workers / total_gpus)) / 10000
            note = f", sharing {total_gpus} GPU(s)"
    cpu = r.cpus_per_worker
    node_cpus = [n.get("CPU", 0.0) for n in nodes]
    total_cpus = sum(node_cpus)
    if cpu > max(node_cpus, default=0.0) + 1e-9 or sum(int(c / cpu + 1e-9) for c in node_cpus) < workers:
        fit = math.floor(min(total_cpus / workers, max(node_cpus, default=0.0)) * 100) / 100
        fix = f"ray.cpus_per_worker={fit:g}, " if fit > 0 else ""
        raise ConfigError(
            f"ray.cpus_per_worker: {workers} workers x {cpu:g} CPU do not fit the Ray cluster "
            f"({total_cpus:g} CPUs, at most {max(node_cpus, default=0.0):g} per node); set {fix}"
            f"ray.placement=together, or use a bigger cluster"
        )
    resources = {"CPU": cpu}
    if use_gpu:
        resources["GPU"] = share
    if r.spread and check_nodes:
        check_spread(workers, resources, nodes)
    # NCCL across GPUs; gloo on CPU and when workers share a GPU ("Duplicate GPU detected" otherwise).
    backend = "nccl" if use_gpu and workers > 1 and share >= 1 else "gloo"
    per = len(names) // groups  # contiguous, equal shares (cmd_dist.train.exchange.local_peer_indices)
    hosted = [names[i * per : (i + 1) * per] for i in range(groups)]
    device = f"{cpu:g} CPU + {share:g} GPU" if use_gpu else f"{cpu:g} CPU"
    if replicas == 1:
        where = "; ".join(f"{', '.join(h)} -> worker {i} ({device})" for i, h in enumerate(hosted))
    else:
        where = "; ".join(
            f"{', '.join(h)} -> workers {', '.join(str(j * groups + i) for j in range(replicas))}"
            for i, h in enumerate(hosted)
        )
        where += f" ({device} each, {replicas} DDP replicas per peer)"
    if use_gpu:
        how = f"on GPU{note}, {backend} exchange" if workers > 1 else "on GPU"
    else:
        how = (
            "on CPU"
            + (" (no GPU in the cluster)" if mode == "auto" else "")
            + (", gloo exchange" if workers > 1 else "")
        )
    if r.spread:
        how += ", one node each (STRICT_SPREAD)"
    strategy = "STRICT_SPREAD" if r.spread else "PACK"
    return Placement(workers, use_gpu, resources, backend, f"placement: {where}; {how}", strategy)


def check_spread(workers: int, need: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """``ray.spread``: a ConfigError unless ``workers`` distinct nodes can each hold one worker's ``need``.

    Ray would otherwise wait forever for a STRICT_SPREAD placement group the cluster can never place.
    Totals, not free resources, are compared: a busy cluster that can hold the job makes it wait its turn.
    """
    need = {k: v for k, v in need.items() if v > 0}
    usable = sum(1 for n in nodes if all(n.get(k, 0.0) + 1e-9 >= v for k, v in need.items()))
    if usable < workers:
        shown = ", ".join(f"{v:g} {k}" for k, v in need.items())
        raise ConfigError(
            f"ray.spread: {workers} workers need {workers} nodes with {shown} each; the cluster has {usable} such "
            f"node(s) of {len(nodes)}; add nodes, lower ray.cpus_per_worker/gpus_per_worker, or set ray.spread=false"
        )


#: Seconds the output_dir visibility probe waits for every node's answer.
PROBE_TIMEOUT_S = 60.0


def alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def nodes_missing_file(folder: str, name: str, token: str, timeout: float = PROBE_TIMEOUT_S) -> list[dict[str, Any]]:
    """The alive nodes on which ``folder/name`` does not hold ``token`` (one zero-CPU task pinned to each node).

    ``folder`` may be a URI: each node then reads the token through pyarrow, with its own credentials.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def read_token(path: str) -> str | None:
        try:
            if is_uri(path):
                parent, rel = split_location(path)
                data = Remote.open(parent).read_bytes(rel)
                return data.decode() if data is not None else None
            return Path(path).read_text()
        except (OSError, ConfigError, ValueError):
            return None

    nodes = alive_nodes()
    refs = [
        read_token.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            str(join(folder, name))
        )
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    missing = []
    for node, ref in zip(nodes, refs):
        seen = ray.get(ref, timeout=1) if ref in ready else None
        if seen != token:
            missing.append(node)
    return missing


def check_shared_output(output_dir: str) -> None:
    """On a multi-node cluster ``output_dir`` must be the same place for every node (NFS or similar, or a URI).

    A token file written here is read back by a task on every node; a node that cannot read it means the
    folder is local to this machine (or, for a URI, that node cannot reach it: a ``file://`` URI of a local
    folder, missing credentials), and the run is refused (one line) before any worker starts.
    """
    if len(alive_nodes()) < 2:
        return
    import uuid

    token = uuid.uuid4().hex
    name = f".cmd-dist-shared-{token[:12]}"
    if is_uri(output_dir):
        remote = Remote.open(output_dir)
        remote.write_bytes(name, token.encode())
        cleanup: Callable[[], None] = lambda: remote.delete_file(name)  # noqa: E731
    else:
        probe = Path(output_dir) / name
        probe.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(probe, token.encode())
        cleanup = lambda: probe.unlink(missing_ok=True)  # noqa: E731
    try:
        missing = nodes_missing_file(output_dir, name, token)
    finally:
        cleanup()
    if missing:
        raise ConfigError(shared_output_error(output_dir, missing, len(alive_nodes())))


def shared_output_error(output_dir: str, missing: list[dict[str, Any]], total: int) -> str:
    where = ", ".join(f"{n.get('NodeManagerAddress', '?')} ({str(n.get('NodeID', ''))[:8]})" for n in missing[:3])
    if is_uri(output_dir):
        return (
            f"output_dir: {output_dir}: {len(missing)} of the cluster's {total} nodes cannot read what this machine "
            f"wrote there ({where}); use a URI every node reaches with its own credentials (a file:// URI must "
            f"name a folder shared by every node)"
        )
    return (
        f"output_dir: {output_dir} is local to this machine: {len(missing)} of the cluster's {total} nodes "
        f"cannot see it ({where}); use a folder shared by every node at the same path (NFS or similar)"
    )


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def local_node() -> list[dict[str, float]]:
    """What a fresh local Ray will have (its defaults: every CPU core, every visible CUDA device)."""
    import torch

    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def check_placement(cfg: Config) -> None:
    """Before Ray starts: a placement that cannot fit this machine's local Ray is a ConfigError (exit 2)."""
    if ray_address(cfg) is None and not ray.is_initialized():
        plan_placement(cfg, local_node())


def scaling_for(cfg: Config) -> tuple[ScalingConfig, str, bool]:
    """Ray Train's ScalingConfig for ``cfg`` on the connected cluster (CPU counts are checked by train())."""
    nodes = cluster_nodes() if ray.is_initialized() else []
    probe = [{**n, "CPU": max(n.get("CPU", 0.0), 1e9)} for n in nodes] or [{"CPU": 1e9}]
    # The ray.spread node count is checked by train() (and the search) against the real cluster.
    p = plan_placement(cfg, probe, check_nodes=False)
    scaling = ScalingConfig(
        num_workers=p.num_workers,
        use_gpu=p.use_gpu,
        resources_per_worker=p.resources_per_worker,
        placement_strategy=p.strategy,
    )
    return scaling, p.backend, p.use_gpu


class RayReporter:
    """Ray Train's report API behind the engine's Reporter protocol (checkpoints live in the run folder)."""

    def __init__(self, progress: bool = False) -> None:
        self._show_progress = progress
        self._bar: _RunBar | None = None

    def report(self, metrics: dict[str, Any]) -> None:
        ray.train.report(metrics)

    def worker_info(self) -> dict[str, Any]:
        """Where this worker runs, for ``workers/rank<r>.json`` (which peers ran on which Ray node)."""
        node_id = ray.get_runtime_context().get_node_id()
        # The address the node joined the cluster with (127.0.0.1 on a loopback cluster), from the node table.
        ip = next((n.get("NodeManagerAddress") for n in ray.nodes() if n.get("NodeID") == node_id), None)
        return {"node_id": node_id, "node_ip": ip or ray.util.get_node_ip_address()}

    def progress(self, total: int, desc: str) -> Any:
        if not self._show_progress:
            return None
        if self._bar is None:
            self._bar = _RunBar()
        return self._bar.start_epoch(total, desc)

    def close_bars(self) -> None:
        """Close the bar a failing epoch left open: the driver would otherwise redraw it above every later line."""
        if self._bar is not None:
            try:
                self._bar._last = True
                self._bar.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            self._bar = None


_EPOCH_DESC = re.compile(r"epoch (\d+)/(\d+)")


class _RunBar:
    """One ``tqdm_ray`` bar for the whole run, reset at each epoch.

    The driver draws a worker's tqdm_ray bars and keeps the line of every closed bar; one bar per
    epoch would leave a bar line beside every epoch line. This one is reused and closed only after
    the last epoch's steps, long before the run ends, so the final lines print below it.
    """

    def __init__(self) -> None:
        from ray.experimental.tqdm_ray import tqdm

        self._bar = tqdm(total=1, desc="")
        self._last = False

    def start_epoch(self, total: int, desc: str) -> _RunBar:
        match = _EPOCH_DESC.search(desc)
        self._last = bool(match) and int(match.group(1)) >= int(match.group(2))
        self._bar.n = 0
        self._bar.total = total
        self._bar.set_description(desc)
        return self

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        if self._last:
            self._bar.close()
        else:
            self._bar.refresh()


class TrainingCodeError(RuntimeError):
    """An exception raised by the training code in a worker, with the worker's traceback as text."""

    def __init__(self, rank: int, kind: str, message: str, tb: str, errno_: int | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.rank, self.kind, self.message, self.tb, self.errno = rank, kind, message, tb, errno_

    def __reduce__(self):
        return (self.__class__, (self.rank, self.kind, self.message, self.tb, self.errno))


def _test_fault_hook(spec: str) -> Callable[[int, int], None]:
    """``CMD_DIST_TEST_FAULT=raise:<rank>:<epoch>``: that rank raises before that epoch (tests only)."""
    kind, rank, epoch = spec.split(":")

    def hook(r: int, e: int) -> None:
        if kind == "raise" and r == int(rank) and e == int(epoch):
            raise ValueError(f"test fault: rank {r} raises before epoch {e}")

    return hook


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker entry point: plain dict -> typed config -> the shared training code.

    Exceptions of the training code leave as :class:`TrainingCodeError` carrying the traceback text
    (Ray hands the driver the exception without its traceback); rank 0 returns the last metrics.
    """
    import torch

    from cmd_dist.train.monitor import Monitor
    from cmd_dist.train.worker import run_worker

    if not config.get("verbose", False):
        _quiet_report_log()
    cfg = from_dict(config["cfg"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    workers_lock = hold_workers_lock(config["run_dir"])
    store = RunStore.open(config["run_dir"])  # a folder, or a URI staged in a folder of this process
    fault = config.get("test_fault")
    echo, hparams = config.get("echo", True), config.get("hparams")
    reporter = RayReporter(progress=config.get("progress", False))
    try:
        return run_worker(
            cfg,
            store,
            reporter,
            device,
            monitor_factory=(lambda c, d, s: Monitor(c, d, s, echo=echo, hparams=hparams))
            if config.get("monitor", True)
            else None,
            fault_hook=_test_fault_hook(fault) if fault else None,
        )
    except Exception as e:
        reporter.close_bars()
        rank = ray.train.get_context().get_world_rank()
        raise TrainingCodeError(
            rank, type(e).__name__, str(e), traceback.format_exc(), getattr(e, "errno", None)
        ) from None
    finally:
        store.close()
        if workers_lock is not None:
            os.close(workers_lock)


def _quiet_report_log() -> None:
    """Ray Train logs every report (``Reporting training result 1: TrainingReport(...)``, every metric, on
    one line) through a logger named after its file, outside ``ray.train``, so RunConfig's log level
    misses it: raise that logger's level here, in the worker."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without that module does not print these lines either
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def build_trainer(
    cfg: Config,
    run_dir: Path | str,
    callbacks: list | None = None,
    monitor: bool = True,
    placement: Placement | None = None,
    verbose: bool = False,
    echo: bool = True,
    hparams: dict[str, Any] | None = None,
) -> TorchTrainer:
    """The Ray Train job for one run. ``echo``: print the epoch lines (Tune trials do not: the search
    prints one line per finished trial). ``hparams``: written as TensorBoard HParams (Tune trials)."""
    if placement is None:
        scaling, backend, _ = scaling_for(cfg)
    else:
        scaling = ScalingConfig(
            num_workers=placement.num_workers,
            use_gpu=placement.use_gpu,
            resources_per_worker=placement.resources_per_worker,
            placement_strategy=placement.strategy,
        )
        backend = placement.backend
    parent, name = split_location(run_dir)
    # Ray Train keeps its own run state beside ours: in the run folder's parent, a folder or the URI's filesystem.
    storage_fs, storage_path = open_filesystem(parent) if is_uri(parent) else (None, parent)
    run_config = RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        # Ray never retries by itself: fit_with_restarts tells a lost worker (restart) from an error
        # of the training code (fail at once). Worker-group start is retried twice, not forever.
        failure_config=FailureConfig(max_failures=0, controller_failure_limit=2),
        # The engine writes, verifies and prunes the checkpoints itself (run_dir/checkpoint_<epoch>).
        checkpoint_config=CheckpointConfig(num_to_keep=None),
        callbacks=callbacks or None,
        # Ray Train's own log lines (per-report records, failure-policy decisions, the tracebacks
        # of a lost worker's partners) only with --verbose: the driver prints one line per event.
        logging_config=LoggingConfig(log_level="INFO" if (verbose or CONSOLE.verbose) else "CRITICAL"),
    )
    loop_config = {
        "cfg": cfg.to_dict(),
        "run_dir": str(run_dir),
        "monitor": monitor,
        "echo": echo,
        "progress": CONSOLE.progress and echo,
        "hparams": hparams,
        "verbose": CONSOLE.verbose,
    }
    return TorchTrainer(
        train_worker,
        train_loop_config={
            **loop_config,
            # Tests inject a fault in the training code with CMD_DIST_TEST_FAULT (see _test_fault_hook).
            "test_fault": os.environ.get("CMD_DIST_TEST_FAULT", ""),
        },
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend=backend),
    )


class RunFailed(RuntimeError):
    """The run cannot go on: ``str(e)`` is the one line to print, ``detail`` the traceback (if any)."""

    def __init__(self, message: str, detail: str = "", code: int = 1) -> None:
        super().__init__(message)
        self.detail, self.code = detail, code


def lost_workers(error: WorkerGroupError) -> dict[int, str]:
    """Ranks whose worker process (or node) is gone, with Ray's reason; empty when all errors are the code's.

    A dead actor reaches the driver as Ray Train's WorkerHealthCheckFailedError wrapping a
    ``ray.exceptions.RayActorError`` (ActorDiedError: process killed, node lost). Everything else,
    e.g. our TrainingCodeError or a peer's collective failing because its partner died, is not a loss.
    Pinned by tests/test_faults.py::test_lost_worker_classification_matches_ray.
    """
    lost = {}
    for rank, err in error.worker_failures.items():
        inner = getattr(err, "health_check_failure", err)
        if isinstance(inner, ray.exceptions.RayActorError) or isinstance(err, ray.exceptions.RayActorError):
            lost[rank] = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    return lost


#: A collective that broke because its partner's process or node vanished (gloo, NCCL).
_COMM_ERROR = re.compile(r"gloo|nccl|connection reset|connection closed|DistBackendError|DistNetworkError", re.I)

#: Seconds to wait for Ray to mark a vanished node dead (its GCS health check) before calling an error the code's.
NODE_LOSS_WAIT_S = 30.0


def lost_nodes(error: WorkerGroupError, run_dir: Path | str, timeout: float = NODE_LOSS_WAIT_S) -> dict[int, str]:
    """Ranks that ran on a node the cluster has lost, when every failure is a collective breaking.

    A node removed at once (machine gone, raylet killed) reaches the driver first as the surviving workers'
    collective errors (gloo: "Connection reset by peer"), before Ray's health check of the dead worker
    fails, and Ray Train reports only those. The workers' records (``workers/rank<r>.json``: ``node_id``,
    written at every start) and the cluster's node table tell whether a worker's node is gone; Ray marks
    it dead within its health-check period, so this waits up to ``timeout``. Other errors return at once.
    Pinned by tests/test_cluster.py::test_spread_peers_on_two_nodes_survive_a_lost_node_and_equal_single_node.
    """
    failures = list(error.worker_failures.values())
    if not failures or not all(
        isinstance(f, TrainingCodeError) and _COMM_ERROR.search(f"{f.kind}: {f.message}") for f in failures
    ):
        return {}
    where: dict[int, str] = {}
    try:
        records = worker_records(run_dir)
    except (OSError, ConfigError):
        records = []  # the URI cannot be read right now: nothing to tell
    for info in records:
        try:
            where[int(info["rank"])] = str(info["node_id"])
        except (ValueError, KeyError, TypeError):
            continue  # a run without Ray node records (or a damaged one): nothing to tell
    if not where:
        return {}
    deadline = time.monotonic() + timeout
    while True:
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        lost = {r: f"its node {nid[:8]} left the cluster" for r, nid in sorted(where.items()) if nid not in alive}
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(0.5)


def code_error(error: WorkerGroupError) -> TrainingCodeError | BaseException:
    """The first training-code exception among the workers' failures (lowest rank), else any failure."""
    failures = dict(sorted(error.worker_failures.items()))
    for err in failures.values():
        if isinstance(err, TrainingCodeError):
            return err
    return next(iter(failures.values()), error)


#: errnos that mean "the disk cannot take the run's files": a one-line error, never a retry. (Permission
#: errors keep their traceback: they may come from any file, not only the run folder.)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _failed_line(err: BaseException, run_dir: Path | str) -> str:
    resume = f"cmd-dist train --resume {run_dir}"
    if isinstance(err, TrainingCodeError):
        if err.errno in WRITE_ERRNOS:
            return (
                f"cannot write to the run folder ({err.kind}: {err.message}); free space (or use a "
                f"writable output_dir), then continue with: {resume}"
            )
        return (
            f"the training code raised {err.kind} in worker {err.rank}: {err.message} (not retried; the run "
            f"folder {run_dir} is kept; fix the cause, then continue with: {resume})"
        )
    return f"training failed: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}"


def run_interruptibly(fn: Callable[[], Any]) -> Any:
    """``fn()`` (a Ray Train or Tune fit) in a helper thread; the caller waits in short, interruptible joins.

    Ray Train (and Tune) install their own SIGINT handlers when fit() runs in the main thread (Train
    aborts the run and exits 1, or does nothing while the main thread is blocked in ray.get); in a
    helper thread they do not, so Ctrl-C and SIGTERM reach the caller as KeyboardInterrupt within a
    fraction of a second.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="cmd-dist-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def fit_with_restarts(
    cfg: Config,
    run_dir: Path | str,
    callbacks: list | None = None,
    monitor: bool = True,
    placement: Placement | None = None,
    log: Callable[[str], None] = print,
    verbose: bool = False,
    echo: bool = True,
    hparams: dict[str, Any] | None = None,
) -> Any:
    """Fit; after a lost worker, fit again from the newest complete checkpoint (``ray.max_failures`` times).

    Raises RunFailed at once for an exception of the training code, a run folder that cannot be
    written, or a worker group Ray could not start.
    """
    restarts = 0
    while True:
        trainer = build_trainer(cfg, run_dir, callbacks, monitor, placement, verbose, echo, hparams)
        try:
            return run_interruptibly(trainer.fit)
        except WorkerGroupError as e:
            lost = lost_workers(e) or lost_nodes(e, run_dir)
            if not lost:
                err = code_error(e)
                detail = err.tb if isinstance(err, TrainingCodeError) else "".join(traceback.format_exception(e))
                if isinstance(err, TrainingCodeError) and err.errno in WRITE_ERRNOS and not verbose:
                    detail = ""  # a full or read-only disk is not a bug: the one line says it all
                raise RunFailed(_failed_line(err, run_dir), detail) from None
            restarts += 1
            ranks = ", ".join(str(r) for r in sorted(lost))
            if restarts > cfg.ray.max_failures:
                raise RunFailed(
                    f"worker {ranks} lost again ({next(iter(lost.values()))}); gave up after "
                    f"{cfg.ray.max_failures} restart(s) (ray.max_failures); continue with: "
                    f"cmd-dist train --resume {run_dir}",
                    "".join(traceback.format_exception(e)) if verbose else "",
                ) from None
            newest = newest_checkpoint_epoch(run_dir, len(cfg.peers))
            start = f"epoch {newest}'s checkpoint" if newest >= 0 else "the start (no checkpoint yet)"
            log(
                f"cmd-dist: worker {ranks} was lost ({next(iter(lost.values()))}); restarting the peer group "
                f"from {start} (restart {restarts} of at most {cfg.ray.max_failures})"
            )
            if verbose:
                log("".join(traceback.format_exception(e)))
        except ControllerError as e:
            cause = getattr(e, "controller_failure", e)
            raise RunFailed(
                f"Ray could not run the worker group: {str(cause).strip().splitlines()[0]}",
                "".join(traceback.format_exception(e)),
            ) from None


def _finite_or_none(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and x == x and abs(x) != float("inf") else None


def summarize(cfg: Config, metrics: dict[str, Any], run_dir: Path | str, wall_s: float) -> dict[str, Any]:
    split = metrics.get("eval_split", "test" if cfg.data.protocol == "final" else "val")
    peers = []
    extra = [name for name in str(metrics.get("extra_eval_sets", "")).split(",") if name]
    for p in cfg.peers:
        acc = metrics.get(f"{p.name}/{split}_acc")
        best = metrics.get(f"{p.name}/best_{split}_acc")
        peers.append(
            {
                "name": p.name,
                "arch": p.arch,
                "test_acc": acc if split == "test" else None,
                "val_acc": acc if split == "val" else None,
                "best_val_acc": best if split == "val" else None,
                # Final protocol: the best epoch's test accuracy is shown, never used for selection.
                "best_test_acc": best if split == "test" else None,
                "best_epoch": metrics.get(f"{p.name}/best_epoch"),
                "train_acc_clean": _finite_or_none(metrics.get(f"{p.name}/train_acc_clean")),  # None: no clean labels
                "train_acc_noisy": metrics.get(f"{p.name}/train_acc_noisy"),
                # Scored beside the eval split, never used to select (mini-WebVision: WebVision's val set).
                "other_acc": {name: metrics.get(f"{p.name}/{name}_acc") for name in extra},
            }
        )
    summary = {
        "run_dir": str(run_dir),
        "protocol": cfg.data.protocol,
        "eval_split": split,
        "epochs_run": metrics.get("epoch", 0),
        "epochs": cfg.train.epochs,
        "peers": peers,
        f"mean_{split}_acc": metrics.get(f"{split}_acc"),
        "wall_s": round(wall_s, 1),
        "stopped": metrics.get("nonfinite"),
        "splits_read": metrics.get("splits_read"),
        # Realised fraction of training labels != clean labels (null where no clean label is known).
        "noise_rate": _finite_or_none(metrics.get("noise_rate")),
        "skipped_images": metrics.get("skipped_images", 0),
        # What --resume --allow-changes changed, and from which epoch (changes.jsonl; config.original.yaml).
        "changes": read_changes(run_dir),
    }
    write_run_file(run_dir, "summary.json", json.dumps(summary, indent=2).encode())
    return summary


CHANGES_FILE = "changes.jsonl"
ORIGINAL_CONFIG = "config.original.yaml"


def record_resume(
    run_dir: Path | str, old_text: bytes, cfg: Config, changes: dict[str, tuple[Any, Any]], from_epoch: int
) -> None:
    """Write a resumed run's config.yaml; training changes (``--allow-changes``) are recorded first.

    The first change keeps the config the run started with as ``config.original.yaml``; each resume with
    changes appends one line to ``changes.jsonl`` (the keys' old and new values and the first epoch trained
    with them), which summary.json repeats under ``changes``. train.epochs also moves Eq. 12's chi schedule
    and ProSelfLC's t/Gamma (both fractions of train.epochs): the line says so.
    """
    if changes:
        if read_run_file(run_dir, ORIGINAL_CONFIG) is None:
            write_run_file(run_dir, ORIGINAL_CONFIG, old_text)
        entry: dict[str, Any] = {
            "from_epoch": from_epoch,
            "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_rev": git_revision(),
        }
        if "train.epochs" in changes and from_epoch > 1:
            old, new = changes["train.epochs"]
            entry["note"] = (
                f"schedules that follow train.epochs (Eq. 12's chi, ProSelfLC's t/Gamma) changed at epoch "
                f"{from_epoch}: epochs 1-{from_epoch - 1} followed {old} epochs, later ones follow {new}"
            )
        history = read_run_file(run_dir, CHANGES_FILE) or b""
        if history and not history.endswith(b"\n"):
            history += b"\n"
        write_run_file(run_dir, CHANGES_FILE, history + (json.dumps(entry) + "\n").encode())
    write_run_file(run_dir, "config.yaml", dump_yaml(cfg).encode())
    if changes:  # the summary of the run so far now says what the run is (it is rewritten when training ends)
        try:
            summary = json.loads(read_run_file(run_dir, "summary.json") or b"null")
        except ValueError:
            summary = None
        if isinstance(summary, dict):
            summary["epochs"] = cfg.train.epochs
            summary["changes"] = read_changes(run_dir)
            write_run_file(run_dir, "summary.json", json.dumps(summary, indent=2).encode())


def read_changes(run_dir: Path | str) -> list[dict[str, Any]]:
    """The run's ``changes.jsonl`` entries, oldest first ([] when nothing was ever changed)."""
    out = []
    for line in (read_run_file(run_dir, CHANGES_FILE) or b"").decode(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short
        if isinstance(entry, dict):
            out.append(entry)
    return out


def train(
    cfg: Config, run_dir: Path | str | None = None, log: Callable[[str], None] = print, verbose: bool = False
) -> dict:
    """Run (or resume) a training job on Ray and return its summary (also written to summary.json).

    Raises ConfigError (the placement cannot fit) before any worker starts, RunFailed when the run
    fails, KeyboardInterrupt on Ctrl-C / SIGTERM (the caller prints the resume command).
    """
    run_dir = run_dir or resolve_run_dir(cfg)
    lock_run_dir(run_dir)
    init_ray(cfg)
    placement = plan_placement(cfg, cluster_nodes())
    check_shared_output(cfg.output_dir)
    log(f"cmd-dist: {placement.line}")
    start = time.time()
    result = fit_with_restarts(cfg, run_dir, placement=placement, log=log, verbose=verbose)
    metrics = getattr(result, "return_value", None) or result.metrics or {}
    return summarize(cfg, metrics, run_dir, time.time() - start)
