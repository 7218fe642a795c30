"""The paper's cell: which shipped config a run reproduces, and why its number is omitted when it does not.

The paper's number is shown only beside a run that reproduces its cell: a finished run tested on the test split
(protocol ``final``) whose dataset, noise (kind and rate, or CIFAR-N label set), method, architectures and epochs
are those of a shipped config in ``configs/`` with the same ``paper`` section.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from cmd_dist.config import Config, ConfigError, load_config
from cmd_dist.report.numbers import num

#: Where the shipped experiment configs live (each names its paper cell): the checkout's ``configs/``.
CONFIGS_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


@functools.lru_cache(maxsize=1)
def shipped_configs() -> tuple[tuple[Path, Config], ...]:
    """The experiment configs in ``configs/`` that name a paper number (the cells a run can reproduce)."""
    found = []
    for path in sorted(CONFIGS_DIR.rglob("*.yaml")) if CONFIGS_DIR.is_dir() else []:
        try:
            cfg = load_config(path)
        except ConfigError:
            continue
        if cfg.paper.value is not None or cfg.paper.peers:
            found.append((path, cfg))
    return tuple(found)


def noise_text(cfg: Config, summary: dict[str, Any] | None = None) -> str:
    """The training labels' noise: the configured rate for synthetic noise, the label set for CIFAR-N, and the
    realised rate (summary.json's ``noise_rate``: training labels that differ from the clean ones) when known."""
    n = cfg.noise
    realised = num((summary or {}).get("noise_rate"))
    known = f"realised {100 * realised:.2f}%" if realised is not None else ""
    if n.kind == "human":
        return f"human ({n.label_set}, {known or 'realised rate unknown'})"
    if n.kind == "none":
        return "labels as shipped" + (f" ({known})" if known else "")
    return f"{n.kind} {100 * n.rate:g}%" + (f" ({known})" if known else "")


def _cell_mismatch(cfg: Config, cell: Config) -> str:
    """The first way the run's setting differs from the paper's cell ("" when it matches)."""

    def noise(c: Config) -> str:
        n = c.noise
        return f"human {n.label_set}" if n.kind == "human" else n.kind if n.kind == "none" else f"{n.kind} {n.rate:g}"

    checks = [
        ("dataset", lambda c: c.data.dataset),
        ("noise", noise),
        ("method", lambda c: f"{c.method.objective}/{c.method.knowledge} + {c.method.self_kd}"),
        ("architectures", lambda c: " + ".join(p.arch for p in c.peers)),
        ("epochs", lambda c: str(c.train.epochs)),
    ]
    for what, get in checks:
        if get(cfg) != get(cell):
            return f"{what} {get(cfg)}, the paper's cell {get(cell)}"
    return ""


def paper_text(cfg: Config) -> str:
    """The paper's number(s): the mean (``paper.value``) or one per peer (``paper.peers``, Table 6)."""
    if cfg.paper.value is not None:
        return f"{cfg.paper.value:.2f} ({cfg.paper.table})"
    if cfg.paper.peers:
        return " / ".join(f"{v:.2f}" for v in cfg.paper.peers) + f" ({cfg.paper.table})"
    return "-"


def paper_omission(cfg: Config, split: str, summary: dict[str, Any] | None) -> str:
    """Why the paper's number is not comparable with a run of ``cfg`` scored on ``split`` whose summary.json is
    ``summary`` ("" when it is, or when the config names none)."""
    s = summary
    if cfg.paper.value is None and not cfg.paper.peers:
        return ""
    if split != "test":
        return f"{split} accuracy (protocol {cfg.data.protocol}); the paper reports test accuracy"
    if s is None:
        return "the run has not finished (no summary.json)"
    if s.get("epochs_run") != s.get("epochs"):
        return f"the run stopped after {s.get('epochs_run')} of {s.get('epochs')} epochs"
    cells = [c for _, c in shipped_configs() if c.paper == cfg.paper]
    if not cells:
        return f"no config in configs/ gives {paper_text(cfg)}, so the run's setting cannot be checked against it"
    reasons = [_cell_mismatch(cfg, cell) for cell in cells]
    return "" if "" in reasons else reasons[0]
