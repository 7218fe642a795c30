"""``report.md``: the text of the report, written with its figures into one folder.

Every number is a number of ``summary.json`` (or of ``metrics.jsonl`` for per-epoch curves), formatted with two
decimals; the paper's number only beside a run of its cell (:mod:`cmd_dist.report.paper`), else the reason it is
omitted. Folders that cannot be read are listed under "Skipped"; the report fails only when nothing can be reported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from cmd_dist.config import Config
from cmd_dist.report.numbers import pct, signed
from cmd_dist.report.paper import noise_text, paper_text
from cmd_dist.report.plots import (
    fig_accuracy,
    fig_entropy,
    fig_exchange,
    fig_label_scores,
    fig_memorisation,
    fig_runs,
    fig_search,
    fig_selfkd,
    has_entropy,
)
from cmd_dist.report.runs import ReportError, Run, Search, collect


def describe(cfg: Config, summary: dict[str, Any] | None = None) -> str:
    m = cfg.method
    text = f"{m.objective.upper() if m.objective != 'cmd' else m.knowledge.upper()} + {m.self_kd}"
    if m.objective == "cmd" and m.knowledge in ("cmd-s", "cmd-p"):
        text += f", eta {m.eta:g}, b2 {m.b2:g}"
    text += f", b1 {m.b1:g}; {cfg.data.dataset}, {noise_text(cfg, summary)}; "
    text += " + ".join(p.arch for p in cfg.peers)
    return text


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in body]


def _rel(path: Path, out: Path) -> str:
    return os.path.relpath(path, out)


def run_section(run: Run, out: Path, stem: str, level: str = "##") -> list[str]:
    """The run's table (summary.json's numbers) and its figures, written under ``out`` as ``<stem>_*.png``."""
    lines = [f"{level} {run.label}", "", f"`{run.path}`: {describe(run.cfg, run.summary)}.", ""]
    lines += [note for n in run.notes for note in (n, "")]
    if run.summary is None:
        lines += ["No summary.json: the run has not finished; the figures show the epochs logged so far.", ""]
    else:
        lines += _summary_lines(run, run.summary)
    if run.label_issues is not None:
        lines += _label_issue_lines(run, out, stem)
    if not any(run.rows.get(p) for p in run.peers):
        return lines + ["metrics.jsonl holds no epoch yet: no figures.", ""]
    return lines + _figure_lines(run, out, stem)


def _label_issue_lines(run: Run, out: Path, stem: str) -> list[str]:
    """``cmd-dist label-issues``' summary: flagged count, and where clean labels are known the detection figures
    and the score's histogram for clean vs wrong labels."""
    li = run.label_issues
    lines = [
        f"Label issues ({li['checkpoint']}, epoch {li['epoch']}): {li['flagged']:,} of {li['num_train']:,} training "
        f"labels flagged (estimated noise rate {100 * li['estimated_noise_rate']:.2f}%).",
        "",
    ]
    if li.get("warning"):  # more than half flagged: the peers may not have learned enough (infer/labels.py)
        lines += [f"Note: {li['warning']}.", ""]
    m = li.get("metrics")
    if not m:
        return lines + ["No clean labels known: no detection figures.", ""]
    lines += _table(
        ["", "precision", "recall", "F1", "AUROC", "average precision"],
        [
            ["flag", *(f"{m[f'flag_{k}']:.3f}" for k in ("precision", "recall", "f1", "auroc")), ""],
            [
                f"score, top {m['noisy']:,}",
                *(f"{m[f'score_top_{k}']:.3f}" for k in ("precision", "recall", "f1")),
                f"{m['score_auroc']:.3f}",
                f"{m['score_average_precision']:.3f}",
            ],
        ],
    )
    path = fig_label_scores(run, out / f"{stem}_label_scores.png")
    return lines + ["", f"![label-issue score, clean vs wrong labels]({_rel(path, out)})", ""]


def _summary_lines(run: Run, s: dict[str, Any]) -> list[str]:
    """A finished run: epochs and wall time, the per-peer table, the mean final accuracy beside the paper's."""
    split = run.split
    lines = [
        f"Epochs {s['epochs_run']}/{s['epochs']}, protocol {s['protocol']} ({split} split), "
        f"wall time {s['wall_s']:.1f} s" + (f"; stopped: {s['stopped']}" if s.get("stopped") else "") + ".",
        "",
    ]
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
    return lines + [f"Mean final {split} accuracy: **{pct(run.final())}%**{paper}", ""]


def _figure_lines(run: Run, out: Path, stem: str) -> list[str]:
    """The run's figures drawn under ``out`` and linked from report.md."""
    figures = [
        (fig_accuracy, "accuracy", f"{run.split} accuracy per epoch"),
        (fig_memorisation, "memorisation", "accuracy on the noisy vs. the clean training labels"),
        (fig_exchange, "exchange", "labels distilled per epoch, both directions, and chi (paper Figure 2)"),
        (fig_selfkd, "selfkd", "self-KD trust eps and Mconf's certainty r"),
    ]
    if has_entropy(run):
        figures.append((fig_entropy, "entropy", "entropy quantiles of the training predictions against chi"))
    lines = []
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
