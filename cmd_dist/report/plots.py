"""The report's figures (matplotlib, PNG files only): accuracy per epoch with the paper's line, memorisation
(noisy vs. clean training labels), knowledge exchanged per epoch (paper Figure 2) with chi, the self-KD trust eps
and Mconf's certainty r, entropy quantiles against chi, several runs overlaid, and a search's score against every
searched value. matplotlib is imported on the first figure only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cmd_dist.report.numbers import as_float, num
from cmd_dist.report.runs import Run, Search
from cmd_dist.train.monitor import ENTROPY_QUANTILE_KEYS


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
                counts.append(as_float(count))
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
    score = num(trial.get("score"))
    if score is None and search.metric == "mean":
        score = num(trial.get("mean_acc"))
    return score


def fig_search(search: Search, out: Path) -> Path:
    plt = _pyplot()
    keys = [k for k in search.keys if any(num(t["params"].get(k)) is not None for t in search.trials)] or ["trial"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False, sharey=True)
    statuses = sorted({t["status"] for t in search.trials})
    for ax, key in zip(axes[0], keys, strict=True):
        for j, status in enumerate(statuses):
            pts = [
                (num(t["params"].get(key)) if key != "trial" else i, trial_score(t, search))
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


def fig_label_scores(run: Run, out: Path) -> Path:
    """Histogram of ``cmd-dist label-issues``' score for the clean and the wrong labels (clean labels known)."""
    plt = _pyplot()
    hist = run.label_issues["score_histogram"]
    edges = hist["edges"]
    width = [b - a for a, b in zip(edges, edges[1:])]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.bar(edges[:-1], hist["clean"], width=width, align="edge", alpha=0.6, color="C0", label="clean label")
    ax.bar(edges[:-1], hist["noisy"], width=width, align="edge", alpha=0.6, color="C3", label="wrong label")
    ax.set_xlabel("label-issue score (1 = most likely wrong)")
    ax.set_ylabel("training samples")
    ax.legend()
    return _save(fig, out)
