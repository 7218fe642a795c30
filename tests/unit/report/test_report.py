"""`cmd-dist report`: report.md's numbers are summary.json's, every figure is a PNG that opens; the config's
`paper` section (validated) gives the line to compare with, shown only beside a run of the paper's cell (else the
report says why); unreadable folders are skipped and listed; flags and overrides parse in any order.

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

from cmd_dist.config import ConfigError, dump_yaml, load_config
from tests.conftest import REPO

DEMO = os.path.join(REPO, "configs", "demo.yaml")
TABLE1 = os.path.join(REPO, "configs", "table1", "cmdp_mconf.yaml")  # Table 1's CMD-P + Mconf cell: 69.09%
EPOCHS = 2


def _train(out: Path, name: str, overrides: list[str]) -> Path:
    from cmd_dist.launch import job
    from cmd_dist.launch.summary import summarize
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
    run_dir = job.resolve_run_dir(cfg)
    metrics, _ = run_local(cfg, run_dir)
    summarize(cfg, metrics, run_dir, wall_s=12.34)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/cmdp (paper line: Table 1's 69.09%) and runs/zero (knowledge zero, per-peer paper numbers)."""
    out = tmp_path_factory.mktemp("runs")
    _train(out, "cmdp", ["paper.table=Table 1", "paper.value=69.09"])
    _train(out, "zero", ["method.knowledge=zero", "paper.table=Table 6", "paper.peers=[50.63, 44.06]"])
    return out


def _as_cell(run: Path, dest: Path, cell: str = TABLE1, overrides: tuple[str, ...] = (), **summary) -> Path:
    """A copy of a real (digits) run folder dressed as a finished run of a paper cell: the cell's resolved config
    (plus overrides) and summary.json's epochs set to the cell's; the metrics stay the tiny run's."""
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoint_*", "best_checkpoint", "tb", "report"))
    cfg = load_config(cell, list(overrides))
    (dest / "config.yaml").write_text(dump_yaml(cfg))
    data = json.loads((dest / "summary.json").read_text())
    data.update({"epochs": cfg.train.epochs, "epochs_run": cfg.train.epochs, "protocol": cfg.data.protocol, **summary})
    (dest / "summary.json").write_text(json.dumps(data))
    return dest


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
    assert f"**{mean:.2f}%**" in text and "wall time 12.3 s" in text and f"Epochs {EPOCHS}/{EPOCHS}" in text
    # A digits run that names Table 1's number: not the paper's cell, so no number, no delta, and the reason.
    assert "the paper's 69.09 (Table 1) is not shown: dataset digits, the paper's cell cifar100" in text
    assert f"{mean - 69.09:+.2f}" not in text and "delta" not in text

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
    assert table[0] == ["run", "config", "split", "paper (%)", "final (%)", "best (%)", "delta", "wall time (s)"]
    by_run = {row[0]: row for row in table[1:]}
    assert set(by_run) == {"cmdp", "zero"}
    for name in ("cmdp", "zero"):
        summary = json.loads((runs / name / "summary.json").read_text())
        row = by_run[name]
        assert row[2] == "test" and row[4] == f"{summary['mean_test_acc']:.2f}"
        best = sum(p["best_test_acc"] for p in summary["peers"]) / len(summary["peers"])
        assert row[5] == f"{best:.2f}" and row[7] == f"{summary['wall_s']:.1f}"
        # digits runs naming Table 1's / Table 6's numbers: not those cells, so neither number nor delta
        assert row[3] == "omitted (see below)" and row[6] == "-"
    assert "- cmdp: dataset digits, the paper's cell cifar100." in text
    assert "- zero: dataset digits, the paper's cell cifar100." in text
    assert "ZERO + mconf" in by_run["zero"][1] and "CMD-P + mconf" in by_run["cmdp"][1]
    assert "digits, symmetric 40% (realised " in by_run["cmdp"][1]
    pngs = _pngs_open(report)
    assert (tmp_path / "rep" / "runs_accuracy.png") in pngs
    assert len(pngs) == 1 + 2 * 5  # the overlay, then each run's five figures


def test_paper_number_beside_a_run_of_its_cell_only(runs, tmp_path):
    """The paper's number and the delta appear for a finished run of the cell (test split, the cell's dataset,
    noise, method, architectures, epochs); every other run gets one short reason instead."""
    from cmd_dist.report import write_report

    folder = tmp_path / "runs"
    cell = _as_cell(runs / "cmdp", folder / "cell")
    _as_cell(runs / "cmdp", folder / "arch", overrides=("peers.0.arch=resnet18",))
    _as_cell(runs / "cmdp", folder / "noise", overrides=("noise.rate=0.2",))
    _as_cell(runs / "cmdp", folder / "method", overrides=("method.self_kd=proselflc",))
    _as_cell(runs / "cmdp", folder / "short", overrides=("train.epochs=50",))
    _as_cell(runs / "cmdp", folder / "stopped", epochs_run=7)
    search = json.loads((runs / "cmdp" / "summary.json").read_text())
    for p in search["peers"]:
        p["val_acc"], p["best_val_acc"], p["test_acc"], p["best_test_acc"] = (
            p["test_acc"],
            p["best_test_acc"],
            None,
            None,
        )
    _as_cell(
        runs / "cmdp", folder / "search", overrides=("data.protocol=search",), eval_split="val",
        peers=search["peers"], mean_val_acc=search["mean_test_acc"], mean_test_acc=None,
    )  # fmt: skip
    per_peer = _as_cell(runs / "zero", folder / "t6", cell=os.path.join(REPO, "configs", "table6", "ce.yaml"))
    report = write_report([folder], tmp_path / "rep")
    text = report.read_text()
    rows = {row[0]: row for row in _md_tables(text)[0][1:]}
    mean = json.loads((cell / "summary.json").read_text())["mean_test_acc"]
    assert rows["cell"][3] == "69.09 (Table 1)" and rows["cell"][6] == f"{mean - 69.09:+.2f}"
    t6 = json.loads((per_peer / "summary.json").read_text())["peers"]
    assert rows["t6"][3] == "50.63 / 44.06 (Table 6)"
    assert rows["t6"][6] == f"{t6[0]['test_acc'] - 50.63:+.2f} / {t6[1]['test_acc'] - 44.06:+.2f}"
    reasons = {
        "arch": "architectures resnet18 + resnet34, the paper's cell resnet34 + resnet34",
        "noise": "noise symmetric 0.2, the paper's cell symmetric 0.4",
        "method": "method cmd/cmd-p + proselflc, the paper's cell cmd/cmd-p + mconf",
        "short": "epochs 50, the paper's cell 100",
        "stopped": "the run stopped after 7 of 100 epochs",
        "search": "val accuracy (protocol search); the paper reports test accuracy",
    }
    for name, reason in reasons.items():
        assert rows[name][3] == "omitted (see below)" and rows[name][6] == "-", rows[name]
        assert f"- {name}: {reason}." in text
    assert rows["search"][2] == "val"
    assert text.count("; paper: 69.09 (Table 1); delta: ") == 1  # the cell's own section, nobody else's


def test_runs_plot_has_distinct_styles_and_the_papers_line_in_its_legend(runs, tmp_path, monkeypatch):
    from cmd_dist import report as rep
    from cmd_dist.report import plots

    assert len({rep.run_style(i) for i in range(40)}) == 40
    cell = rep.load_run(_as_cell(runs / "cmdp", tmp_path / "cell"))
    others = [rep.load_run(runs / "cmdp", f"run{i}") for i in range(11)]
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    rep.fig_runs([cell, *others], tmp_path / "runs.png")
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "paper for cell, Table 1: 69.09%" in labels
    assert not any(label.startswith("paper for run") for label in labels)  # digits runs: no paper line
    styles = [(line.get_color(), str(line.get_linestyle())) for line in ax.get_lines() if line.get_linestyle() != "--"]
    assert len(styles) == 12 and len(set(styles)) == 12


def test_exchange_plot_says_what_the_counts_are_out_of(runs, tmp_path, monkeypatch):
    from cmd_dist import report as rep
    from cmd_dist.report import plots

    run = rep.load_run(runs / "cmdp")
    assert {r["train_labels"] for rows in run.rows.values() for r in rows} == {600}  # data.train_subset=600
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    rep.fig_exchange(run, tmp_path / "x.png")
    assert "out of 600 training labels per epoch" in figures[0].axes[0].get_ylabel()


def test_noise_is_the_realised_rate_and_human_labels_name_their_set():
    from cmd_dist.report import noise_text

    cifar100n = load_config(os.path.join(REPO, "configs", "cifarn", "cifar100n_noisy_fine.yaml"))
    assert noise_text(cifar100n, {"noise_rate": 0.4017}) == "human (noisy_fine, realised 40.17%)"
    assert noise_text(cifar100n, None) == "human (noisy_fine, realised rate unknown)"
    coarse = load_config(DEMO, ["data.dataset=cifar100", "noise.kind=human", "noise.label_set=noisy_coarse"])
    assert noise_text(coarse, {"noise_rate": 0.264}) == "human (noisy_coarse, realised 26.40%)"
    assert noise_text(load_config(DEMO), {"noise_rate": 0.4089}) == "symmetric 40% (realised 40.89%)"


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.dataset=cifar100", "noise.kind=human", "noise.label_set=noisy_coarse", "noise.rate=0.4"],
        ["noise.kind=none", "noise.rate=0.2"],
    ],
)
def test_noise_rate_without_synthetic_noise_is_a_config_error(overrides, tmp_path):
    with pytest.raises(ConfigError, match=r"^noise\.rate: .* is not used with noise\.kind=(human|none)"):
        load_config(DEMO, overrides)
    as_file = tmp_path / "c.yaml"  # the same in a config file
    as_file.write_text(yaml.safe_dump({"noise": {"kind": "none", "rate": 0.3}}))
    with pytest.raises(ConfigError, match=r"^noise\.rate: 0\.3 is not used with noise\.kind=none"):
        load_config(as_file)
    # Without noise.rate it loads, and its resolved config (rate 0: no synthetic noise) loads again.
    cfg = load_config(DEMO, [o for o in overrides if not o.startswith("noise.rate")])
    assert cfg.noise.rate == 0.0
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_config(again) == cfg
    # A run folder's config.yaml from before (every noise key, the unused rate 0.4) still loads for --resume.
    older = cfg.to_dict()
    older["noise"]["rate"] = 0.4
    again.write_text(yaml.safe_dump(older))
    assert load_config(again) == cfg


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


def test_search_report_text_and_plot_show_the_searchs_metric(tmp_path, monkeypatch):
    """`tune --metric peerA`: the best trial's score, the plotted points and their axis are peerA's validation
    accuracy, the number the search ranked by (not the peers' mean)."""
    from cmd_dist import report as rep
    from cmd_dist.report import plots

    search = tmp_path / "search"
    search.mkdir()
    keys = ["method.eta"]
    state = {"config": load_config(DEMO).to_dict(), "space": {"space": {"method.eta": {}}}, "options": {}}
    state["options"]["metric"] = "peerA"
    (search / "search.yaml").write_text(yaml.safe_dump(state))
    trials = [
        {"trial": "t1", "params": {"method.eta": 2.0}, "peer_acc": {"peerA": 44.44, "peerB": 63.16}, "mean_acc": 53.8,
         "score": 44.44, "epochs": 4, "status": "completed"},
        {"trial": "t2", "params": {"method.eta": 6.0}, "peer_acc": {"peerA": 40.0, "peerB": 70.0}, "mean_acc": 55.0,
         "score": 40.0, "epochs": 4, "status": "completed"},
    ]  # fmt: skip
    (search / "summary.json").write_text(json.dumps({"trials": trials, "best": trials[0]}))
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    text = rep.write_report([search], tmp_path / "rep").read_text()
    assert "Best trial: t1, score 44.44% (validation accuracy, peerA: the search's --metric peerA)" in text
    ax = figures[0].axes[0]
    points = sorted(tuple(xy) for c in ax.collections for xy in c.get_offsets().tolist())
    assert points == [(2.0, 44.44), (6.0, 40.0)] and "peerA" in ax.get_ylabel()
    assert keys == rep.load_search(search).keys


def test_unfinished_folders_are_skipped_and_listed_the_rest_reported(runs, tmp_path, capsys):
    """`cmd-dist report runs/` with an interrupted search, a refused tune's leftover, a run stopped before its
    first epoch and a run whose metrics.jsonl's last line is cut: the readable runs are reported (the cut line
    left out, and said), each skipped folder is listed with its reason in report.md and on one console line."""
    import shutil

    from cmd_dist.cli import main

    folder = tmp_path / "runs"
    shutil.copytree(runs / "cmdp", folder / "good", ignore=shutil.ignore_patterns("checkpoint_*", "best_checkpoint"))
    shutil.copytree(runs / "zero", folder / "cut", ignore=shutil.ignore_patterns("checkpoint_*", "best_checkpoint"))
    (folder / "cut" / "summary.json").unlink()  # killed mid-run: no summary, the last line half written
    lines = (folder / "cut" / "metrics.jsonl").read_text().splitlines()
    (folder / "cut" / "metrics.jsonl").write_text("\n".join(lines[:-1] + [lines[-1][:40]]))
    for name in ("interrupted", "refused"):  # search.yaml (and .lock) but no results yet
        (folder / name).mkdir()
        (folder / name / "search.yaml").write_text(yaml.safe_dump({"config": {}, "space": {"space": {}}}))
    (folder / "refused" / ".lock").write_text("")
    (folder / "early").mkdir()
    (folder / "early" / "config.yaml").write_text((runs / "cmdp" / "config.yaml").read_text())
    assert main(["report", str(folder), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert {row[0] for row in _md_tables(text)[0][1:]} == {"good", "cut"}
    assert f"metrics.jsonl line {len(lines)} is cut short" in text
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    skipped = {"interrupted": "no results yet", "refused": "no results yet", "early": "no metrics.jsonl yet"}
    assert len(err) == len(skipped)
    for name, reason in skipped.items():
        assert any(line.startswith(f"cmd-dist: skipped {folder / name}: ") and reason in line for line in err), err
        assert any(line.startswith(f"- `{folder / name}`: ") and reason in line for line in text.splitlines())
    _pngs_open(tmp_path / "rep" / "report.md")


def test_nothing_reportable_is_one_line_exit_2(tmp_path, capsys):
    from cmd_dist.cli import main

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "search.yaml").write_text(yaml.safe_dump({"config": {}}))
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cmd-dist: error:")]
    assert e.value.code == 2 and len(err) == 1 and "nothing to report" in err[0] and "no results yet" in err[0]


def test_report_out_that_cannot_be_written_is_one_line_exit_2(runs, tmp_path, capsys):
    from cmd_dist.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where a folder should be: no writing inside it, even as root
    with pytest.raises(SystemExit) as e:
        main(["report", str(runs / "cmdp"), "--out", str(blocker / "rep")])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"cmd-dist: error: --out {blocker / 'rep'}: cannot write there")


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
