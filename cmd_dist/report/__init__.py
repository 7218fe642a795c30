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
- a search folder: the trials' table and the search's score (``--metric``) against every searched value;
- after ``cmd-dist label-issues RUN``: its ``label_issues/label_issues.json`` (issue 21), the labels flagged and, where
  the clean labels are known, the detection figures and a histogram of the score for clean vs. wrong labels.

The paper's number is shown only beside a run that reproduces its cell: a finished run tested on the test split
(protocol ``final``) whose dataset, noise (kind and rate, or CIFAR-N label set), method, architectures and epochs
are those of a shipped config in ``configs/`` with the same ``paper`` section; otherwise the report says why it
is omitted. A folder that cannot be read (an unfinished search, a cut ``metrics.jsonl``, no summary yet where
one is needed) is skipped and listed with the reason; the report fails only when nothing can be reported.

The package: :mod:`~cmd_dist.report.runs` reads run and search folders, :mod:`~cmd_dist.report.paper` matches a
run with its paper cell, :mod:`~cmd_dist.report.plots` draws the figures (matplotlib), and
:mod:`~cmd_dist.report.markdown` writes ``report.md``. It imports the config and the monitor's metric names, never
Ray: the CLI's ``report`` command runs without it.
"""

from __future__ import annotations

from cmd_dist.report.markdown import write_report
from cmd_dist.report.paper import noise_text, paper_omission, paper_text, shipped_configs
from cmd_dist.report.plots import fig_exchange, fig_runs, run_style
from cmd_dist.report.runs import Collected, ReportError, Run, Search, Skipped, collect, load_run, load_search

__all__ = [
    "Collected",
    "ReportError",
    "Run",
    "Search",
    "Skipped",
    "collect",
    "fig_exchange",
    "fig_runs",
    "load_run",
    "load_search",
    "noise_text",
    "paper_omission",
    "paper_text",
    "run_style",
    "shipped_configs",
    "write_report",
]
