"""``cmd-dist tune``: search-space parsing, bad input (exit 2 before Ray), resources, tables; one real search.

The unit tests need no Ray. The integration test runs one real search on the shared local Ray cluster
(2 CPUs): 3 trials x 2 epochs on digits with ASHA, then the final retrain, in about 3 minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cmd_dist.config import ConfigError, load_config
from cmd_dist.data import resident as data_module
from cmd_dist.data.prepare import prepare_data
from tests.conftest import REPO
from tune.job import SearchOptions, metric_key
from tune.resources import plan_resources
from tune.results import COMPLETED, EARLY_STOPPED, ERROR, NONFINITE, best_row, make_row, write_best_yaml, write_tables
from tune.search import check_options, prepare
from tune.space import final_config, load_space, parse_param, parse_space, trial_config

DEMO = os.path.join(REPO, "configs", "demo.yaml")


@pytest.fixture(scope="module")
def base() -> dict:
    return load_config(DEMO).to_dict()


def _space(entries: dict, start: list | None = None) -> dict:
    raw: dict = {"space": entries}
    if start is not None:
        raw["start"] = start
    return raw


def _args(**kw) -> argparse.Namespace:
    from cmd_dist.cli import build_parser

    argv = ["tune", DEMO]
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------- search space


def test_default_space_covers_the_papers_ranges(base):
    space = load_space(None, base)
    by_key = {p.key: p for p in space.params}
    assert set(by_key) == {"method.b1", "method.b2", "method.eta"}
    b2, eta = by_key["method.b2"], by_key["method.eta"]
    assert b2.low < 0 < b2.high  # both signs: Fig. 4 sweeps b2 below and above 0
    assert eta.low <= 1 and eta.high >= 4  # Table 7: eta = 1 .. 4, and beyond
    assert space.start == [{"method.b1": 16, "method.b2": -8, "method.eta": 4}]


def test_each_distribution_parses_and_grids():
    u = parse_param("method.eta", {"distribution": "uniform", "low": 1, "high": 3}, "s")
    assert u.grid_values() == [1.0, 2.0, 3.0]
    lg = parse_param("train.lr", {"distribution": "loguniform", "low": 0.01, "high": 1.0}, "s")
    assert lg.grid_values() == pytest.approx([0.01, 0.1, 1.0])
    ri = parse_param("train.epochs", {"distribution": "randint", "low": 2, "high": 6, "grid": 5}, "s")
    assert ri.grid_values() == [2, 3, 4, 5, 6]  # both ends included
    ch = parse_param("peers.0.arch", {"distribution": "choice", "values": ["cnn_small", "resnet18"]}, "s")
    assert ch.grid_values() == ["cnn_small", "resnet18"] and ch.values == ("cnn_small", "resnet18")


def test_grid_is_the_product_of_the_grid_points(base):
    space = parse_space(
        _space(
            {
                "method.eta": {"distribution": "uniform", "low": 1, "high": 3},
                "train.lr": {"distribution": "choice", "values": [0.05, 0.1]},
            }
        ),
        base,
    )
    grid = space.grid()
    assert len(grid) == 6
    assert {"method.eta": 2.0, "train.lr": 0.1} in grid


def test_space_round_trips_through_its_saved_form(base):
    space = load_space(None, base)
    again = parse_space(yaml.safe_load(yaml.safe_dump(space.to_dict())), base)
    assert again.params == space.params and again.start == space.start


@pytest.mark.parametrize(
    "entries, start, words",
    [
        ({"method.foo": {"distribution": "uniform", "low": 1, "high": 2}}, None, ["'method.foo'", "not a key"]),
        ({"method": {"distribution": "uniform", "low": 1, "high": 2}}, None, ["'method'", "section"]),
        (
            {"data.protocol": {"distribution": "choice", "values": ["final"]}},
            None,
            ["data.protocol", "cannot be searched"],
        ),
        ({"ray.cpus_per_worker": {"distribution": "uniform", "low": 1, "high": 2}}, None, ["ray.cpus_per_worker"]),
        ({"method.eta": {"distribution": "normal", "low": 1, "high": 2}}, None, ["method.eta", "'normal'"]),
        ({"method.eta": {"distribution": "uniform", "low": 1, "hi": 2}}, None, ["method.eta", "unknown field 'hi'"]),
        ({"method.eta": {"distribution": "uniform", "low": 1}}, None, ["method.eta", "missing high"]),
        ({"method.eta": {"distribution": "uniform", "low": 4, "high": 2}}, None, ["method.eta", "inverted", "4"]),
        ({"method.eta": {"distribution": "uniform", "low": 2, "high": 2}}, None, ["method.eta", "empty"]),
        ({"method.eta": {"distribution": "loguniform", "low": 0, "high": 2}}, None, ["method.eta", "low > 0"]),
        ({"method.eta": {"distribution": "randint", "low": 1.5, "high": 4}}, None, ["method.eta", "integer"]),
        ({"method.eta": {"distribution": "choice", "values": []}}, None, ["method.eta", "non-empty"]),
        ({"method.eta": [1, 2]}, None, ["method.eta", "mapping"]),
        ({"method.eta": {"distribution": "choice", "values": [0, 2]}}, None, ["method.eta=0", "not allowed"]),
        ({"method.self_kd": {"distribution": "uniform", "low": 1, "high": 2}}, None, ["method.self_kd", "string"]),
        (
            {"method.eta": {"distribution": "uniform", "low": 1, "high": 2}},
            [{"method.b1": 3}],
            ["start[0]", "method.b1"],
        ),
        ({"method.eta": {"distribution": "uniform", "low": 1, "high": 2}}, [{}], ["start[0]"]),
        ({}, None, ["at least one"]),
    ],
)
def test_bad_space_is_one_line_naming_the_problem(base, entries, start, words):
    with pytest.raises(ConfigError) as err:
        parse_space(_space(entries, start), base)
    msg = str(err.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, msg


def test_unknown_section_and_bad_file(base, tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'spaces'"):
        parse_space({"spaces": {}}, base)
    with pytest.raises(ConfigError, match="not found"):
        load_space(tmp_path / "missing.yaml", base)
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(bad, base)


def test_b2_range_is_checked_against_the_knowledge_mode():
    static = load_config(DEMO, ["method.knowledge=cmd-s", "method.b2=0"]).to_dict()
    with pytest.raises(ConfigError, match="method.b2=-20 is not a valid config.*cmd-s"):
        load_space(None, static)


# ----------------------------------------------------------------------------- protocols


def test_trials_always_use_the_search_protocol_and_the_final_retrain_the_final_one(base):
    assert base["data"]["protocol"] == "final"  # the demo config is a final-protocol config
    cfg = trial_config(base, {"method.eta": 3.5, "method.b2": -2.0})
    assert cfg.data.protocol == "search" and cfg.method.eta == 3.5 and cfg.method.b2 == -2.0
    assert base["method"]["eta"] == 4.0  # the base is not modified (demo.yaml: eta 4)
    final = final_config(base, {"method.eta": 3.5})
    assert final.data.protocol == "final" and final.method.eta == 3.5


def test_numpy_samples_become_plain_numbers(base):
    import numpy as np

    cfg = trial_config(base, {"method.eta": np.float64(2.5), "train.epochs": np.int64(3)})
    assert type(cfg.method.eta) is float and type(cfg.train.epochs) is int


def test_a_trial_config_never_reads_the_test_split(base, monkeypatch):
    """What a trial's worker loads (prepare_data) with the trial config: the test file is never opened."""
    real = data_module.load_split

    def no_test(dataset, root, split, *args, **kwargs):
        if split == "test":
            raise AssertionError("the search read the test split")
        return real(dataset, root, split, *args, **kwargs)

    monkeypatch.setattr(data_module, "load_split", no_test)
    trial = prepare_data(trial_config(base, {}).data, load_config(DEMO).noise)
    assert trial.eval_split == "val" and trial.splits_read == ["train"]
    with pytest.raises(AssertionError, match="test split"):  # the guard does catch a test read
        prepare_data(final_config(base, {}).data, load_config(DEMO).noise)


# ----------------------------------------------------------------------------- options


def test_options_defaults_and_metric():
    cfg = load_config(DEMO)
    space = load_space(None, cfg.to_dict())
    opts = check_options(_args(), cfg, space)
    assert opts == SearchOptions(
        trials=16, algo="optuna", asha=True, grace_period=5, reduction_factor=3.0, metric="mean", max_concurrent=0
    )
    assert metric_key("mean") == "val_acc" and metric_key("peerB") == "peerB/val_acc"
    assert check_options(_args(metric="peerB"), cfg, space).metric == "peerB"
    assert check_options(_args(algo="grid"), cfg, space).trials == 27  # 3 points x 3 keys


@pytest.mark.parametrize(
    "flags, words",
    [
        ({"trials": 0}, ["--trials 0", ">= 1"]),
        ({"trials": -3}, ["--trials -3"]),
        ({"metric": "peerC"}, ["--metric 'peerC'", "peerA, peerB"]),
        ({"max_concurrent": -1}, ["--max-concurrent -1"]),
        ({"algo": "grid", "trials": 5}, ["--trials 5", "27 points"]),
        ({"grace_period": 20}, ["--grace-period 20", "train.epochs (20)"]),
        ({"grace_period": 0}, ["--grace-period 0"]),
        ({"reduction_factor": 1}, ["--reduction-factor 1"]),
    ],
)
def test_bad_options_are_one_line(flags, words):
    cfg = load_config(DEMO)
    with pytest.raises(ConfigError) as err:
        check_options(_args(**flags), cfg, load_space(None, cfg.to_dict()))
    for word in words:
        assert word in str(err.value), str(err.value)


def test_an_existing_search_folder_needs_resume(tmp_path):
    (tmp_path / "s" / "trials").mkdir(parents=True)
    from cmd_dist.cli import build_parser

    args = build_parser().parse_args(["tune", DEMO, f"output_dir={tmp_path}", "run_name=s"])
    with pytest.raises(ConfigError, match=re.escape(f"--resume {tmp_path / 's'}")):
        prepare(args)
    with pytest.raises(ConfigError, match="no search.yaml"):
        prepare(build_parser().parse_args(["tune", "--resume", str(tmp_path / "s")]))
    (tmp_path / "s" / "search.yaml").write_text("{}")
    with pytest.raises(ConfigError, match="drop CONFIG"):
        prepare(build_parser().parse_args(["tune", DEMO, "--resume", str(tmp_path / "s")]))
    with pytest.raises(ConfigError, match="drop --trials"):
        prepare(build_parser().parse_args(["tune", "--resume", str(tmp_path / "s"), "--trials", "4"]))
    with pytest.raises(ConfigError, match="incomplete or damaged"):
        prepare(build_parser().parse_args(["tune", "--resume", str(tmp_path / "s")]))


def test_a_search_behind_a_uri_needs_resume_resumes_from_it_and_is_locked(tmp_path, monkeypatch):
    """search.yaml on the URI (file://, through pyarrow) is what ``--resume URI`` continues; the URI's search
    lock refuses a second search of the same folder in one line and is gone once released."""
    from cmd_dist.cli import build_parser
    from cmd_dist.runs.lock import UriRunLock
    from tune.search import lock_search, save_state

    uri = f"file://{tmp_path}/runs"
    job = prepare(build_parser().parse_args(["tune", DEMO, f"output_dir={uri}", "run_name=s", "--trials", "3"]))
    save_state(job)
    assert (tmp_path / "runs" / "s" / "search.yaml").is_file()
    with pytest.raises(ConfigError, match=re.escape(f"continue it with --resume {uri}/s,")):
        prepare(build_parser().parse_args(["tune", DEMO, f"output_dir={uri}", "run_name=s"]))
    again = prepare(build_parser().parse_args(["tune", "--resume", f"{uri}/s/"]))
    assert again.resume and again.search_dir == f"{uri}/s" and again.base == job.base
    assert again.options == job.options and again.space.params == job.space.params
    with pytest.raises(ConfigError, match=re.escape(f"--resume {uri}/t: no search.yaml there")):
        prepare(build_parser().parse_args(["tune", "--resume", f"{uri}/t"]))
    (tmp_path / "runs" / "s" / "search.yaml").write_text("config: [")
    with pytest.raises(ConfigError, match=re.escape(f"{uri}/s/search.yaml is incomplete or damaged")):
        prepare(build_parser().parse_args(["tune", "--resume", f"{uri}/s"]))

    monkeypatch.setattr(UriRunLock, "SETTLE_S", 0.0)
    lock = lock_search(f"{uri}/s")
    with pytest.raises(ConfigError, match=re.escape(f"run folder {uri}/s is in use by another cmd-dist run")):
        lock_search(f"{uri}/s")
    lock.release()
    assert not (tmp_path / "runs" / "s" / ".lock").exists()
    lock_search(f"{uri}/s").release()


def test_trial_rows_and_a_finished_retrain_behind_a_uri(base, tmp_path, capsys):
    """A trial's run_dir is its folder on the URI (Tune's result.path has no scheme); a finished retrain on the
    URI is reused by a resumed search, not repeated."""
    from types import SimpleNamespace

    from tune import driver
    from tune.search import SearchJob

    uri = f"file://{tmp_path}/runs/s"
    job = SearchJob(uri, base, load_space(None, base), SearchOptions(trials=2))
    result = SimpleNamespace(
        metrics={"epoch": 20, "val_acc": 50.0, "peerA/val_acc": 40.0, "peerB/val_acc": 60.0},
        path=f"{tmp_path}/runs/s/trials/trial_ab12_00001",
        config={"method.b1": 3.0, "method.b2": 1.0, "method.eta": 2.0},
        error=None,
    )
    row = driver._row(result, job, base)
    assert row.run_dir == f"{uri}/trials/trial_ab12_00001" and row.trial == "ab12_00001" and row.status == COMPLETED
    cfg = final_config(base, {"method.b1": 3.0})
    done = {"epochs_run": cfg.train.epochs, "eval_split": "test", "mean_test_acc": 61.5, "peers": []}
    (tmp_path / "runs" / "s" / "final").mkdir(parents=True)
    (tmp_path / "runs" / "s" / "final" / "summary.json").write_text(json.dumps(done))
    assert driver.final_retrain(cfg, f"{uri}/final") == done  # no Ray: nothing is run again
    assert f"final retrain already done: {uri}/final/summary.json" in capsys.readouterr().out


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    code = (
        "import sys; from cmd_dist.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    assert 'ray' not in sys.modules, 'Ray was imported'\n    raise"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    "argv, words",
    [
        (["tune", DEMO, "--trials", "0"], ["--trials 0"]),
        (["tune", DEMO, "method.nope=1"], ["method.nope"]),
        (["tune", DEMO, "--space", "SPACE"], ["method.b2", "inverted"]),
        (["tune"], ["CONFIG"]),
        (["tune", DEMO, "output_dir=nosuch://b/runs"], ["'nosuch://b/runs' is not a filesystem URI", "s3://"]),
        (["tune", "--resume", "file:///nonexistent/s"], ["--resume file:///nonexistent/s: no search.yaml there"]),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_before_ray(tmp_path, argv, words):
    space = tmp_path / "space.yaml"
    space.write_text("space:\n  method.b2: {distribution: uniform, low: 5, high: -5}\n")
    out = _cli(*[str(space) if a == "SPACE" else a for a in argv], cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmd-dist: error: "), out.stderr
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing was started or written


# ----------------------------------------------------------------------------- resources


def test_resources_fit_a_2_cpu_machine():
    plan = plan_resources(2, {"CPU": 1.0}, {"CPU": 2.0}, requested=0, trials=16)
    assert plan.concurrency == 1 and plan.resources_per_worker == {"CPU": 1.0} and not plan.notes
    three = plan_resources(3, {"CPU": 1.0}, {"CPU": 2.0}, requested=0, trials=16)
    assert three.concurrency == 1 and three.resources_per_worker["CPU"] * 3 <= 2.0 and three.notes


def test_resources_scale_with_the_cluster():
    assert plan_resources(2, {"CPU": 1.0}, {"CPU": 16.0}, 0, trials=16).concurrency == 8
    assert plan_resources(2, {"CPU": 1.0}, {"CPU": 16.0}, 0, trials=3).concurrency == 3
    gpu = plan_resources(2, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 4.0}, 0, trials=16)
    assert gpu.concurrency == 2
    capped = plan_resources(2, {"CPU": 1.0}, {"CPU": 4.0}, requested=5, trials=16)
    assert capped.concurrency == 2 and "lowered to 2" in capped.notes[0]
    assert plan_resources(2, {"CPU": 1.0}, {"CPU": 4.0}, requested=1, trials=16).concurrency == 1
    with pytest.raises(ConfigError, match="GPU"):
        plan_resources(2, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 4.0}, 0, trials=4)


# ----------------------------------------------------------------------------- results


def _metrics(epoch: int, a: float, b: float, **extra) -> dict:
    return {
        "epoch": epoch,
        "val_acc": (a + b) / 2,
        "peerA/val_acc": a,
        "peerB/val_acc": b,
        "splits_read": "train",
        **extra,
    }


def test_rows_statuses_and_the_best_trial(tmp_path):
    peers = ["peerA", "peerB"]
    rows = [
        make_row("t0", {"method.eta": 2.0}, _metrics(4, 60, 70), peers, "val_acc", 4),
        make_row("t1", {"method.eta": 3.0}, _metrics(1, 80, 80), peers, "val_acc", 4),  # stopped: not comparable
        make_row("t2", {"method.eta": 4.0}, _metrics(4, 70, 72), peers, "val_acc", 4),
        make_row("t3", {"method.eta": 5.0}, {}, peers, "val_acc", 4, error="ValueError: boom"),
        make_row("t4", {"method.eta": 6.0}, _metrics(2, 9, 9, nonfinite="nan"), peers, "val_acc", 4),
    ]
    assert [r.status for r in rows] == [COMPLETED, EARLY_STOPPED, COMPLETED, ERROR, NONFINITE]
    assert best_row(rows).trial == "t2"
    assert best_row([rows[1], rows[3]]).trial == "t1"  # with no finished trial, the best score still wins
    assert best_row([rows[3]]) is None
    by_peer = make_row("t5", {}, _metrics(4, 90, 10), peers, "peerB/val_acc", 4)
    assert by_peer.score == 10

    csv_path, md_path = write_tables(rows, ["method.eta"], peers, tmp_path)
    table = list(csv.DictReader(csv_path.open()))
    assert [r["trial"] for r in table] == ["t2", "t0", "t1", "t4", "t3"]
    assert table[0]["peerA val acc"] == "70.0" and table[0]["status"] == COMPLETED
    assert table[-1]["error"] == "ValueError: boom"
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| trial | method.eta | peerA val acc | peerB val acc | mean val acc")
    assert len(md) == 2 + len(rows)


def test_best_yaml_is_a_train_config(base, tmp_path):
    row = make_row("t2", {"method.eta": 4.0, "method.b2": -6.0}, _metrics(4, 70, 72), ["peerA", "peerB"], "val_acc", 4)
    path = write_best_yaml(final_config(base, row.params), row, "val_acc", tmp_path)
    assert path.read_text().startswith(f"# Best of the search in {tmp_path}: trial t2")
    assert f"cmd-dist train {tmp_path}/best.yaml\n" in path.read_text()
    staged = write_best_yaml(final_config(base, row.params), row, "val_acc", tmp_path, shown="s3://b/runs/s")
    assert "cmd-dist train s3://b/runs/s/best.yaml\n" in staged.read_text() and str(tmp_path) not in staged.read_text()
    cfg = load_config(path)
    assert cfg.data.protocol == "final" and cfg.method.eta == 4.0 and cfg.method.b2 == -6.0


def test_optuna_starts_from_the_start_points_then_samples_the_ranges(base):
    from tune import driver
    from tune.search import SearchJob

    job = SearchJob(Path("/unused"), base, load_space(None, base), SearchOptions(trials=4))
    param_space, searcher, num_samples = driver.search_setup(job, seed=0)
    assert num_samples == 4 and type(searcher).__name__ == "OptunaSearch"
    assert searcher.set_search_properties("val_acc", "max", param_space)
    first = searcher.suggest("t0")
    assert first == {"method.b1": 16, "method.b2": -8, "method.eta": 4}
    for i in range(1, 4):
        s = searcher.suggest(f"t{i}")
        assert 1 <= s["method.b1"] <= 30 and -20 <= s["method.b2"] <= 20 and 1 <= s["method.eta"] <= 8
    grid_job = SearchJob(job.search_dir, base, job.space, SearchOptions(trials=27, algo="grid"))
    grid_space, grid_searcher, grid_samples = driver.search_setup(grid_job, seed=0)
    assert grid_searcher is None and grid_samples == 1 and grid_space["method.eta"] == {"grid_search": [1.0, 4.5, 8.0]}


def test_optuna_says_nothing_about_its_study(base, capfd):
    """Optuna's "A new study created in memory" INFO line stays off the console (issue 18.4)."""
    from tune import driver
    from tune.search import SearchJob

    job = SearchJob(Path("/unused"), base, load_space(None, base), SearchOptions(trials=2))
    param_space, searcher, _ = driver.search_setup(job, seed=0)
    searcher.set_search_properties("val_acc", "max", param_space)
    searcher.suggest("t0")
    assert "study created" not in capfd.readouterr().err


def test_gpus_per_trial_is_checked_against_the_cluster_and_names_the_flag():
    from tune.search import check_gpus_per_trial

    check_gpus_per_trial(None, [{"CPU": 2.0}])
    check_gpus_per_trial(0.5, [{"CPU": 2.0, "GPU": 1.0}])
    with pytest.raises(ConfigError, match=r"^--gpus-per-trial 1: the Ray cluster has no GPU; leave the flag out"):
        check_gpus_per_trial(1.0, [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 0.0}])
    with pytest.raises(ConfigError, match=r"^--gpus-per-trial 3: the Ray cluster has 2 GPU\(s\); use at most 2"):
        check_gpus_per_trial(3.0, [{"CPU": 2.0, "GPU": 1.0}, {"GPU": 1.0}])


def test_cli_gpus_per_trial_without_gpus_is_one_line_and_leaves_nothing(tmp_path):
    """On a CPU-only machine: one line naming --gpus-per-trial (not ray.use_gpu), exit 2, no search folder."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["tune", DEMO, "--gpus-per-trial", "1", f"output_dir={tmp_path}", "run_name=s"]
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run(
        [sys.executable, "-m", "cmd_dist.cli", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmd-dist: error: --gpus-per-trial 1: "), out.stderr
    assert "no GPU" in lines[0] and "ray.use_gpu" not in lines[0]
    assert list(tmp_path.iterdir()) == []  # no search.yaml, no .lock, no folder


def _distilled_rows(*per_epoch: list) -> list[str]:
    return [
        json.dumps({"epoch": e + 1, "peer": "peerA", "distilled_from": {"peerB": c}}) for e, c in enumerate(per_epoch)
    ]


def test_a_search_that_never_distilled_says_so(base, tmp_path):
    """eta and b2 act only through distilled labels: a search whose trials distilled none warns (issue 18.4)."""
    from tune.results import labels_distilled
    from tune.search import SearchJob, nothing_distilled_warning

    job = SearchJob(tmp_path, base, load_space(None, base), SearchOptions(trials=2))
    files = {
        "t0": "\n".join(_distilled_rows(0, 0, 0)).encode(),
        "t1": ("\n".join(_distilled_rows(0.0, 0.0)) + "\n{cut").encode(),
        "t2": None,  # a trial that never wrote metrics
    }
    rows = [make_row(t, {}, _metrics(1, 50, 50), ["peerA", "peerB"], "val_acc", 3, run_dir=t) for t in files]
    warning = nothing_distilled_warning(job, rows, read=lambda run_dir, name: files[run_dir])
    assert warning.startswith("cmd-dist: warning: no trial distilled a single label")
    assert "method.eta and method.b2" in warning and "train.epochs" in warning and "\n" not in warning
    files["t1"] = "\n".join(_distilled_rows(0, 12)).encode()
    assert nothing_distilled_warning(job, rows, read=lambda run_dir, name: files[run_dir]) is None
    assert labels_distilled(files["t1"]) == 12 and labels_distilled(None) is None
    # a search that varies neither eta nor b2 has nothing to warn about
    only_lr = SearchJob(
        tmp_path,
        base,
        parse_space(_space({"train.lr": {"distribution": "choice", "values": [0.1, 0.2]}}), base),
        job.options,
    )
    files["t1"] = files["t0"]
    assert nothing_distilled_warning(only_lr, rows, read=lambda run_dir, name: files[run_dir]) is None


# ----------------------------------------------------------------------------- one real search

GOOD = {"method.b1": 16, "method.b2": -4, "method.eta": 2, "train.lr": 0.05}
# lr=1e-4 barely moves in one epoch, so ASHA (rung at epoch 1, keep the best half) stops these two
# behind the good first trial whatever the other values: the early stop is deterministic.
SLOW = [
    {"method.b1": 10, "method.b2": 4, "method.eta": 4, "train.lr": 0.0001},
    {"method.b1": 20, "method.b2": -12, "method.eta": 6, "train.lr": 0.0001},
]


@pytest.mark.ray
def test_search_early_stops_writes_results_and_retrains_the_best(ray_cluster, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cmd_dist.cli import main

    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "space": {
                    "method.b1": {"distribution": "uniform", "low": 1, "high": 30},
                    "method.b2": {"distribution": "uniform", "low": -20, "high": 20},
                    "method.eta": {"distribution": "uniform", "low": 1, "high": 8},
                    "train.lr": {"distribution": "choice", "values": [0.05, 0.0001]},
                },
                "start": [GOOD, *SLOW],
            }
        )
    )
    rc = main(
        [
            "tune",
            DEMO,
            "train.epochs=2",
            "train.batch_size=32",
            "train.log_every=0",
            f"output_dir={tmp_path}",
            "run_name=search",
            "--space",
            str(space),
            "--trials",
            "3",
            "--max-concurrent",
            "1",
            "--grace-period",
            "1",
            "--reduction-factor",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    search = tmp_path / "search"

    rows = list(csv.DictReader((search / "results.csv").open()))
    assert len(rows) == 3
    by_status = {s: [r for r in rows if r["status"] == s] for s in (COMPLETED, EARLY_STOPPED)}
    assert len(by_status[COMPLETED]) == 1 and len(by_status[EARLY_STOPPED]) == 2, rows
    done = by_status[COMPLETED][0]
    assert done["epochs"] == "2" and float(done["train.lr"]) == 0.05
    assert all(r["epochs"] == "1" for r in by_status[EARLY_STOPPED])
    # The test split was never read while searching: every trial loaded the training file only.
    assert [r["splits_read"] for r in rows] == ["train"] * 3
    for r in rows:
        assert yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())["data"]["protocol"] == "search"
    assert (search / "results.md").read_text().count("early-stopped") == 2

    best = load_config(search / "best.yaml")
    assert best.data.protocol == "final"
    assert (best.method.b1, best.method.b2, best.method.eta, best.train.lr) == (16, -4, 2, 0.05)

    summary = json.loads((search / "summary.json").read_text())
    final = summary["final"]
    assert final["eval_split"] == "test" and final["splits_read"] == "train,test" and final["epochs_run"] == 2
    assert 0 <= final["mean_test_acc"] <= 100
    assert json.loads((search / "final" / "summary.json").read_text())["mean_test_acc"] == final["mean_test_acc"]
    assert "final (test, all train)" in out and f"{final['mean_test_acc']:.2f}%" in out

    # TensorBoard: each trial folder holds cmd-dist's per-peer curves and Tune's own event file.
    for r in rows:
        trial_dir = Path(r["run_dir"])
        assert list(trial_dir.glob("events.out.tfevents.*")), f"no Tune events in {trial_dir}"
        acc = EventAccumulator(str(trial_dir / "tb" / "peerA"))
        acc.Reload()
        steps = [e.step for e in acc.Scalars("val/acc")]
        assert steps[: int(r["epochs"])] == list(range(1, int(r["epochs"]) + 1))


@pytest.mark.ray
def test_a_search_completes_with_the_test_file_unreadable(ray_cluster, tmp_path, capsys):
    """The search protocol never reads the test split: with ``test`` unreadable (a folder: open() fails
    even for root) the preflight, the trial and the results all go through. (--no-final: the retrain
    is the one step that reads it.)"""
    import pickle

    import numpy as np

    from cmd_dist.cli import main

    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = {
        "data": rng.integers(0, 256, (400, 3072), dtype=np.uint8),
        "fine_labels": rng.integers(0, 100, 400).tolist(),
    }
    (folder / "train").write_bytes(pickle.dumps(train))
    (folder / "test").mkdir()  # unreadable as a file
    rc = main(
        [
            "tune",
            DEMO,
            "data.dataset=cifar100",
            f"data.root={folder.parent}",
            "train.epochs=1",
            "train.batch_size=64",
            "train.log_every=0",
            f"output_dir={tmp_path}",
            "run_name=blind",
            "--trials",
            "1",
            "--algo",
            "random",
            "--no-asha",
            "--no-final",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.out[-2000:] + out.err[-2000:]
    rows = list(csv.DictReader((tmp_path / "blind" / "results.csv").open()))
    assert [(r["status"], r["splits_read"]) for r in rows] == [(COMPLETED, "train")], rows
    assert (tmp_path / "blind" / "best.yaml").is_file()


@pytest.mark.ray
def test_a_search_to_a_file_uri_writes_everything_there_resumes_and_reports(ray_cluster, tmp_path, capsys):
    """``output_dir`` a URI (``file://``, through pyarrow like ``s3://``): 2 grid trials (the slow one stopped by
    ASHA after epoch 1, its Train run aborted) and the retrain write every file on the URI and leave no staging
    folder; ``--resume URI`` of the finished search reuses it all; ``cmd-dist report URI`` reads it back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cmd_dist.cli import build_parser, main
    from cmd_dist.runs import storage
    from tune import driver

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"space": {"train.lr": {"distribution": "choice", "values": [0.05, 0.0001]}}}))
    uri = f"file://{tmp_path}/bucket/runs"
    search_uri = f"{uri}/search"
    argv = ["train.epochs=2", "train.batch_size=32", "train.log_every=0", f"output_dir={uri}", "run_name=search"]
    flags = ["--space", str(space), "--algo", "grid", "--max-concurrent", "1", "--grace-period", "1"]
    rc = main(["tune", DEMO, *argv, *flags, "--reduction-factor", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"cmd-dist: search folder {search_uri}" in out and f"table: {search_uri}/results.csv" in out
    search = tmp_path / "bucket" / "runs" / "search"  # where file:// put it: read back as plain files
    rows = list(csv.DictReader((search / "results.csv").open()))
    by_lr = {float(r["train.lr"]): r for r in rows}
    assert (by_lr[0.05]["status"], by_lr[0.05]["epochs"]) == (COMPLETED, "2")
    assert (by_lr[0.0001]["status"], by_lr[0.0001]["epochs"]) == (EARLY_STOPPED, "1")
    for r in rows:
        assert r["run_dir"].startswith(f"{search_uri}/trials/trial_"), r["run_dir"]
        trial = search / r["run_dir"][len(search_uri) + 1 :]
        cfg = yaml.safe_load((trial / "config.yaml").read_text())
        assert cfg["data"]["protocol"] == "search" and cfg["output_dir"] == f"{search_uri}/trials"
        metrics = [json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines()]
        # (the stopped trial may have finished another epoch before its run was aborted: a prefix)
        assert sorted({m["epoch"] for m in metrics})[: int(r["epochs"])] == list(range(1, int(r["epochs"]) + 1))
        assert (trial / "checkpoint_000001" / "epoch.txt").read_text().strip() == "1"
        assert (trial / "result.json").is_file(), "Tune's own results were not uploaded beside the run"
        acc = EventAccumulator(str(trial / "tb" / "peerA"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("val/acc")][: int(r["epochs"])] == list(range(1, int(r["epochs"]) + 1))
    assert not (search / ".lock").exists()  # the search's lock is released
    assert not list(search.glob("trials/trial_*/.lock"))  # trials take none: the search's lock covers them
    best = load_config(search / "best.yaml")
    assert best.data.protocol == "final" and best.train.lr == 0.05 and best.output_dir == search_uri
    assert f"cmd-dist train {search_uri}/best.yaml\n" in (search / "best.yaml").read_text()  # not the staging's
    assert load_config(f"{search_uri}/best.yaml") == best  # cmd-dist train URI/best.yaml reads it from the URI
    final = json.loads((search / "final" / "summary.json").read_text())
    assert final["eval_split"] == "test" and final["epochs_run"] == 2 and final["run_dir"] == f"{search_uri}/final"
    assert json.loads((search / "summary.json").read_text())["final"]["mean_test_acc"] == final["mean_test_acc"]
    assert (search / "final" / "checkpoint_000002" / "epoch.txt").is_file() and (search / "search.yaml").is_file()
    # No staging folder is left: not the workers' (the aborted trial's included), the driver's, the retrain's.
    runs = [search_uri, f"{search_uri}/final", *(r["run_dir"] for r in rows)]
    left = [p for u in runs for p in storage.staging_root().glob(f"{storage._staging_prefix(u)}*")]
    assert left == []
    # The sweep the search ran on every node at its end: a killed worker's folder (a dead pid) goes.
    dead = storage.staging_root() / f"{storage._staging_prefix(rows[0]['run_dir'])}999999999-x"
    (dead / "checkpoint_000001").mkdir(parents=True)
    assert driver.sweep_staging(prepare(build_parser().parse_args(["tune", "--resume", search_uri]))) == 1
    assert not dead.exists()

    # --resume of the finished search: Tune restores it from the URI (nothing to run), the retrain is reused.
    assert main(["tune", "--resume", search_uri]) == 0
    out = capsys.readouterr().out
    assert f"cmd-dist: continuing the search in {search_uri}/trials" in out
    assert "final retrain already done" in out and len(list(csv.DictReader((search / "results.csv").open()))) == 2

    assert main(["report", search_uri]) == 0
    assert f"report: {search_uri}/report/report.md" in capsys.readouterr().out
    assert "## Search search" in (search / "report" / "report.md").read_text()
