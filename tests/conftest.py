"""Shared fixtures: one real local Ray cluster for the whole test session (Ray starts slowly)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

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


# One tiny real run for the infer tests, trained once per test session: digits, 2 peers, 3 epochs, in this process
# (`run_local`, no Ray), its folder made and summarised by the launcher's own `resolve_run_dir` and `summarize`, so the
# tests read exactly what `cmd-dist train` leaves behind. The settings (lr 0.5 on 600 images) are chosen so the best
# epoch (2) is not the last (3) and the peers disagree: a command that reads the wrong checkpoint or peer gives other
# numbers. The fixture checks both premises, so a change of the trainer that breaks them fails here, not silently.
DEMO = os.path.join(REPO, "configs", "demo.yaml")
TINY = [
    "train.epochs=3",
    "train.lr=0.5",
    "train.milestones=[]",
    "train.log_every=0",
    "data.train_subset=600",
    "data.test_subset=300",
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """The run folder (read-only by convention: copy it with `run_copy` before changing anything)."""
    from cmd_dist.config import load_config
    from cmd_dist.launch import job
    from cmd_dist.launch.summary import summarize
    from cmd_dist.train.local import run_local

    out = tmp_path_factory.mktemp("infer-runs")
    cfg = load_config(DEMO, [*TINY, f"output_dir={out}", "run_name=tiny"])
    run_dir = Path(job.resolve_run_dir(cfg, lock=False))
    metrics, _ = run_local(cfg, run_dir)
    summary = summarize(cfg, metrics, run_dir, wall_s=1.0)
    best = json.loads((run_dir / "best_checkpoint" / "metrics.json").read_text())
    assert best["epoch"] == 2 and summary["epochs_run"] == 3, "the fixture's premise: best epoch != last epoch"
    accs = [p["test_acc"] for p in summary["peers"]]
    assert accs[0] != accs[1], "the fixture's premise: the peers disagree"
    return run_dir


@pytest.fixture(scope="session")
def search_run(tmp_path_factory) -> Path:
    """A 1-epoch run of the search protocol (90% of the 600 training images trained on, 10% held out as val)."""
    from cmd_dist.config import load_config
    from cmd_dist.launch import job
    from cmd_dist.launch.summary import summarize
    from cmd_dist.train.local import run_local

    out = tmp_path_factory.mktemp("infer-search")
    cfg = load_config(DEMO, [*TINY, "train.epochs=1", "data.protocol=search", f"output_dir={out}", "run_name=search"])
    run_dir = Path(job.resolve_run_dir(cfg, lock=False))
    metrics, _ = run_local(cfg, run_dir)
    summarize(cfg, metrics, run_dir, wall_s=1.0)
    return run_dir


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the run folder, to damage."""
    dest = tmp_path / "run"
    shutil.copytree(trained_run, dest, ignore=shutil.ignore_patterns(".lock", ".workers.lock"))
    return dest
