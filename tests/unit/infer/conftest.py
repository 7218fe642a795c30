"""One tiny real run for the infer tests, trained once per test session: digits, 2 peers, 3 epochs, in this process
(`run_local`, no Ray), its folder made and summarised by the launcher's own `resolve_run_dir` and `summarize`, so the
tests read exactly what `cmd-dist train` leaves behind. The settings (lr 0.5 on 600 images) are chosen so the best
epoch (2) is not the last (3) and the peers disagree: a command that reads the wrong checkpoint or peer gives other
numbers. The fixture checks both premises, so a change of the trainer that breaks them fails here, not silently.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO

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
