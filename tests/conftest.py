"""Shared fixtures: one real local Ray cluster for the whole test session (Ray starts slowly)."""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import tempfile
import time

import pytest

# Every test cluster runs with Ray's token authentication, as cmd-dist's own local Ray does; one token per test
# session, in a file only this user reads (never ~/.ray/auth_token), inherited by every Ray process, client and
# `cmd-dist` subprocess the tests start. Nodes keep 127.0.0.1 (Ray would swap in the machine's routable address
# and listen on every interface).
os.environ.setdefault("RAY_AUTH_MODE", "token")
if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
    _fd, _token_path = tempfile.mkstemp(prefix="cmd-dist-test-token-")  # mode 0600
    os.write(_fd, secrets.token_hex(32).encode())
    os.close(_fd)
    os.environ["RAY_AUTH_TOKEN_PATH"] = _token_path

    @atexit.register
    def _remove_token() -> None:
        with contextlib.suppress(OSError):
            os.remove(_token_path)


os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CIFAR = os.path.join(REPO, "..", "shared", "data")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with 2 CPUs (CI's machine), shared by every Ray test and shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_config=ray.LoggingConfig(log_level="ERROR"),
        )
    yield ray
    ray.shutdown()


def wait_for(predicate, timeout: float = 240.0, every: float = 0.05):
    """Poll ``predicate()`` until it is truthy (returned) or ``timeout`` seconds pass (AssertionError)."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")
