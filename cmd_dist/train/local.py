"""Run the training loop in this process, without Ray (one worker hosting every peer).

Used by unit tests and by anyone embedding cmd-dist in their own tooling; ``cmd-dist train`` uses
the Ray launcher, which runs the very same :func:`cmd_dist.train.worker.run_worker`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cmd_dist.config import Config
from cmd_dist.runs.storage import RunStore
from cmd_dist.train.monitor import Monitor
from cmd_dist.train.worker import run_worker


class LocalReporter:
    """Collects each epoch's metrics (checkpoints are written into the run folder by the worker)."""

    def __init__(self, run_dir: Path | str, show_progress: bool = False) -> None:
        self.run_dir = run_dir  # a folder's Path, or a URI's str (RunStore.location)
        self.show_progress = show_progress
        self.reports: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any]) -> None:
        self.reports.append(dict(metrics))

    def progress(self, total: int, desc: str) -> Any:
        if not self.show_progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, mininterval=1.0)


def run_local(
    cfg: Config, run_dir: str | Path | RunStore, device: str = "cpu", echo: bool = False, fault_hook=None
) -> tuple[dict, LocalReporter]:
    """Train all peers of ``cfg`` in this process; resumes from the run folder's latest complete checkpoint.

    ``run_dir`` may be a filesystem URI (``file:///shared/runs/x``, ``s3://...``) or a :class:`RunStore`; the
    staging folder of a URI is removed when the run ends, however it ends.
    """
    store = RunStore.open(run_dir)
    if not store.is_uri:
        store.dir.mkdir(parents=True, exist_ok=True)
    reporter = LocalReporter(store.location if store.is_uri else store.dir)
    try:
        metrics = run_worker(
            cfg,
            store,
            reporter,
            torch.device(device),
            monitor_factory=lambda c, d, s: Monitor(c, d, s, echo=echo),
            fault_hook=fault_hook,
        )
    finally:
        store.close()
    return metrics, reporter
