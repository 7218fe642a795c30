"""Reading what runs and searches leave behind: a run folder (``config.yaml``, ``metrics.jsonl``,
``summary.json``), a search folder (``search.yaml``, ``summary.json`` or ``results.csv``, ``final/``), and folders
of them. Never Ray or a checkpoint. A folder that cannot be read is skipped with its reason (:class:`Skipped`).
"""

from __future__ import annotations

import csv
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cmd_dist.config import Config, ConfigError, from_dict
from cmd_dist.errors import first_line
from cmd_dist.report.numbers import as_float, num, signed
from cmd_dist.report.paper import paper_omission

#: Where ``cmd-dist label-issues RUN`` writes its summary by default (read when present).
LABEL_ISSUES = "label_issues/label_issues.json"


class ReportError(ConfigError):
    """A folder that holds no run or search, or an output folder that cannot be written (one line, exit 2)."""


@dataclass
class Run:
    """One run folder: its config, per-epoch rows by peer, and summary.json (None while it runs)."""

    path: Path
    cfg: Config
    rows: dict[str, list[dict[str, Any]]]
    summary: dict[str, Any] | None
    label: str = ""
    #: What the report left out of this run's files (e.g. a cut last line of metrics.jsonl).
    notes: list[str] = field(default_factory=list)
    #: ``label_issues/label_issues.json`` when ``cmd-dist label-issues RUN`` wrote one (issue 21), else None.
    label_issues: dict[str, Any] | None = None

    @property
    def peers(self) -> list[str]:
        return [p.name for p in self.cfg.peers]

    @property
    def split(self) -> str:
        if self.summary:
            return self.summary["eval_split"]
        return "test" if self.cfg.data.protocol == "final" else "val"

    def epochs(self, peer: str) -> list[int]:
        return [r["epoch"] for r in self.rows.get(peer, [])]

    def series(self, peer: str, key: str) -> list[float]:
        return [as_float(r.get(key, r.get(f"{peer}/{key}"))) for r in self.rows.get(peer, [])]

    def final(self) -> float | None:
        """Final mean accuracy over peers: summary.json's ``mean_<split>_acc``; else the last epoch's."""
        if self.summary:
            return num(self.summary.get(f"mean_{self.split}_acc"))
        last = [self.series(p, "eval_acc")[-1:] for p in self.peers]
        values = [v[0] for v in last if v and math.isfinite(v[0])]
        return sum(values) / len(values) if values and len(values) == len(self.peers) else None

    def best(self) -> float | None:
        """Mean over peers of each peer's best epoch (summary.json's ``best_<split>_acc``)."""
        if not self.summary:
            return None
        values = [num(p.get(f"best_{self.split}_acc")) for p in self.summary["peers"]]
        return None if any(v is None for v in values) or not values else sum(values) / len(values)

    @functools.cached_property
    def paper_omitted(self) -> str:
        """Why the paper's number is not shown beside this run ("" when it is, or when the config gives none)."""
        return paper_omission(self.cfg, self.split, self.summary)

    @property
    def has_paper(self) -> bool:
        paper = self.cfg.paper
        return (paper.value is not None or bool(paper.peers)) and not self.paper_omitted

    def delta(self) -> float | None:
        final, paper = self.final(), self.cfg.paper.value
        return None if final is None or paper is None or not self.has_paper else final - paper

    def peer_final(self, k: int) -> float | None:
        return num(self.summary["peers"][k].get(f"{self.split}_acc")) if self.summary else None

    def delta_text(self) -> str:
        """Final minus the paper: of the mean (``paper.value``), or per peer (``paper.peers``, Table 6)."""
        if self.cfg.paper.value is not None or not self.cfg.paper.peers or not self.has_paper:
            return signed(self.delta())
        finals = [self.peer_final(k) for k in range(len(self.peers))]
        return " / ".join(signed(None if f is None else f - v) for f, v in zip(finals, self.cfg.paper.peers))


@dataclass
class Search:
    path: Path
    trials: list[dict[str, Any]]
    keys: list[str]
    peers: list[str]
    best: dict[str, Any] | None
    final: Run | None
    #: The search's score (``tune --metric``): ``mean`` over peers, or one peer's name.
    metric: str = "mean"

    @property
    def metric_text(self) -> str:
        return "mean over peers" if self.metric == "mean" else self.metric


@dataclass
class Skipped:
    """A folder the report could not read, and why (listed in report.md and on the console)."""

    path: Path
    reason: str


@dataclass
class Collected:
    runs: list[Run] = field(default_factory=list)
    searches: list[Search] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def is_search(path: Path) -> bool:
    return (path / "search.yaml").is_file()


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot be read as JSON ({first_line(e)})") from None


def load_run(path: Path, label: str = "") -> Run:
    try:
        cfg = from_dict(yaml.safe_load((path / "config.yaml").read_text()) or {})
    except (ConfigError, yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path / 'config.yaml'}: not a cmd-dist config ({first_line(e)})") from None
    rows: dict[str, list[dict[str, Any]]] = {p.name: [] for p in cfg.peers}
    try:
        lines = (path / "metrics.jsonl").read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path / 'metrics.jsonl'}: cannot be read ({e})") from None
    notes: list[str] = []
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    for i, (n, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(numbered) - 1:  # the run was stopped while writing its last line: the rest is whole
                notes.append(f"metrics.jsonl line {n} is cut short (the run stopped while writing it): left out.")
                continue
            raise ReportError(f"{path / 'metrics.jsonl'} line {n}: not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise ReportError(f"{path / 'metrics.jsonl'} line {n}: not a cmd-dist metrics row (no epoch)")
        rows.setdefault(str(row.get("peer", "")), []).append(row)
    for peer_rows in rows.values():
        peer_rows.sort(key=lambda r: r["epoch"])
    summary_path = path / "summary.json"
    summary = _json_file(summary_path) if summary_path.is_file() else None
    if summary is not None and not (isinstance(summary, dict) and isinstance(summary.get("peers"), list)):
        raise ReportError(f"{summary_path}: not a cmd-dist run summary")
    run = Run(path, cfg, rows, summary, label or path.name)
    run.notes = notes
    found = path / LABEL_ISSUES
    if found.is_file():
        issues = _json_file(found)
        if isinstance(issues, dict) and isinstance(issues.get("num_train"), int):
            run.label_issues = issues
        else:
            run.notes.append(f"{LABEL_ISSUES} is not what cmd-dist label-issues writes: left out.")
    return run


def load_search(path: Path) -> Search:
    try:
        state = yaml.safe_load((path / "search.yaml").read_text()) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path / 'search.yaml'}: cannot be read ({first_line(e)})") from None
    if not isinstance(state, dict):
        raise ReportError(f"{path / 'search.yaml'}: not a cmd-dist search")
    keys = list((state.get("space") or {}).get("space", {}) or {})
    peers = [p.get("name") or f"peer{i}" for i, p in enumerate((state.get("config") or {}).get("peers", []))]
    metric = str((state.get("options") or {}).get("metric") or "mean")
    summary_path, csv_path = path / "summary.json", path / "results.csv"
    best = None
    if summary_path.is_file():
        summary = _json_file(summary_path)
        trials, best = summary.get("trials", []), summary.get("best")
    elif csv_path.is_file():
        try:
            with csv_path.open(newline="") as f:
                trials = [_csv_trial(r, keys, peers) for r in csv.DictReader(f)]
        except (OSError, UnicodeDecodeError, KeyError, csv.Error) as e:
            raise ReportError(f"{csv_path}: not a cmd-dist results table ({e})") from None
    else:
        raise ReportError(
            f"{path}: the search has no results yet (no summary.json or results.csv); "
            f"finish it with 'cmd-dist tune --resume {path}'"
        )
    final = load_run(path / "final", "final retrain") if is_run(path / "final") else None
    return Search(path, trials, keys, peers, best, final, metric)


def _csv_trial(row: dict[str, str], keys: list[str], peers: list[str]) -> dict[str, Any]:
    def number(s: str) -> float | None:
        try:
            return float(s)
        except (TypeError, ValueError):
            return None

    return {
        "trial": row["trial"],
        "params": {k: number(row.get(k, "")) if number(row.get(k, "")) is not None else row.get(k) for k in keys},
        "peer_acc": {p: number(row.get(f"{p} val acc", "")) for p in peers},
        "mean_acc": number(row.get("mean val acc", "")),
        "score": number(row.get("score", "")),
        "epochs": int(number(row.get("epochs", "")) or 0),
        "status": row.get("status", ""),
        "run_dir": row.get("run_dir", ""),
    }


def _is_candidate(path: Path) -> bool:
    """A folder cmd-dist wrote (a run, even one stopped before its first epoch, or a search)."""
    return is_search(path) or (path / "config.yaml").is_file()


def _load_one(path: Path, found: Collected) -> None:
    try:
        if is_search(path):
            found.searches.append(load_search(path))
        elif is_run(path):
            found.runs.append(load_run(path))
        else:
            raise ReportError(f"{path}: no metrics.jsonl yet (the run stopped before its first epoch ended)")
    except ReportError as e:
        reason = str(e)
        found.skipped.append(Skipped(path, reason.removeprefix(f"{path}: ")))


def collect(paths: list[Path]) -> Collected:
    """Run folders, search folders, and folders of runs (``runs/table1/``: every run folder inside). A folder
    that cannot be read is skipped with its reason; a path that is no folder, or holds nothing of cmd-dist's,
    is an error."""
    found = Collected()
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path}: no such folder; pass run folders (with metrics.jsonl) or search folders")
        if _is_candidate(path):
            _load_one(path, found)
            continue
        inside = sorted(p for p in path.iterdir() if p.is_dir() and _is_candidate(p))
        if not inside:
            raise ReportError(
                f"{path}: holds no cmd-dist run (config.yaml + metrics.jsonl) or search (search.yaml); "
                f"pass a folder written by cmd-dist train or cmd-dist tune"
            )
        for sub in inside:
            _load_one(sub, found)
    return found
