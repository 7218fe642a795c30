"""What the driver's console shows: quiet by default (epoch lines, a progress bar on a terminal, errors), and
Ray's forwarded worker logs with each traceback collapsed to its last line. Imports Ray only lazily."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Any


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


def collapse_forwarded_tracebacks() -> None:
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its output stays as it is
        return
    with dispatcher._lock:
        dispatcher.handlers = [
            (name, _CollapseTracebacks(h) if name == "ray_print_logs" and not isinstance(h, _CollapseTracebacks) else h)
            for name, h in dispatcher.handlers
        ]
