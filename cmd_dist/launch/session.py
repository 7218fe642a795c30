"""The driver process's plumbing around Ray, shared by ``cmd-dist train`` and ``cmd-dist tune``: signals as
KeyboardInterrupt, and stopping Ray quietly on the way out. Imports Ray only in :func:`stop_ray`."""

from __future__ import annotations

import signal


def sigterm_as_interrupt() -> None:
    """SIGTERM and SIGINT (Ctrl-C) both raise KeyboardInterrupt in the main thread: one way out, exit 130."""

    def handler(signum, frame):  # noqa: ARG001
        # A second signal while shutting down must not print a traceback over the resume hint.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        quiet_ray_shutdown()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def quiet_ray_shutdown() -> None:
    """On Ctrl-C the signal reaches Ray's own processes too; Ray's process code then logs ``ERROR services.py``
    lines about processes already gone: silence that logger for the way out."""
    import logging

    logging.getLogger("ray._private.services").setLevel(logging.CRITICAL)


def stop_ray() -> None:
    quiet_ray_shutdown()
    try:
        import ray

        ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
