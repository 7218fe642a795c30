"""``cmd-dist report RUN_OR_SEARCH_DIR... [--out DIR]``: ``report.md`` and PNG figures from finished runs.

Reads only what runs leave behind (``config.yaml``, ``metrics.jsonl``, ``summary.json``; a search folder's
``summary.json`` / ``results.csv``), never Ray or a checkpoint. Every number in the report is a number of
``summary.json`` (or of ``metrics.jsonl`` for per-epoch curves), formatted with two decimals. Figures:

- accuracy per epoch for every peer, with the paper's number (the config's ``paper`` section) as a line;
- accuracy on the noisy vs. the clean training labels (memorisation: the first rises while the second falls);
- knowledge exchanged per epoch in both directions (paper Figure 2), with the threshold chi;
- the self-KD trust eps and Mconf's certainty r per epoch (Eq. 5-6), and the training entropies' quantiles
  against chi (Eq. 12: a prediction is distilled when its entropy is below chi), when the run logged them;
- several runs: one table (config, paper, final, best, delta, wall time) and one overlaid accuracy plot;
- a search folder: the trials' table and the search's score (``--metric``) against every searched value.

The paper's number is shown only beside a run that reproduces its cell: a finished run tested on the test split
(protocol ``final``) whose dataset, noise (kind and rate, or CIFAR-N label set), method, architectures and epochs
are those of a shipped config in ``configs/`` with the same ``paper`` section; otherwise the report says why it
is omitted. A folder that cannot be read (an unfinished search, a cut ``metrics.jsonl``, no summary yet where
one is needed) is skipped and listed with the reason; the report fails only when nothing can be reported.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cmd_dist.config import Config, ConfigError, from_dict, load_config
from cmd_dist.train.monitor import ENTROPY_QUANTILE_KEYS


class ReportError(ConfigError):
    """A folder that holds no run or search, or an output folder that cannot be written (one line, exit 2)."""


#: Where the shipped experiment configs live (each names its paper cell): the checkout's ``configs/``.
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


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
        return [_float(r.get(key, r.get(f"{peer}/{key}"))) for r in self.rows.get(peer, [])]

    def final(self) -> float | None:
        """Final mean accuracy over peers: summary.json's ``mean_<split>_acc``; else the last epoch's."""
        if self.summary:
            return _num(self.summary.get(f"mean_{self.split}_acc"))
        last = [self.series(p, "eval_acc")[-1:] for p in self.peers]
        values = [v[0] for v in last if v and math.isfinite(v[0])]
        return sum(values) / len(values) if values and len(values) == len(self.peers) else None

    def best(self) -> float | None:
        """Mean over peers of each peer's best epoch (summary.json's ``best_<split>_acc``)."""
        if not self.summary:
            return None
        values = [_num(p.get(f"best_{self.split}_acc")) for p in self.summary["peers"]]
        return None if any(v is None for v in values) or not values else sum(values) / len(values)

    @functools.cached_property
    def paper_omitted(self) -> str:
        """Why the paper's number is not shown beside this run ("" when it is, or when the config gives none)."""
        return paper_omission(self)

    @property
    def has_paper(self) -> bool:
        paper = self.cfg.paper
        return (paper.value is not None or bool(paper.peers)) and not self.paper_omitted

    def delta(self) -> float | None:
        final, paper = self.final(), self.cfg.paper.value
        return None if final is None or paper is None or not self.has_paper else final - paper

    def peer_final(self, k: int) -> float | None:
        return _num(self.summary["peers"][k].get(f"{self.split}_acc")) if self.summary else None

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


# ----------------------------------------------------------------------------- reading


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _float(value: Any) -> float:
    v = _num(value)
    return math.nan if v is None else v


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def is_search(path: Path) -> bool:
    return (path / "search.yaml").is_file()


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot be read as JSON ({str(e).splitlines()[0]})") from None


def load_run(path: Path, label: str = "") -> Run:
    try:
        cfg = from_dict(yaml.safe_load((path / "config.yaml").read_text()) or {})
    except (ConfigError, yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path / 'config.yaml'}: not a cmd-dist config ({str(e).splitlines()[0]})") from None
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
    return run


def load_search(path: Path) -> Search:
    try:
        state = yaml.safe_load((path / "search.yaml").read_text()) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path / 'search.yaml'}: cannot be read ({str(e).splitlines()[0]})") from None
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
    def num(s: str) -> float | None:
        try:
            return float(s)
        except (TypeError, ValueError):
            return None

    return {
        "trial": row["trial"],
        "params": {k: num(row.get(k, "")) if num(row.get(k, "")) is not None else row.get(k) for k in keys},
        "peer_acc": {p: num(row.get(f"{p} val acc", "")) for p in peers},
        "mean_acc": num(row.get("mean val acc", "")),
        "score": num(row.get("score", "")),
        "epochs": int(num(row.get("epochs", "")) or 0),
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


# ----------------------------------------------------------------------------- the paper's cell


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
    realised = _num((summary or {}).get("noise_rate"))
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


def paper_omission(run: Run) -> str:
    """Why the paper's number is not comparable with this run ("" when it is, or when the config names none)."""
    cfg, s = run.cfg, run.summary
    if cfg.paper.value is None and not cfg.paper.peers:
        return ""
    if run.split != "test":
        return f"{run.split} accuracy (protocol {cfg.data.protocol}); the paper reports test accuracy"
    if s is None:
        return "the run has not finished (no summary.json)"
    if s.get("epochs_run") != s.get("epochs"):
        return f"the run stopped after {s.get('epochs_run')} of {s.get('epochs')} epochs"
    cells = [c for _, c in shipped_configs() if c.paper == cfg.paper]
    if not cells:
        return f"no config in configs/ gives {paper_text(cfg)}, so the run's setting cannot be checked against it"
    reasons = [_cell_mismatch(cfg, cell) for cell in cells]
    return "" if "" in reasons else reasons[0]


# ----------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


#: Line styles combined with tab10's ten colours: 40 runs before a style repeats (dashed is the paper's line).
LINESTYLES = ("-", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))


def run_style(i: int) -> tuple[str, Any]:
    """(colour, line style) of the i-th run in the overlaid plot: distinct for the first 40 runs."""
    return f"C{i % 10}", LINESTYLES[(i // 10) % len(LINESTYLES)]


def _paper_line(ax: Any, run: Run, color: str = "black", prefix: str = "paper") -> None:
    if run.cfg.paper.value is not None and run.has_paper:
        text = f"{prefix}, {run.cfg.paper.table}: {run.cfg.paper.value:.2f}%"
        ax.axhline(run.cfg.paper.value, color=color, linestyle="--", linewidth=1, label=text)


def fig_accuracy(run: Run, out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, peer in enumerate(run.peers):
        ax.plot(run.epochs(peer), run.series(peer, "eval_acc"), marker=".", color=f"C{i}", label=f"{peer}")
        if run.cfg.paper.peers and run.has_paper:
            value = run.cfg.paper.peers[i]
            ax.axhline(value, color=f"C{i}", linestyle="--", linewidth=1, label=f"paper {peer}: {value:.2f}%")
    _paper_line(ax, run)
    ax.set(xlabel="epoch", ylabel=f"{run.split} accuracy (%)", title=f"{run.label}: {run.split} accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def fig_memorisation(run: Run, out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, peer in enumerate(run.peers):
        color = f"C{i}"
        ax.plot(run.epochs(peer), run.series(peer, "train_acc_clean"), color=color, label=f"{peer} clean labels")
        ax.plot(
            run.epochs(peer), run.series(peer, "train_acc_noisy"), color=color, linestyle=":", label=f"{peer} noisy"
        )
    ax.set(
        xlabel="epoch",
        ylabel="training accuracy (%)",
        title=f"{run.label}: fit to the noisy vs. the clean training labels",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def exchange_series(run: Run) -> dict[str, tuple[list[int], list[float]]]:
    """``"<from> -> <to>"``: labels peer <to> distilled from peer <from>, per epoch (paper Figure 2)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for peer in run.peers:
        for row in run.rows.get(peer, []):
            for source, count in (row.get("distilled_from") or {}).items():
                epochs, counts = out.setdefault(f"{source} -> {peer}", ([], []))
                epochs.append(row["epoch"])
                counts.append(_float(count))
    return out


def train_labels(run: Run) -> int | None:
    """The training labels per epoch the distilled counts are out of (metrics.jsonl's ``train_labels``)."""
    counts = {r.get("train_labels") for rows in run.rows.values() for r in rows}
    counts = {c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c > 0}
    return counts.pop() if len(counts) == 1 else None


def exchange_ylabel(run: Run) -> str:
    n = train_labels(run)
    return "labels distilled per epoch" + (f"\n(out of {n:,} training labels per epoch)" if n else "")


def fig_exchange(run: Run, out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, (epochs, counts) in exchange_series(run).items():
        ax.plot(epochs, counts, marker=".", label=name)
    ax.set(xlabel="epoch", ylabel=exchange_ylabel(run), title=f"{run.label}: knowledge exchanged")
    ax.grid(alpha=0.3)
    first = run.peers[0]
    chi = run.series(first, "chi")
    if any(math.isfinite(c) for c in chi):
        ax2 = ax.twinx()
        ax2.plot(run.epochs(first), chi, color="black", linestyle="--", label="chi")
        ax2.set_ylabel("chi (entropy threshold, Eq. 12)")
        lines, labels = ax.get_legend_handles_labels()
        lines2, labels2 = ax2.get_legend_handles_labels()
        ax.legend(lines + lines2, labels + labels2, fontsize=8)
    else:
        ax.legend(fontsize=8)
    return _save(fig, out)


def fig_selfkd(run: Run, out: Path) -> Path:
    plt = _pyplot()
    has_r = any(math.isfinite(v) for p in run.peers for v in run.series(p, "certainty_r"))
    fig, axes = plt.subplots(1, 2 if has_r else 1, figsize=(9.6 if has_r else 6.4, 4), squeeze=False)
    for peer in run.peers:
        axes[0][0].plot(run.epochs(peer), run.series(peer, "epsilon_mean"), marker=".", label=peer)
    axes[0][0].set(xlabel="epoch", ylabel="mean eps", title=f"self-KD trust eps ({run.cfg.method.self_kd})")
    axes[0][0].grid(alpha=0.3)
    axes[0][0].legend()
    if has_r:
        for peer in run.peers:
            axes[0][1].plot(run.epochs(peer), run.series(peer, "certainty_r"), marker=".", label=peer)
        axes[0][1].set(xlabel="epoch", ylabel="r", title="Mconf's model certainty r (Eq. 6)")
        axes[0][1].grid(alpha=0.3)
        axes[0][1].legend()
    return _save(fig, out)


def has_entropy(run: Run) -> bool:
    return any(math.isfinite(v) for p in run.peers for q in ENTROPY_QUANTILE_KEYS for v in run.series(p, q))


def fig_entropy(run: Run, out: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(run.peers), figsize=(4.8 * len(run.peers), 4), squeeze=False, sharey=True)
    for ax, peer in zip(axes[0], run.peers, strict=True):
        epochs = run.epochs(peer)
        q = {name: run.series(peer, name) for name in ENTROPY_QUANTILE_KEYS}
        ax.fill_between(epochs, q["entropy_q10"], q["entropy_q90"], alpha=0.2, color="C0", label="q10-q90")
        ax.fill_between(epochs, q["entropy_q25"], q["entropy_q75"], alpha=0.35, color="C0", label="q25-q75")
        ax.plot(epochs, q["entropy_q50"], color="C0", label="median")
        ax.plot(epochs, run.series(peer, "chi"), color="black", linestyle="--", label="chi")
        ax.set(xlabel="epoch", title=f"{peer}: entropy of its training predictions")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("entropy (nats)")
    return _save(fig, out)


def fig_runs(runs: list[Run], out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.5))
    for i, run in enumerate(runs):
        color, style = run_style(i)
        series = [run.series(p, "eval_acc") for p in run.peers]
        n = min(len(s) for s in series) if series else 0
        mean = [sum(s[e] for s in series) / len(series) for e in range(n)]
        ax.plot(run.epochs(run.peers[0])[:n], mean, color=color, linestyle=style, label=f"{run.label} ({run.split})")
        _paper_line(ax, run, color=color, prefix=f"paper for {run.label}")
    ax.set(xlabel="epoch", ylabel="accuracy, mean over peers (%)", title="runs (dashed: the paper's number)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(runs) > 8 else 1)
    return _save(fig, out)


def trial_score(trial: dict[str, Any], search: Search) -> float | None:
    """The trial's value of the search's ``--metric`` (its ``score``; the mean for searches that lack it)."""
    score = _num(trial.get("score"))
    if score is None and search.metric == "mean":
        score = _num(trial.get("mean_acc"))
    return score


def fig_search(search: Search, out: Path) -> Path:
    plt = _pyplot()
    keys = [k for k in search.keys if any(_num(t["params"].get(k)) is not None for t in search.trials)] or ["trial"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False, sharey=True)
    statuses = sorted({t["status"] for t in search.trials})
    for ax, key in zip(axes[0], keys, strict=True):
        for j, status in enumerate(statuses):
            pts = [
                (_num(t["params"].get(key)) if key != "trial" else i, trial_score(t, search))
                for i, t in enumerate(search.trials)
                if t["status"] == status
            ]
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            ax.scatter([x for x, _ in pts], [y for _, y in pts], color=f"C{j}", label=status)
        ax.set(xlabel=key, title=f"score vs {key.split('.')[-1]}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"score: validation accuracy, {search.metric_text} (%)")
    axes[0][0].legend(fontsize=8)
    return _save(fig, out)


# ----------------------------------------------------------------------------- markdown


def pct(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else f"{v:.2f}"


def signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def describe(cfg: Config, summary: dict[str, Any] | None = None) -> str:
    m = cfg.method
    text = f"{m.objective.upper() if m.objective != 'cmd' else m.knowledge.upper()} + {m.self_kd}"
    if m.objective == "cmd" and m.knowledge in ("cmd-s", "cmd-p"):
        text += f", eta {m.eta:g}, b2 {m.b2:g}"
    text += f", b1 {m.b1:g}; {cfg.data.dataset}, {noise_text(cfg, summary)}; "
    text += " + ".join(p.arch for p in cfg.peers)
    return text


def paper_text(cfg: Config) -> str:
    """The paper's number(s): the mean (``paper.value``) or one per peer (``paper.peers``, Table 6)."""
    if cfg.paper.value is not None:
        return f"{cfg.paper.value:.2f} ({cfg.paper.table})"
    if cfg.paper.peers:
        return " / ".join(f"{v:.2f}" for v in cfg.paper.peers) + f" ({cfg.paper.table})"
    return "-"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in body]


def _rel(path: Path, out: Path) -> str:
    return os.path.relpath(path, out)


def run_section(run: Run, out: Path, stem: str, level: str = "##") -> list[str]:
    """The run's table (summary.json's numbers) and its figures, written under ``out`` as ``<stem>_*.png``."""
    split = run.split
    lines = [f"{level} {run.label}", "", f"`{run.path}`: {describe(run.cfg, run.summary)}.", ""]
    lines += [note for n in run.notes for note in (n, "")]
    s = run.summary
    if s is None:
        lines += ["No summary.json: the run has not finished; the figures show the epochs logged so far.", ""]
    else:
        lines.append(
            f"Epochs {s['epochs_run']}/{s['epochs']}, protocol {s['protocol']} ({split} split), "
            f"wall time {s['wall_s']:.1f} s" + (f"; stopped: {s['stopped']}" if s.get("stopped") else "") + "."
        )
        lines.append("")
        header = ["peer", "arch", f"final {split} acc (%)", f"best {split} acc (%)", "best epoch"]
        header += ["train acc, noisy labels (%)", "train acc, clean labels (%)"]
        per_peer_paper = list(run.cfg.paper.peers) if run.has_paper else []
        if per_peer_paper:
            header += ["paper (%)", "delta"]
        body = []
        for k, p in enumerate(s["peers"]):
            row = [
                p["name"],
                p["arch"],
                pct(p.get(f"{split}_acc")),
                pct(p.get(f"best_{split}_acc")),
                str(p.get("best_epoch", "-")),
                pct(p.get("train_acc_noisy")),
                pct(p.get("train_acc_clean")),
            ]
            if per_peer_paper:
                final = run.peer_final(k)
                row += [pct(per_peer_paper[k]), signed(None if final is None else final - per_peer_paper[k])]
            body.append(row)
        lines += _table(header, body)
        lines.append("")
        if run.has_paper:
            paper = f"; paper: {paper_text(run.cfg)}; delta: {run.delta_text()}."
        elif run.paper_omitted:
            paper = f"; the paper's {paper_text(run.cfg)} is not shown: {run.paper_omitted}."
        else:
            paper = "."
        lines.append(f"Mean final {split} accuracy: **{pct(run.final())}%**{paper}")
        lines.append("")
    if not any(run.rows.get(p) for p in run.peers):
        return lines + ["metrics.jsonl holds no epoch yet: no figures.", ""]
    figures = [
        (fig_accuracy, "accuracy", f"{split} accuracy per epoch"),
        (fig_memorisation, "memorisation", "accuracy on the noisy vs. the clean training labels"),
        (fig_exchange, "exchange", "labels distilled per epoch, both directions, and chi (paper Figure 2)"),
        (fig_selfkd, "selfkd", "self-KD trust eps and Mconf's certainty r"),
    ]
    if has_entropy(run):
        figures.append((fig_entropy, "entropy", "entropy quantiles of the training predictions against chi"))
    for draw, name, caption in figures:
        path = draw(run, out / f"{stem}_{name}.png")
        lines += [f"![{caption}]({_rel(path, out)})", ""]
    if not has_entropy(run):
        lines += ["(No entropy quantiles in metrics.jsonl: this run predates them.)", ""]
    return lines


def runs_table(runs: list[Run]) -> list[str]:
    header = ["run", "config", "split", "paper (%)", "final (%)", "best (%)", "delta", "wall time (s)"]
    body = [
        [
            r.label,
            describe(r.cfg, r.summary),
            r.split,
            paper_text(r.cfg) if r.has_paper else ("omitted (see below)" if r.paper_omitted else "-"),
            pct(r.final()),
            pct(r.best()),
            r.delta_text(),
            "-" if not r.summary else f"{r.summary['wall_s']:.1f}",
        ]
        for r in runs
    ]
    return _table(header, body)


def search_section(search: Search, out: Path, stem: str) -> list[str]:
    lines = [f"## Search {search.path.name}", "", f"`{search.path}`: {len(search.trials)} trials.", ""]
    header = ["trial", *search.keys, *(f"{p} val (%)" for p in search.peers), "mean val (%)", "epochs", "status"]
    body = []
    for t in search.trials:
        params = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (t["params"].get(k) for k in search.keys)]
        peers = [pct(t["peer_acc"].get(p)) for p in search.peers]
        body.append([t["trial"], *params, *peers, pct(t.get("mean_acc")), str(t.get("epochs")), t.get("status", "")])
    lines += _table(header, body) + [""]
    if search.best:
        lines += [
            f"Best trial: {search.best['trial']}, score {pct(search.best.get('score'))}% (validation accuracy, "
            f"{search.metric_text}: the search's --metric {search.metric}); mean over peers "
            f"{pct(search.best.get('mean_acc'))}%.",
            "",
        ]
    if search.trials:
        path = fig_search(search, out / f"{stem}_values.png")
        lines += [f"![the score ({search.metric_text}) against the searched values]({_rel(path, out)})", ""]
    if search.final is not None:
        lines += run_section(search.final, out, f"{stem}_final", level="###")
    return lines


def _writable(out: Path) -> Path:
    out = Path(out).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".cmd-dist-report-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ReportError(
            f"--out {out}: cannot write there ({reason}); pass --out DIR, a folder you can write"
        ) from None
    return out


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def write_report(paths: list[Path], out: Path | None = None, log: Any = _warn) -> Path:
    """Write ``report.md`` and its PNGs into ``out`` (default: ``<folder>/report`` for one folder, else
    ``report`` beside the folders); returns the report's path. Folders that cannot be read are listed in the
    report (and passed to ``log``, one line each); ReportError when none can be reported."""
    paths = [Path(p).expanduser().resolve() for p in paths]
    found = collect(paths)
    runs, searches = found.runs, found.searches
    if not runs and not searches:
        first = found.skipped[0].reason if found.skipped else "no run or search"
        more = f" (and {len(found.skipped) - 1} more skipped)" if len(found.skipped) > 1 else ""
        raise ReportError(f"nothing to report: {first}{more}")
    if out is None:
        base = paths[0] if len(paths) == 1 else Path(os.path.commonpath([str(p.parent) for p in paths]))
        out = base / "report"
    out = _writable(out)
    _disambiguate(runs)
    lines = ["# cmd-dist report", ""]
    if len(runs) > 1:
        lines += ["## Runs", ""] + runs_table(runs) + [""]
        lines += [
            "split: the split the accuracies are measured on (val: a search's validation split); final: mean final "
            "accuracy over peers (summary.json); best: mean of each peer's best epoch; delta: final minus the "
            "paper's number, only where the run reproduces the paper's cell.",
            "",
        ]
        omitted = [r for r in runs if r.paper_omitted]
        if omitted:
            lines += ["The paper's number is not shown beside:", ""]
            lines += [f"- {r.label}: {r.paper_omitted}." for r in omitted] + [""]
        lines += [f"![accuracy of every run]({_rel(fig_runs(runs, out / 'runs_accuracy.png'), out)})", ""]
    for i, run in enumerate(runs):
        lines += run_section(run, out, _stem(run, i))
    for i, search in enumerate(searches):
        lines += search_section(search, out, f"search{i}_{_safe(search.path.name)}")
    if found.skipped:
        lines += ["## Skipped", "", "These folders could not be reported:", ""]
        lines += [f"- `{s.path}`: {s.reason}" for s in found.skipped] + [""]
        for s in found.skipped:
            if log is not None:
                log(f"cmd-dist: skipped {s.path}: {s.reason}")
    report = out / "report.md"
    try:
        report.write_text("\n".join(lines))
    except OSError as e:
        raise ReportError(f"--out {out}: cannot write report.md there ({e.strerror or e})") from None
    return report


def _disambiguate(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.path.parent.name}/{run.path.name}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _stem(run: Run, i: int) -> str:
    return f"run{i}_{_safe(run.path.name)}"
