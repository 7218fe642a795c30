"""`cmd-dist report`: report.md's numbers are summary.json's, every figure is a PNG that opens; the config's
`paper` section (validated) gives the line to compare with; flags and overrides parse in any order.

Runs are real but small and in this process (`run_local`, digits, 2 epochs), summarised by the launcher's own
`summarize`, so the report reads exactly what `cmd-dist train` leaves behind.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from cmd_dist.config import ConfigError, load_config
from tests.conftest import REPO

DEMO = os.path.join(REPO, "configs", "demo.yaml")
EPOCHS = 2


def _train(out: Path, name: str, overrides: list[str]) -> Path:
    from cmd_dist.launch import launcher
    from cmd_dist.train.local import run_local

    cfg = load_config(
        DEMO,
        [
            f"train.epochs={EPOCHS}",
            "train.log_every=0",
            "data.train_subset=600",
            "data.test_subset=300",
            f"output_dir={out}",
            f"run_name={name}",
            *overrides,
        ],
    )
    run_dir = launcher.resolve_run_dir(cfg)
    metrics, _ = run_local(cfg, run_dir)
    launcher.summarize(cfg, metrics, run_dir, wall_s=12.34)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/cmdp (paper line: Table 1's 69.09%) and runs/zero (knowledge zero, per-peer paper numbers)."""
    out = tmp_path_factory.mktemp("runs")
    _train(out, "cmdp", ["paper.table=Table 1", "paper.value=69.09"])
    _train(out, "zero", ["method.knowledge=zero", "paper.table=Table 6", "paper.peers=[50.63, 44.06]"])
    return out


def _md_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in the text as rows of cells (header first, separator dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def _pngs_open(report: Path) -> list[Path]:
    from PIL import Image

    paths = [report.parent / p for p in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report.read_text())]
    assert paths, "the report embeds no figure"
    for path in paths:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100, path
    return paths


def test_single_run_report_numbers_are_summary_json_and_figures_open(runs, tmp_path):
    from cmd_dist.cli import main

    run = runs / "cmdp"
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    report = tmp_path / "rep" / "report.md"
    text = report.read_text()
    summary = json.loads((run / "summary.json").read_text())

    peers_table = _md_tables(text)[0]
    header, body = peers_table[0], peers_table[1:]
    assert header[:3] == ["peer", "arch", "final test acc (%)"]
    assert len(body) == len(summary["peers"])
    for row, peer in zip(body, summary["peers"], strict=True):
        assert row[0] == peer["name"] and row[1] == peer["arch"]
        assert row[2] == f"{peer['test_acc']:.2f}" and row[3] == f"{peer['best_test_acc']:.2f}"
        assert row[4] == str(peer["best_epoch"])
        assert row[5] == f"{peer['train_acc_noisy']:.2f}" and row[6] == f"{peer['train_acc_clean']:.2f}"
    mean = summary["mean_test_acc"]
    assert f"**{mean:.2f}%**" in text and "69.09 (Table 1)" in text and f"{mean - 69.09:+.2f}" in text
    assert f"Epochs {EPOCHS}/{EPOCHS}" in text and "wall time 12.3 s" in text

    names = {p.name.split("_", 2)[-1] for p in _pngs_open(report)}
    assert names == {"accuracy.png", "memorisation.png", "exchange.png", "selfkd.png", "entropy.png"}
    assert "No entropy quantiles" not in text


def test_runs_without_entropy_quantiles_skip_that_figure(runs, tmp_path):
    """Runs from before the engine logged entropy quantiles: no entropy figure, the report says why. The
    quantiles may also come prefixed with the peer's name (``peerB/entropy_q10``): both spellings are read."""
    import shutil

    from cmd_dist.report import write_report

    old, prefixed = tmp_path / "old", tmp_path / "prefixed"
    for run in (old, prefixed):
        shutil.copytree(runs / "cmdp", run, ignore=shutil.ignore_patterns("checkpoint_*", "best_checkpoint", "tb"))
    rows = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    assert all("entropy_q50" in r for r in rows), "the engine no longer logs entropy quantiles"
    (old / "metrics.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if not k.startswith("entropy_")}) + "\n" for r in rows)
    )
    (prefixed / "metrics.jsonl").write_text(
        "".join(
            json.dumps({(f"{r['peer']}/{k}" if k.startswith("entropy_") else k): v for k, v in r.items()}) + "\n"
            for r in rows
        )
    )
    report = write_report([old], tmp_path / "rep_old")
    assert not any(p.name.endswith("_entropy.png") for p in _pngs_open(report))
    assert "No entropy quantiles" in report.read_text()
    report = write_report([prefixed], tmp_path / "rep_prefixed")
    assert any(p.name.endswith("_entropy.png") for p in _pngs_open(report))


def test_several_runs_table_and_overlaid_plot(runs, tmp_path):
    from cmd_dist.report import write_report

    report = write_report([runs], tmp_path / "rep")  # a folder of runs, as runs/table1/
    text = report.read_text()
    table = _md_tables(text)[0]
    assert table[0] == ["run", "config", "paper (%)", "final (%)", "best (%)", "delta", "wall time (s)"]
    by_run = {row[0]: row for row in table[1:]}
    assert set(by_run) == {"cmdp", "zero"}
    for name in ("cmdp", "zero"):
        summary = json.loads((runs / name / "summary.json").read_text())
        row = by_run[name]
        assert row[3] == f"{summary['mean_test_acc']:.2f}"
        best = sum(p["best_test_acc"] for p in summary["peers"]) / len(summary["peers"])
        assert row[4] == f"{best:.2f}" and row[6] == f"{summary['wall_s']:.1f}"
    assert by_run["cmdp"][2] == "69.09 (Table 1)"
    assert (
        by_run["cmdp"][5] == f"{json.loads((runs / 'cmdp' / 'summary.json').read_text())['mean_test_acc'] - 69.09:+.2f}"
    )
    assert by_run["zero"][2] == "50.63 / 44.06 (Table 6)"
    zero = json.loads((runs / "zero" / "summary.json").read_text())["peers"]
    assert by_run["zero"][5] == f"{zero[0]['test_acc'] - 50.63:+.2f} / {zero[1]['test_acc'] - 44.06:+.2f}"
    assert "ZERO + mconf" in by_run["zero"][1] and "CMD-P + mconf" in by_run["cmdp"][1]
    pngs = _pngs_open(report)
    assert (tmp_path / "rep" / "runs_accuracy.png") in pngs
    assert len(pngs) == 1 + 2 * 5  # the overlay, then each run's five figures


def test_search_folder_report_reads_the_trials_table(tmp_path):
    """A search folder as `cmd-dist tune` leaves it (search.yaml, results.csv, summary.json, final/)."""
    from cmd_dist.report import write_report
    from tune.results import make_row, write_tables

    search = tmp_path / "search"
    search.mkdir()
    base = load_config(DEMO).to_dict()
    keys = ["method.b1", "method.b2", "method.eta"]
    space = {k: {"distribution": "uniform", "low": 1, "high": 8} for k in keys}
    (search / "search.yaml").write_text(yaml.safe_dump({"config": base, "space": {"space": space}, "options": {}}))
    rows = [
        make_row(
            "t1",
            {"method.b1": 16.0, "method.b2": -8.0, "method.eta": 2.0},
            {"epoch": 4, "peerA/val_acc": 80.0, "peerB/val_acc": 70.0, "val_acc": 75.0},
            ["peerA", "peerB"],
            "val_acc",
            4,
        ),
        make_row(
            "t2",
            {"method.b1": 3.5, "method.b2": 2.25, "method.eta": 6.0},
            {"epoch": 1, "peerA/val_acc": 40.0, "peerB/val_acc": 42.5, "val_acc": 41.25},
            ["peerA", "peerB"],
            "val_acc",
            4,
        ),
    ]
    write_tables(rows, keys, ["peerA", "peerB"], search)  # no summary.json yet: the CSV is read
    report = write_report([search], tmp_path / "rep")
    table = _md_tables(report.read_text())[0]
    assert table[0] == ["trial", *keys, "peerA val (%)", "peerB val (%)", "mean val (%)", "epochs", "status"]
    assert table[1] == ["t1", "16", "-8", "2", "80.00", "70.00", "75.00", "4", "completed"]
    assert table[2] == ["t2", "3.5", "2.25", "6", "40.00", "42.50", "41.25", "1", "early-stopped"]
    assert [p.name for p in _pngs_open(report)] == ["search0_search_values.png"]


@pytest.mark.parametrize(
    "argv,words",
    [
        (["report", "/nonexistent/run"], ["/nonexistent/run", "no such folder"]),
        (["report", "{empty}"], ["holds no cmd-dist run"]),
    ],
)
def test_report_bad_folder_is_one_line_exit_2(tmp_path, capsys, argv, words):
    from cmd_dist.cli import main

    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("cmd-dist: error: ")
    assert all(w in err[0] for w in words), err


# ----------------------------------------------------------------------------- config: paper


def test_paper_section_defaults_to_no_number():
    paper = load_config(DEMO).paper
    assert (paper.table, paper.value, paper.peers) == ("", None, [])


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["paper.table=Table 1", "paper.value=120"], "paper.value"),
        (["paper.table=Table 1", "paper.value=-1"], "paper.value"),
        (["paper.value=69.09"], "paper.table"),
        (["paper.table=Table 6", "paper.peers=[50.0]"], "paper.peers"),
        (["paper.table=Table 6", "paper.peers=[50.0, 101.0]"], "paper.peers"),
        (["paper.peers=[50.0, 44.0]"], "paper.table"),
        (["paper.value=high"], "paper.value"),
        (["paper.bogus=1"], "paper.bogus"),
    ],
)
def test_bad_paper_section_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(DEMO, overrides)


# ----------------------------------------------------------------------------- arguments in any order


@pytest.mark.parametrize(
    "argv,config,overrides",
    [
        (["tune", "c.yaml", "--trials", "3", "a=1", "--no-asha", "b=2"], "c.yaml", ["a=1", "b=2"]),
        (["tune", "a=1", "--trials", "3", "c.yaml"], "c.yaml", ["a=1"]),
        (["train", "--verbose", "a=1", "c.yaml", "b=2", "--address", "h:1"], "c.yaml", ["a=1", "b=2"]),
        (["train", "c.yaml", "a=1"], "c.yaml", ["a=1"]),
        (["train", "--resume", "r", "train.epochs=4"], None, ["train.epochs=4"]),
    ],
)
def test_flags_and_overrides_in_any_order(argv, config, overrides):
    from cmd_dist.cli import build_parser, parse_args

    args = parse_args(build_parser(), argv)
    assert (args.config, args.overrides) == (config, overrides)
    if argv[0] == "tune":
        assert args.trials == 3


def test_unknown_flag_anywhere_is_an_error(capsys):
    from cmd_dist.cli import build_parser, parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(build_parser(), ["tune", "c.yaml", "a=1", "--trails", "3"])
    assert e.value.code == 2 and "--trails" in capsys.readouterr().err
