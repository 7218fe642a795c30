"""What a finished search leaves behind: the trial table (CSV + Markdown) and the best config as YAML.

Pure functions of plain rows (no Ray), so the table and the choice of the best trial are unit-tested.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmd_dist.config import Config, dump_yaml

COMPLETED, EARLY_STOPPED, NONFINITE, ERROR = "completed", "early-stopped", "non-finite loss", "error"


@dataclass
class TrialRow:
    """One trial as the table shows it; ``score`` is the metric the search maximised."""

    trial: str
    params: dict[str, Any]
    peer_acc: dict[str, float | None]
    mean_acc: float | None
    score: float | None
    epochs: int
    status: str
    splits_read: str = ""
    run_dir: str = ""
    error: str = field(default="", repr=False)


def trial_status(metrics: dict[str, Any], max_epochs: int, error: bool) -> str:
    """completed / early-stopped (ASHA ended it before max_epochs) / non-finite loss / error."""
    if error:
        return ERROR
    if metrics.get("nonfinite"):
        return NONFINITE
    return COMPLETED if int(metrics.get("epoch", 0)) >= max_epochs else EARLY_STOPPED


def make_row(
    trial: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
    peers: list[str],
    score_key: str,
    max_epochs: int,
    error: str = "",
    run_dir: str = "",
) -> TrialRow:
    """A table row from a trial's last reported metrics (the per-epoch flat dict the engine reports)."""
    split = "val"
    return TrialRow(
        trial=trial,
        params=dict(params),
        peer_acc={p: _num(metrics.get(f"{p}/{split}_acc")) for p in peers},
        mean_acc=_num(metrics.get(f"{split}_acc")),
        score=_num(metrics.get(score_key)),
        epochs=int(metrics.get("epoch", 0) or 0),
        status=trial_status(metrics, max_epochs, bool(error)),
        splits_read=str(metrics.get("splits_read", "")),
        run_dir=run_dir,
        error=error,
    )


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def ranked(rows: list[TrialRow]) -> list[TrialRow]:
    """Best first: trials that ran every epoch, then the rest, each by score (no score last)."""
    return sorted(rows, key=lambda r: (r.status != COMPLETED, r.score is None, -(r.score or 0.0), r.trial))


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The trial to retrain: the highest score among trials that ran all epochs.

    An early-stopped trial's score is from an earlier epoch, not comparable with a finished one's, so
    it only wins when no trial finished (then the best score of any trial is the best guess).
    """
    scored = [r for r in ranked(rows) if r.score is not None]
    return scored[0] if scored else None


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _columns(rows: list[TrialRow], keys: list[str], peers: list[str]) -> tuple[list[str], list[list[Any]]]:
    header = ["trial", *keys, *(f"{p} val acc" for p in peers), "mean val acc", "score", "epochs", "status"]
    body = []
    for r in rows:
        body.append(
            [
                r.trial,
                *(r.params.get(k) for k in keys),
                *(r.peer_acc.get(p) for p in peers),
                r.mean_acc,
                r.score,
                r.epochs,
                r.status,
            ]
        )
    return header, body


def write_tables(rows: list[TrialRow], keys: list[str], peers: list[str], out_dir: Path) -> tuple[Path, Path]:
    """``results.csv`` (full precision, run folders, splits read, errors) and ``results.md`` (for reading)."""
    rows = ranked(rows)
    header, body = _columns(rows, keys, peers)
    csv_path = out_dir / "results.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*header, "splits_read", "run_dir", "error"])
        for r, line in zip(rows, body, strict=True):
            w.writerow([*("" if v is None else v for v in line), r.splits_read, r.run_dir, r.error])
    md_path = out_dir / "results.md"
    md_path.write_text(markdown_table(header, body))
    return csv_path, md_path


def markdown_table(header: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def write_best_yaml(cfg: Config, row: TrialRow, metric: str, search_dir: Path, shown: str | None = None) -> Path:
    """The best config, final protocol, loadable by ``cmd-dist train`` (a header says where it came from).

    ``shown``: the search folder as the user names it, when ``search_dir`` is a staging folder (a URI search)."""
    path = search_dir / "best.yaml"
    where = shown.rstrip("/") if shown else str(search_dir)
    values = ", ".join(f"{k}={_fmt(v)}" for k, v in row.params.items())
    header = (
        f"# Best of the search in {where}: trial {row.trial}, validation accuracy {_fmt(row.score)}% "
        f"({metric}) after {row.epochs} epochs,\n# with {values}.\n"
        f"# Retrain on all training data and test: cmd-dist train {where}/best.yaml\n"
    )
    path.write_text(header + dump_yaml(cfg))
    return path


def labels_distilled(metrics_jsonl: bytes | None) -> float | None:
    """The labels a trial's peers distilled from each other over all its epochs (metrics.jsonl's
    ``distilled_from``); None when the file is missing or holds no epoch."""
    total, rows = 0.0, 0
    for line in (metrics_jsonl or b"").decode(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short
        if isinstance(row, dict) and isinstance(row.get("distilled_from"), dict):
            rows += 1
            total += sum(v for v in row["distilled_from"].values() if isinstance(v, (int, float)) and v == v)
    return total if rows else None
