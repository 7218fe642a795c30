"""The search's console while it runs: one line per finished trial and, on a terminal, one live status line."""

from __future__ import annotations

import math
import sys
from typing import Any

from cmd_dist.launch import environment  # noqa: F401 - Ray's environment defaults, before Ray is imported
from tune.job import SearchJob
from tune.space import plain_value

# isort: split
from ray import tune as ray_tune


class TrialLines(ray_tune.Callback):
    """The search's console: one line per finished trial and, on a terminal, one live status line.

    Replaces Ray Tune's periodic trial tables (``verbose=0``); the full table is printed at the end.
    """

    def __init__(self, job: SearchJob, epochs: int, live: bool) -> None:
        self._job = job
        self._epochs = epochs
        self._live = live
        self._finished = 0
        self._best: float | None = None
        self._status_shown = False

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._status(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "")
        self._status(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "error")
        self._status(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._clear()

    def _line(self, trial: Any, status: str) -> None:
        self._finished += 1
        result = dict(trial.last_result or {})
        epochs = int(result.get("epoch", 0) or 0)
        score = _finite(result.get(self._job.score_key))
        if score is not None and (self._best is None or score > self._best):
            self._best = score
        if not status:
            status = (
                "non-finite loss"
                if result.get("nonfinite")
                else ("completed" if epochs >= self._epochs else "early-stopped")
            )
        params = " ".join(f"{k.split('.')[-1]} {_short(trial.config.get(k))}" for k in self._job.space.keys)
        accs = " ".join(f"{p} {_pct(result.get(f'{p}/val_acc'))}" for p in self._job.peers)
        self._clear()
        print(
            f"trial {self._finished}/{self._job.options.trials} {trial.trial_id} | {params} | val {accs} "
            f"mean {_pct(result.get('val_acc'))} | {epochs}/{self._epochs} epochs | {status}",
            flush=True,
        )

    def _status(self, trials: list) -> None:
        if not self._live:
            return
        running = sum(t.status == "RUNNING" for t in trials)
        best = "-" if self._best is None else f"{self._best:.2f}%"
        sys.stdout.write(
            f"\r\033[K{self._finished}/{self._job.options.trials} trials finished, {running} running, best {best}"
        )
        sys.stdout.flush()
        self._status_shown = True

    def _clear(self) -> None:
        if self._status_shown:
            sys.stdout.write("\r\033[K")
            self._status_shown = False


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _pct(value: Any) -> str:
    v = _finite(value)
    return "-" if v is None else f"{v:.2f}%"


def _short(value: Any) -> str:
    value = plain_value(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)
