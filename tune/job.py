"""What a search is: its folder, the user's config, the space and the options (saved in ``search.yaml`` so
``--resume`` continues it). Shared by :mod:`tune.search` (the checks, before Ray) and :mod:`tune.driver` (Ray Tune).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmd_dist.config import Config, from_dict
from cmd_dist.runs.fs import join, open_folder
from tune.space import SearchSpace

DEFAULT_REDUCTION_FACTOR = 3.0
STATE_FILE = "search.yaml"
TUNE_EXPERIMENT = "trials"


@dataclass
class SearchOptions:
    """How to search; saved in search.yaml so ``--resume`` continues with the same settings."""

    trials: int
    algo: str = "optuna"
    asha: bool = True
    grace_period: int = 1
    reduction_factor: float = DEFAULT_REDUCTION_FACTOR
    #: ``mean`` (validation accuracy averaged over peers) or one peer's name.
    metric: str = "mean"
    #: 0 = as many trials at once as the cluster fits.
    max_concurrent: int = 0


@dataclass
class SearchJob:
    #: A folder, or a URI (a str: ``s3://bucket/runs/tune-...``).
    search_dir: Path | str
    #: The user's config (overrides applied, paths absolute) as a plain dict; trials vary it.
    base: dict[str, Any]
    space: SearchSpace
    options: SearchOptions
    resume: bool = False

    @property
    def config(self) -> Config:
        return from_dict(self.base)

    @property
    def peers(self) -> list[str]:
        return [p.name for p in self.config.peers]

    @property
    def score_key(self) -> str:
        return metric_key(self.options.metric)

    @property
    def experiment_dir(self) -> Path | str:
        return join(self.search_dir, TUNE_EXPERIMENT)

    @property
    def is_uri(self) -> bool:
        """The search folder is behind a URI (its files are not on this machine's filesystem)."""
        return open_folder(self.search_dir).local is None


def metric_key(metric: str) -> str:
    """The reported metric a search maximises: ``val_acc`` (mean over peers) or ``<peer>/val_acc``."""
    return "val_acc" if metric == "mean" else f"{metric}/val_acc"
