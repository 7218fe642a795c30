"""Run the training loop in this process, without Ray (one worker hosting every peer).

Used by unit tests and by anyone embedding cmd-dist in their own tooling; ``cmd-dist train`` uses
the Ray launcher, which runs the very same :func:`cmd_dist.engine.run_worker`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from cmd_dist.config import Config
from cmd_dist.engine import run_worker
from cmd_dist.monitor import Monitor


class LocalReporter:
    """Keeps checkpoints as ``run_dir/checkpoint_<epoch>`` folders (the latest ``keep`` of them)."""

    def __init__(self, run_dir: Path, keep: int, show_progress: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.show_progress = show_progress
        self.reports: list[dict[str, Any]] = []

    def _folders(self) -> list[Path]:
        return sorted(self.run_dir.glob("checkpoint_*"))

    def latest_checkpoint(self) -> Path | None:
        folders = self._folders()
        return folders[-1] if folders else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        dest = self.run_dir / f"checkpoint_{metrics['epoch']:06d}"
        tmp = self.run_dir / f".{dest.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)  # a folder appears complete or not at all
        for old in self._folders()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def progress(self, total: int, desc: str) -> Any:
        if not self.show_progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, mininterval=1.0)


def run_local(cfg: Config, run_dir: str | Path, device: str = "cpu", echo: bool = False) -> tuple[dict, LocalReporter]:
    """Train all peers of ``cfg`` in this process; resumes from ``run_dir``'s latest checkpoint."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    reporter = LocalReporter(run_dir, cfg.ray.keep_checkpoints)
    metrics = run_worker(
        cfg,
        run_dir,
        reporter,
        torch.device(device),
        monitor_factory=lambda c, d, s: Monitor(c, d, s, echo=echo),
        checkpoint_search_dir=run_dir,
    )
    return metrics, reporter
