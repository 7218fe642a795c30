"""A real Ray cluster of several nodes on this machine (issue 13): spread peers, node loss, shared output, jobs, tuning.

One cluster per module (`tests/multinode.py`): a head and two worker nodes, one CPU each, all on 127.0.0.1,
the head with the dashboard (Jobs API) on 127.0.0.1. Every run is a real `cmd-dist` command in a subprocess
(the pytest process never joins the cluster, so the session's local `ray_cluster` is untouched), tiny digits
runs, workers at 0.5 CPU. The tests run in file order: the node-loss test removes a worker node, so the later
ones run on two nodes. The cluster and everything it started are killed at the end, also on failure.

The fast tests at the bottom need no cluster: the checks' messages (spread node count, URI output_dir refused),
the cluster definitions in docker/ against Ray's cluster-config schema and KubeRay's required fields.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cmd_dist.config import ConfigError, load_config
from cmd_dist.runs.checkpoint import load_peer_state
from tests.conftest import REPO, wait_for
from tests.multinode import MultiNodeCluster, free_port

DEMO = os.path.join(REPO, "configs", "demo.yaml")
# eta = 1 and b2 = -1: knowledge flows from epoch 1; 0.5 CPU per worker: two peers fit a 1-CPU node.
TINY = ["method.eta=1.0", "method.b2=-1.0", "train.log_every=0", "ray.cpus_per_worker=0.5"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `cmd-dist` of this venv
    # Keep 127.0.0.1 as the address of every node and driver (Ray would swap in the machine's routable IP).
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def _cli(args: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cmd_dist.cli", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    saved = dict(os.environ)
    os.environ.update(_env())  # the helper and the nodes it starts (raylets, workers) inherit this
    temp = Path(f"/tmp/cmdc{os.getpid()}")  # short: Ray's socket paths must stay under 108 characters
    try:
        c = MultiNodeCluster(
            workers=[{"num_cpus": 1}, {"num_cpus": 1}], head={"num_cpus": 1}, temp_dir=temp, dashboard=True
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield c
    finally:
        c.stop()


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _final_checkpoint(run_dir: Path, epoch: int) -> Path:
    for p in run_dir.glob("checkpoint_*"):
        if (p / "epoch.txt").is_file() and int((p / "epoch.txt").read_text()) == epoch:
            return p
    raise AssertionError(f"no checkpoint for epoch {epoch} in {run_dir}")


# ----------------------------------------------------------------------------- on the cluster


@pytest.mark.ray
def test_output_dir_probe_on_every_node(cluster, tmp_path):
    """The visibility probe really runs on each node: a shared folder passes, a file no node has is reported."""
    script = (
        "import sys, ray\n"
        "from cmd_dist.launch import cluster, shared_output\n"
        "ray.init(address=sys.argv[1], _node_ip_address='127.0.0.1',\n"
        "         logging_config=ray.LoggingConfig(log_level='ERROR'))\n"
        "shared_output.check_shared_output(sys.argv[2])\n"
        "missing = shared_output.nodes_missing_file(sys.argv[2], 'no-such-file', 'token', timeout=60)\n"
        "print('MISSING', len(missing), len(cluster.alive_nodes()))\n"
        "print('ERROR', shared_output.shared_output_error(sys.argv[2], missing, len(cluster.alive_nodes())))\n"
        "uri = 'file://' + sys.argv[2]\n"  # a URI: each node reads the token through pyarrow
        "shared_output.check_shared_output(uri)\n"
        "missing = shared_output.nodes_missing_file(uri, 'no-such-file', 'token', timeout=60)\n"
        "print('URI', len(missing), shared_output.shared_output_error(uri, missing, 3))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, cluster.address, str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MISSING 3 3" in out.stdout
    error = next(line for line in out.stdout.splitlines() if line.startswith("ERROR"))
    assert "3 of the cluster's 3 nodes cannot see it" in error and "shared by every node" in error
    uri = next(line for line in out.stdout.splitlines() if line.startswith("URI"))
    assert uri.startswith(f"URI 3 output_dir: file://{tmp_path}: 3 of the cluster's 3 nodes cannot read what")
    assert not list(tmp_path.glob(".cmd-dist-shared-*"))  # the probe file is removed


@pytest.mark.ray
def test_spread_peers_on_two_nodes_survive_a_lost_node_and_equal_single_node(cluster, tmp_path):
    """`cmd-dist train --address` with ray.spread=true: peers on different nodes (STRICT_SPREAD); a worker node
    removed mid-run restarts the group from the last checkpoint on the remaining nodes; the result equals the
    uninterrupted single-process run to 1e-5."""
    epochs = 8
    overrides = [*TINY, f"train.epochs={epochs}", "train.milestones=[5]"]
    run_dir = tmp_path / "spread"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmd_dist.cli", "train", DEMO, *overrides, "ray.spread=true"]
        + [f"output_dir={tmp_path}", "run_name=spread", "--address", cluster.address],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ranks = [run_dir / "workers" / f"rank{r}.json" for r in range(2)]
        wait_for(lambda: all(p.is_file() for p in ranks) and len(_rows(run_dir)) >= 4, timeout=240)
        first = [json.loads(p.read_text()) for p in ranks]
        assert first[0]["node_id"] != first[1]["node_id"], first  # STRICT_SPREAD: one peer per node
        # Remove a worker node that hosts a peer (the head hosts the driver and Train's controller).
        victim = next(i for i, nid in enumerate(cluster.worker_ids) if nid in {f["node_id"] for f in first})
        cluster.kill_worker(victim)
        killed_at = max(r["epoch"] for r in _rows(run_dir))
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, output[-4000:]
    assert killed_at < epochs, "the node was removed after the run had ended; the test proves nothing"
    assert "resuming from" in output  # restarted from the last checkpoint, not from scratch
    after = [json.loads(p.read_text()) for p in ranks]
    assert after[0]["node_id"] != after[1]["node_id"]
    assert cluster.worker_ids[victim] not in {a["node_id"] for a in after}
    assert all(a["node_ip"] == "127.0.0.1" for a in after)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == epochs

    from cmd_dist.train.local import run_local

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a 0.5-CPU Ray worker
    try:
        reference = run_local(load_config(DEMO, overrides), tmp_path / "reference")[0]
    finally:
        torch.set_num_threads(threads)
    rows, ref_rows = _rows(run_dir), _rows(tmp_path / "reference")
    assert [(r["epoch"], r["peer"]) for r in rows] == [(r["epoch"], r["peer"]) for r in ref_rows]
    for a, b in zip(rows, ref_rows):
        for key in ("train_loss", "eval_acc", "certainty_r"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a["epoch"], a["peer"])
    for k in range(2):
        wa = load_peer_state(_final_checkpoint(run_dir, epochs), k)["model"]
        wb = load_peer_state(_final_checkpoint(tmp_path / "reference", epochs), k)["model"]
        for name in wa:
            torch.testing.assert_close(wa[name].float(), wb[name].float(), atol=1e-5, rtol=0, msg=name)
    assert [p["test_acc"] for p in summary["peers"]] == pytest.approx(
        [reference[f"{n}/test_acc"] for n in ("peerA", "peerB")], abs=1e-9
    )


@pytest.mark.ray
def test_submit_job_runs_on_the_cluster(cluster, tmp_path):
    """`cmd-dist submit ... --address http://127.0.0.1:PORT --wait`: a Ray Job runs `python -m cmd_dist.cli
    train` on the cluster (the current folder uploaded as its working dir), here with no `cmd-dist` script on the
    job's PATH, with output_dir a folder every node sees (here: one machine); config, metrics, TensorBoard,
    checkpoints, best checkpoint, worker records (with their Ray node) and summary arrive. Ray's packaging log
    lines stay off the console."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir = tmp_path / "shared" / "runs"
    bin_dir = tmp_path / "bin"  # the job's PATH: a `python`, and no `cmd-dist` script
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"
    assert shutil.which("cmd-dist", path=path) is None
    runtime_env = tmp_path / "env.yaml"
    runtime_env.write_text(yaml.safe_dump({"env_vars": {"PATH": path}}))
    out = _cli(
        ["submit", DEMO, *TINY, "train.epochs=2", "train.milestones=[1]", f"output_dir={out_dir}", "run_name=job"]
        + ["--address", cluster.dashboard_url, "--wait", "--timeout", "400", "--runtime-env", str(runtime_env)],
        timeout=480,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "cmd-dist: submitted job " in out.stdout and "ray job logs --follow --address" in out.stdout
    assert "entrypoint:  python -m cmd_dist.cli train configs/demo.yaml" in out.stdout
    ours = out.stdout.split("  tensorboard:")[0] + out.stderr  # what submit prints before the job's own log
    assert not any(w in ours for w in (" INFO ", " WARNING ", "Pushing file package", "Uploading package")), ours
    assert "final test accuracy  peerA" in out.stdout  # the job's own log, streamed
    run_dir = out_dir / "job"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and all(p["test_acc"] > 0 for p in summary["peers"])
    assert len(_rows(run_dir)) == 4 and load_config(run_dir / "config.yaml").output_dir == str(out_dir)
    assert _final_checkpoint(run_dir, 2) and (run_dir / "best_checkpoint" / "epoch.txt").is_file()
    for k in range(2):
        load_peer_state(_final_checkpoint(run_dir, 2), k)
        load_peer_state(run_dir / "best_checkpoint", k)
    nodes = {json.loads((run_dir / "workers" / f"rank{r}.json").read_text())["node_id"] for r in range(2)}
    assert len(nodes) >= 1 and all(len(n) > 16 for n in nodes)
    acc = EventAccumulator(str(run_dir / "tb" / "peerA"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("test/acc")] == [1, 2]


@pytest.mark.ray
def test_tune_runs_trials_concurrently_across_nodes(cluster, tmp_path):
    """`cmd-dist tune --address`: 4 trials, 2 at a time, each its own Train run (placement group) on its own
    node; ASHA stops weak trials after epoch 1 (their runs aborted, see tune.driver.stop_train_run) and the next
    trials start on the freed nodes. The strict leak check is tests/integration/test_tune.py's search on 2 CPUs,
    one trial at a time, where a placement group left behind by a stopped trial blocks the next trial for good."""
    out = _cli(
        ["tune", DEMO, *TINY, "train.epochs=2", "train.milestones=[1]", f"output_dir={tmp_path}", "run_name=search"]
        + ["--trials", "4", "--max-concurrent", "2", "--algo", "random", "--grace-period", "1"]
        + ["--reduction-factor", "2", "--no-final", "--address", cluster.address],
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout[-4000:], out.stderr[-3000:])
    assert "2 trial(s) at once" in out.stdout
    trials = sorted((tmp_path / "search" / "trials").glob("trial_*"))
    assert len(trials) == 4
    spans, nodes = [], []
    for t in trials:
        results = [json.loads(x) for x in (t / "result.json").read_text().splitlines() if x.strip()]
        # A trial's span in Tune's own record (whole seconds): from its first step() call (its first result
        # less that step's wait, which includes the Train run's start-up) to its last result. Its workers'
        # own start (workers/rank0.json) comes seconds later and a 2-epoch trial lasts ~2 s after it, so
        # those spans can miss each other under load although Tune ran the trials side by side.
        first, last = results[0], results[-1]
        spans.append((float(first["timestamp"]) - float(first["time_this_iter_s"]), float(last["timestamp"])))
        nodes.append({json.loads(p.read_text())["node_id"] for p in (t / "workers").glob("rank*.json")})
    # Concurrency from the start times: at each trial's start, how many trials were running.
    running = [sum(1 for s, e in spans if s <= start < e) for start, _ in spans]
    assert max(running) == 2, spans
    a, b = next((i, j) for i in range(4) for j in range(4) if i != j and spans[i][0] <= spans[j][0] < spans[i][1])
    assert not nodes[a] & nodes[b], "two trials at once on one 1-CPU node"
    assert "early-stopped" in (tmp_path / "search" / "results.md").read_text()


# ----------------------------------------------------------------------------- no cluster needed


def test_unreachable_address_is_one_line_error_fast(tmp_path):
    start = time.time()
    out = _cli(["train", DEMO, f"output_dir={tmp_path}", "--address", f"127.0.0.1:{free_port()}"], timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmd-dist: error: ray.address: no Ray cluster answers at")
    assert time.time() - start < 90


def test_cluster_without_the_resources_is_refused():
    from cmd_dist.launch import placement

    two = [{"CPU": 1.0}, {"CPU": 1.0}]
    ok = load_config(DEMO, ["ray.spread=true", "ray.use_gpu=false"])
    p = placement.plan_placement(ok, two)  # 2 workers, 2 nodes of 1 CPU
    assert p.strategy == "STRICT_SPREAD" and p.num_workers == 2 and "one node each" in p.line
    assert placement.plan_placement(load_config(DEMO, ["ray.use_gpu=false"]), two).strategy == "PACK"
    # 3 workers x 0.5 CPU fit 2 nodes of 1 CPU packed, but not one per node.
    three = load_config(DEMO, ["ray.spread=true", "ray.use_gpu=false", "ray.cpus_per_worker=0.5", "peers=[{}, {}, {}]"])
    assert placement.plan_placement(load_config(DEMO, ["ray.cpus_per_worker=0.5", "peers=[{}, {}, {}]"]), two)
    with pytest.raises(ConfigError, match=r"ray.spread: 3 workers need 3 nodes with 0.5 CPU each; .* has 2 such node"):
        placement.plan_placement(three, two)
    # ray.spread: a worker per peer even where ray.placement: auto would group peers on the GPUs there are.
    gpu_nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    spread_gpu = placement.plan_placement(load_config(DEMO, ["ray.spread=true"]), gpu_nodes)
    assert spread_gpu.num_workers == 2 and spread_gpu.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    with pytest.raises(
        ConfigError, match=r"ray.spread: 2 workers need 2 nodes with 1 CPU, 0.5 GPU each; .* has 1 such"
    ):
        # one GPU in the cluster: auto shares it (0.5 each), but only one node has it
        placement.plan_placement(load_config(DEMO, ["ray.spread=true"]), [gpu_nodes[0], {"CPU": 8.0}])
    # The ScalingConfig Ray Train gets carries the strategy.
    assert placement.scaling_for(ok)[0].placement_strategy == "STRICT_SPREAD"


def test_lost_node_is_told_from_a_code_error(monkeypatch, tmp_path):
    """A node removed at once can reach the driver only as the survivor's broken collective (gloo); the rank
    records and the node table make it a lost worker (restart). A code error, or no dead node, stays an error."""
    from ray.train import WorkerGroupError

    from cmd_dist.launch import cluster, failures

    (tmp_path / "workers").mkdir()
    for rank, node in ((0, "a" * 56), (1, "b" * 56)):
        (tmp_path / "workers" / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "node_id": node}))
    reset = failures.TrainingCodeError(
        1, "RuntimeError", "[gloo/transport/tcp/pair.cc:545] Connection reset by peer", ""
    )
    nodes = [{"NodeID": "a" * 56, "Alive": False}, {"NodeID": "b" * 56, "Alive": True}]
    monkeypatch.setattr(cluster.ray, "nodes", lambda: nodes)
    lost = failures.lost_nodes(WorkerGroupError("x", {1: reset}), tmp_path, timeout=0)
    assert list(lost) == [0] and "aaaaaaaa left the cluster" in lost[0]
    bug = failures.TrainingCodeError(1, "ValueError", "bad shape", "")
    assert failures.lost_nodes(WorkerGroupError("x", {1: bug}), tmp_path, timeout=0) == {}
    nodes[0]["Alive"] = True  # every node alive: a broken collective without a lost node is the code's
    start = time.monotonic()
    assert failures.lost_nodes(WorkerGroupError("x", {1: reset}), tmp_path, timeout=1.0) == {}
    assert time.monotonic() - start >= 1.0  # it waited for Ray's health check to mark a dead node


def test_spread_and_output_dir_keys_are_validated():
    with pytest.raises(ConfigError, match="ray.spread: true needs ray.placement=separate or auto"):
        load_config(DEMO, ["ray.spread=true", "ray.placement=together"])
    with pytest.raises(ConfigError, match="ray.spread: expected true or false"):
        load_config(DEMO, ["ray.spread=3"])
    for uri in ("s3://bucket/runs", "file:///tmp/runs"):  # filesystem URIs: tests/unit/runs/test_storage.py
        assert load_config(DEMO, [f"output_dir={uri}"]).output_dir == uri
    with pytest.raises(ConfigError, match=r"output_dir: '://x' is not a filesystem URI"):
        load_config(DEMO, ["output_dir=://x"])


def test_gpus_per_trial_splits_over_workers_and_sets_concurrency():
    from tune.resources import plan_resources
    from tune.search import apply_gpus_per_trial

    cfg = load_config(DEMO)
    apply_gpus_per_trial(cfg, 0.5)
    assert cfg.ray.use_gpu == "true" and cfg.ray.gpus_per_worker == 0.25
    plan = plan_resources(2, {"CPU": 1.0, "GPU": 0.25}, {"CPU": 16.0, "GPU": 2.0}, 0, 16)
    assert plan.concurrency == 4  # 2 GPUs / 0.5 GPU per trial
    with pytest.raises(ConfigError, match="--gpus-per-trial 3: a trial has 2 worker"):
        apply_gpus_per_trial(load_config(DEMO), 3)
    with pytest.raises(ConfigError, match="--gpus-per-trial 0: must be > 0"):
        apply_gpus_per_trial(load_config(DEMO), 0)
    with pytest.raises(ConfigError, match=r"a trial needs \{'CPU': 2.0, 'GPU': 1.0\} but the Ray cluster has"):
        plan_resources(2, {"CPU": 1.0, "GPU": 0.5}, {"CPU": 16.0}, 0, 4)


def test_submit_checks_before_submitting(tmp_path, monkeypatch):
    import argparse

    from cmd_dist.launch.submit import build_job, check_dashboard

    def args(**kw):
        base = dict(config=DEMO, overrides=[], working_dir=None, runtime_env=None)
        return argparse.Namespace(**{**base, **kw})

    monkeypatch.chdir(REPO)  # the default working dir is the current folder
    with pytest.raises(ConfigError, match="output_dir: 'runs' is relative"):
        build_job(args())
    entry, env, cfg = build_job(args(overrides=[f"output_dir={tmp_path}", "train.epochs=3"]))
    # The module, not the `cmd-dist` script (which a cluster's PATH may lack).
    assert entry.startswith("python -m cmd_dist.cli train configs/demo.yaml ") and entry.endswith(" --address auto")
    assert "train.epochs=3" in entry and f"run_name={cfg.run_name}" in entry
    assert env["working_dir"] == REPO and ".venv" in env["excludes"]
    outside = tmp_path / "c.yaml"
    outside.write_text("train: {epochs: 1}\n")
    with pytest.raises(ConfigError, match="must be inside the working dir"):
        build_job(args(config=str(outside), overrides=[f"output_dir={tmp_path}"]))
    monkeypatch.chdir(tmp_path)  # another project folder: it is the working dir, not this checkout
    _, env, _ = build_job(args(config="c.yaml", overrides=[f"output_dir={tmp_path}"]))
    assert env["working_dir"] == str(tmp_path)
    with pytest.raises(ConfigError, match="must be inside the working dir"):
        build_job(args(overrides=[f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="no Ray dashboard answers there"):
        check_dashboard(f"http://127.0.0.1:{free_port()}", timeout=5)


@pytest.fixture
def token_dashboard():
    """A stand-in for a dashboard with Ray's token authentication: 401 without a bearer token, 403 with a wrong
    one (Ray's middleware answers so), 200 with ``secret-token``; records the Authorization headers it got."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            auth = self.headers.get("Authorization", "")
            seen.append(auth)
            code = 401 if not auth else 200 if auth == "Bearer secret-token" else 403
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_submit_presents_the_clusters_token(token_dashboard, tmp_path, monkeypatch):
    """The token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else Ray's ~/.ray/auth_token, goes out
    as a bearer token; without one, or with a wrong one, the refusal is one line saying how to pass it."""
    from cmd_dist.launch.submit import auth_headers, check_dashboard

    url, seen = token_dashboard
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    assert auth_headers() == {}
    with pytest.raises(ConfigError) as e:
        check_dashboard(url, timeout=5)
    assert str(e.value).startswith(f"--address {url}: the cluster requires a Ray auth token and none was presented")
    assert "RAY_AUTH_TOKEN=" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret-token\n")
    check_dashboard(url, timeout=5)  # Ray's default token file
    other = tmp_path / "tok"
    other.write_text("wrong-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    with pytest.raises(ConfigError, match=rf"the cluster refused the token from RAY_AUTH_TOKEN_PATH \({other}\)"):
        check_dashboard(url, timeout=5)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-token")  # first in line
    check_dashboard(url, timeout=5)
    assert seen == ["", "Bearer secret-token", "Bearer wrong-token", "Bearer secret-token"]
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"^RAY_AUTH_TOKEN_PATH: .*missing does not exist"):
        auth_headers()


def test_submit_keeps_rays_packaging_lines_quiet_and_the_timeout_hint_names_the_address(capsys):
    import logging

    import ray.dashboard.modules.dashboard_sdk  # noqa: F401 - its logger sets its own level (INFO)

    from cmd_dist.launch.submit import quiet_ray_logs, wait_for_job

    sdk = logging.getLogger("ray.dashboard.modules.dashboard_sdk")
    packaging = logging.getLogger("ray._private.runtime_env.packaging")
    assert sdk.isEnabledFor(logging.INFO)
    with quiet_ray_logs():
        assert not sdk.isEnabledFor(logging.WARNING) and not packaging.isEnabledFor(logging.WARNING)
        assert sdk.isEnabledFor(logging.ERROR)
    assert sdk.isEnabledFor(logging.INFO)  # restored

    class Running:
        def get_job_status(self, job_id):
            return type("S", (), {"value": "RUNNING"})()

        def get_job_logs(self, job_id):
            return ""

    assert wait_for_job(Running(), "raysubmit_1", timeout=0, url="http://127.0.0.1:8265") == 1
    err = capsys.readouterr().err
    assert "ray job stop --address http://127.0.0.1:8265 raysubmit_1" in err and len(err.splitlines()) == 1


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(Path(REPO, "docker", "cluster.yaml").read_text())
    # What `ray up` does first: fill the provider's defaults, then check against ray/autoscaler/ray-schema.json.
    validate_config(prepare_config(config))
    broken = dict(config, available_node_types={"head": {"resources": {}}})  # the schema does catch mistakes
    with pytest.raises(Exception, match="node_config|required"):
        validate_config(prepare_config(broken))
    image = _dockerfile_image_tag()
    assert config["docker"]["image"].startswith("cmd-dist") and config["docker"]["image"] == image
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 2 and workers["resources"]["GPU"] == 1
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (an SSH tunnel)
    setup = " ".join(config["head_setup_commands"])
    assert "CIFAR100" in setup and "/shared/data" in setup  # the data on the shared folder
    assert "--volume=/shared:/shared" in config["docker"]["run_options"]  # the same path on every node
    assert any("nfs4" in c for c in config["initialization_commands"])


def test_kuberay_rayjob_has_required_fields():
    manifest = yaml.safe_load(Path(REPO, "docker", "rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("cmd-dist train /home/ray/cmd-dist/configs/table1/cmdp_mconf.yaml")
    assert "--address auto" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    # The dashboard listens on the pod network for KubeRay's submitter only: no Service beyond the cluster.
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["name"] and head_container["image"] == _dockerfile_image_tag()
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] and group["replicas"] == 2 and group["minReplicas"] <= 2 <= group["maxReplicas"]
    worker = group["template"]["spec"]["containers"][0]
    assert worker["name"] and worker["image"] == head_container["image"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 1
    # Every node sees the runs and the data at the same paths.
    for pod in (head["template"]["spec"], group["template"]["spec"]):
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert {"/shared/runs", "/shared/data"} <= mounts
    assert "output_dir=/shared/runs" in spec["entrypoint"] and "data.root=/shared/data" in spec["entrypoint"]


def _dockerfile_image_tag() -> str:
    text = Path(REPO, "docker", "Dockerfile").read_text()
    tag = next(line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("# image: "))
    return tag.strip()


def test_dockerfile_pins_the_rayproject_base_of_the_installed_ray():
    import ray

    text = Path(REPO, "docker", "Dockerfile").read_text()
    base = next(line.split()[1] for line in text.splitlines() if line.startswith("FROM "))
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311"), base  # pinned, same Ray as the package
    assert ":latest" not in text and "pip install" in text and "cmd_dist" in text
