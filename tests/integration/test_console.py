"""What a researcher sees on the console: `cmd-dist train` and `cmd-dist tune` run as a user runs them (a
subprocess, stdout piped, so not a terminal), joined to the session's Ray cluster to spare a second Ray start.

Quiet means: one line per epoch (train) or per finished trial (tune), no Ray INFO chatter, no per-report
`TrainingReport(...)` dumps, no progress-bar carriage returns off a terminal, and no traceback anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DEMO = os.path.join(REPO, "configs", "demo.yaml")
EXE = [sys.executable, "-m", "cmd_dist.cli"]
NOISE = ("Traceback", "TrainingReport", "Reporting training result", "worker group", "PreemptionWatcher", "\r")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _address(ray_cluster) -> str:
    return ray_cluster.get_runtime_context().gcs_address


def _assert_quiet(out: str) -> None:
    for word in NOISE:
        assert word not in out, f"{word!r} on the console:\n{out[-4000:]}"


@pytest.mark.ray
def test_train_prints_one_line_per_epoch_and_nothing_from_ray(ray_cluster, tmp_path):
    epochs = 3
    # Flags between the config and the overrides, overrides on both sides: any order is accepted.
    argv = [
        *EXE,
        "train",
        DEMO,
        f"train.epochs={epochs}",
        "--address",
        _address(ray_cluster),
        f"output_dir={tmp_path}",
        "run_name=console",
        "train.log_every=0",
    ]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env())
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    lines = out.splitlines()
    assert len(lines) <= epochs + 12, out
    _assert_quiet(out)
    assert [line.split(" |")[0] for line in lines if line.startswith("epoch ")] == [
        f"epoch {e}/{epochs}" for e in range(1, epochs + 1)
    ]
    summary = json.loads((tmp_path / "console" / "summary.json").read_text())
    for peer in summary["peers"]:
        assert f"final test accuracy  {peer['name']} ({peer['arch']}): {peer['test_acc']:.2f}%" in lines
    assert yaml.safe_load((tmp_path / "console" / "config.yaml").read_text())["train"]["epochs"] == epochs


@pytest.mark.ray
def test_tune_prints_one_line_per_trial_then_the_table_and_records_hparams(ray_cluster, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    trials, epochs = 2, 2
    argv = [
        *EXE,
        "tune",
        "--trials",
        str(trials),
        DEMO,
        "--no-asha",
        f"train.epochs={epochs}",
        "--algo",
        "random",
        "--no-final",
        f"output_dir={tmp_path}",
        "--address",
        _address(ray_cluster),
        "run_name=search",
        "train.log_every=0",
        "train.batch_size=64",
    ]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=_env())
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    _assert_quiet(out)
    lines = out.splitlines()
    trial_lines = [line for line in lines if line.startswith("trial ")]
    assert len(trial_lines) == trials, out
    assert all(f"{epochs}/{epochs} epochs | completed" in line for line in trial_lines), out
    assert not [line for line in lines if line.startswith("epoch ")], "trials must not print their epochs"
    search = tmp_path / "search"
    table = (search / "results.md").read_text()
    assert table in out  # the final table, as written
    # 3 header lines, a line per trial, the table (2 + trials), best trial, comparison, TensorBoard hint.
    assert len(lines) <= 2 * trials + 16, out

    # cmd-dist report on the search folder: the trials' table holds summary.json's numbers.
    from cmd_dist.report import write_report

    summary = json.loads((search / "summary.json").read_text())
    report = write_report([search], tmp_path / "report")
    text = report.read_text()
    for row in summary["trials"]:
        assert f"| {row['trial']} |" in text and f"| {row['mean_acc']:.2f} |" in text
    assert (tmp_path / "report" / "search0_search_values.png").stat().st_size > 0

    # TensorBoard HParams: every trial's peers carry their b1, b2, eta, read back from the event files.
    for row in summary["trials"]:
        acc = EventAccumulator(str(Path(row["run_dir"]) / "tb" / "peerA"))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        values = {k: v.number_value for k, v in start.session_start_info.hparams.items()}
        assert values == pytest.approx({k: row["params"][k] for k in ("method.b1", "method.b2", "method.eta")})
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
        assert [m.name.tag for m in experiment.experiment.metric_infos][0] == "val/acc"


def test_forwarded_tracebacks_collapse_to_their_exception_line():
    """Ray's internal actors' tracebacks (forwarded to the console) shrink to the exception; exits vanish."""
    from cmd_dist.launch.console import _CollapseTracebacks

    printed: list[str] = []
    show = _CollapseTracebacks(lambda data: printed.extend(data["lines"]))
    frames = ['  File "x.py", line 1, in f', "    f()", "    ^^^"]
    show({"pid": 1, "lines": ["epoch 1/3 | ok", "Exception in thread PlacementGroupCleanerMonitor:"]})
    show({"pid": 2, "lines": ["Traceback (most recent call last):", *frames, "SystemExit: 1", "next"]})
    show(
        {
            "pid": 1,
            "lines": [
                "Traceback (most recent call last):",
                *frames,
                "",
                "During handling of the above exception, another exception occurred:",
            ],
        }
    )
    show({"pid": 1, "lines": ["Traceback (most recent call last):", *frames, "ConnectionError: two Rays", "epoch 2/3"]})
    show({"pid": 3, "lines": ["Failed to send resource request for train-1. ... it's safe to ignore this error."]})
    show({"pid": 3, "lines": ["Traceback (most recent call last):", *frames, "GetTimeoutError: Get timed out", "ok"]})
    assert printed == ["epoch 1/3 | ok", "next", "ConnectionError: two Rays", "epoch 2/3", "ok"]


# ----------------------------------------------------------------------------- a pseudo-terminal (issue 18.4)

_PTY_CHILD = """
from cmd_dist.launch import console

console = console.set_console()
print(f"progress {console.progress}", flush=True)
from ray.experimental import tqdm_ray  # the driver's side of the workers' bars; no Ray is started

manager = tqdm_ray.instance()
state = {"__magic_token__": tqdm_ray.RAY_TQDM_MAGIC, "x": 0, "pos": 0, "desc": "epoch 1/2", "total": 12,
         "unit": "it", "ip": manager.ip, "pid": 1, "uuid": "run", "closed": False}
manager.process_state_update(dict(state))
manager.process_state_update({**state, "x": 6})
print("epoch 1/2 | peerA test 50.00%", flush=True)
manager.process_state_update({**state, "x": 3, "desc": "epoch 2/2"})
manager.process_state_update({**state, "x": 12, "desc": "epoch 2/2", "closed": True})  # _RunBar's last close
print("epoch 2/2 | peerA test 60.00%", flush=True)
print("final", flush=True)
"""


def _on_a_pty(code: str) -> str:
    """Run ``code`` with stdin, stdout and stderr on a fresh pseudo-terminal that has no size (0 x 0, as under
    ``script -qec`` outside a terminal); everything it wrote, as the terminal received it."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, env=_env())
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed its side
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_a_pseudo_terminal_shows_the_live_bar_and_no_stray_line():
    """Under a pty without a size the bar is drawn (it used to be 0 columns wide: nothing), and the bar closed
    after the last epoch's steps leaves neither its line nor a blank line between the epoch lines."""
    import re

    out = _on_a_pty(_PTY_CHILD)
    assert "progress True" in out, out
    assert re.search(r"epoch 1/2:\s+50%\|\S+\s*\| 6\.00/12\.0", out), out  # the live bar, drawn
    # What stays on the screen: per line, what follows the last carriage return.
    visible = [line.split("\r")[-1] for line in out.replace("\r\n", "\n").split("\n")]
    visible = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in visible]
    first = visible.index("epoch 1/2 | peerA test 50.00%")
    assert visible[first + 1 : first + 4] == ["epoch 2/2 | peerA test 60.00%", "final", ""], visible


def test_a_pipe_gets_no_bar():
    from cmd_dist.launch import console

    code = "from cmd_dist.launch import console; print(console.set_console().progress)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    assert console.set_console(progress=False).progress is False


def test_ray_process_errors_on_the_way_out_are_silenced():
    """Ctrl-C also reaches Ray's own processes; Ray's ``ERROR services.py`` lines about them stay off the console."""
    import logging

    from cmd_dist.launch.session import stop_ray

    services = logging.getLogger("ray._private.services")
    level = services.level
    try:
        stop_ray()
        assert not services.isEnabledFor(logging.ERROR)
    finally:
        services.setLevel(level)
