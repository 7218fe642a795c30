"""Faults and how they end (issue 11, issue 10 points 2-3): each test can fail, most need no Ray.

Without Ray: the placement decision (a pure function of the cluster's resources and the config),
the lost-worker classification pinned against Ray's own exception types, checkpoint retention and
resume from the newest complete checkpoint, the run-folder lock, a full and a read-only file system,
YAML line numbers, unreachable addresses. With the shared Ray cluster: a training-code exception fails
at once; CLI subprocesses: Ctrl-C on train (with a stale ``ray_current_cluster``) and on tune, a full
disk mid-run, two runs of one name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from cmd_dist.config import ConfigError, load_config
from cmd_dist.errors import RunFolderBusy
from cmd_dist.runs.checkpoint import atomic_write_bytes, checkpoint_epoch, load_peer_state
from cmd_dist.runs.lock import RunLock
from cmd_dist.runs.storage import newest_complete_checkpoint, prune_checkpoints
from cmd_dist.train.local import run_local
from tests.conftest import REPO, wait_for

DEMO = os.path.join(REPO, "configs", "demo.yaml")
FAST = [
    "train.milestones=[2]",
    "method.eta=1.0",
    "method.b2=-1.0",
    "train.log_every=0",
    "data.train_subset=512",
]
EXE = os.path.join(os.path.dirname(sys.executable), "cmd-dist")


def _cfg(epochs: int = 3, extra=()):
    return load_config(None, [*FAST, f"train.epochs={epochs}", *extra])


def _ckpt_epochs(run_dir: Path) -> list[int]:
    return sorted(checkpoint_epoch(p) for p in run_dir.glob("checkpoint_*"))


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": REPO, **extra}


# ----------------------------------------------------------------------------- placement (pure, issue 10.2)


def _place(nodes, overrides=()):
    from cmd_dist.launch.placement import plan_placement

    return plan_placement(load_config(DEMO, list(overrides)), nodes)


def test_auto_puts_two_peers_on_the_one_gpu_there_is():
    """placement auto + 1 GPU: one worker hosting both peers on the whole GPU (one CUDA graph step)."""
    p = _place([{"CPU": 16, "GPU": 1}])
    assert p.use_gpu and p.num_workers == 1
    assert p.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    assert "peerA, peerB -> worker 0" in p.line and "1 GPU" in p.line


def test_separate_on_fewer_gpus_shares_them():
    p = _place([{"CPU": 16, "GPU": 1}], ["ray.placement=separate"])
    assert p.use_gpu and p.num_workers == 2
    assert p.resources_per_worker == {"CPU": 1.0, "GPU": 0.5} and p.backend == "gloo"
    assert p.line.count("peer") == 2 and "peerA -> worker 0" in p.line and "peerB -> worker 1" in p.line
    assert "0.5 GPU" in p.line and "sharing 1 GPU" in p.line


@pytest.mark.parametrize(
    "peers, gpus, workers", [(2, 0, 2), (2, 1, 1), (2, 2, 2), (3, 2, 1), (4, 2, 2), (4, 3, 2), (6, 4, 3), (3, 8, 3)]
)
def test_auto_workers_divide_the_peers_over_the_gpus(peers, gpus, workers):
    from cmd_dist.launch.placement import auto_workers

    assert auto_workers(peers, gpus, "auto") == workers
    assert auto_workers(peers, gpus, "false") == peers  # CPU: a worker per peer


def test_auto_uses_a_gpu_per_worker_when_there_are_enough():
    p = _place([{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}])
    assert p.num_workers == 2
    assert p.resources_per_worker == {"CPU": 1.0, "GPU": 1.0} and p.backend == "nccl"
    three = _place(
        [{"CPU": 16, "GPU": 2}],
        ["ray.placement=separate", "peers=[{arch: cnn_small}, {arch: cnn_small}, {arch: cnn_small}]"],
    )
    # 3 workers on 2 GPUs: a 0.666 share would not fit two workers on one GPU; halves do.
    assert three.resources_per_worker["GPU"] == 0.5 and three.backend == "gloo"
    four = _place([{"CPU": 16, "GPU": 2}], ["peers=[{arch: cnn_small}, {arch: cnn_small}, {arch: cnn_small}, {}]"])
    assert four.num_workers == 2 and four.resources_per_worker["GPU"] == 1.0 and four.backend == "nccl"


def test_auto_without_gpus_is_cpu_and_says_so():
    p = _place([{"CPU": 4}])
    assert not p.use_gpu and p.resources_per_worker == {"CPU": 1.0} and p.backend == "gloo"
    assert "on CPU (no GPU in the cluster)" in p.line
    together = _place([{"CPU": 4, "GPU": 1}], ["ray.placement=together"])
    assert together.num_workers == 1 and together.resources_per_worker["GPU"] == 1.0
    assert "peerA, peerB -> worker 0" in together.line


@pytest.mark.parametrize(
    "nodes, overrides, words",
    [
        ([{"CPU": 8}], ["ray.use_gpu=true"], ["ray.use_gpu: true", "no GPU"]),
        (
            [{"CPU": 8, "GPU": 1}],
            ["ray.use_gpu=true", "ray.placement=separate"],
            ["2 workers x 1 GPU", "ray.gpus_per_worker=0.5"],
        ),
        (
            [{"CPU": 2}],
            ["peers=[{arch: cnn_small}, {arch: cnn_small}, {arch: cnn_small}]"],
            ["3 workers x 1 CPU", "ray.cpus_per_worker=0.66"],
        ),
        ([{"CPU": 2}, {"CPU": 2}], ["ray.cpus_per_worker=3"], ["at most 2 per node"]),
    ],
)
def test_placements_that_can_never_fit_are_refused(nodes, overrides, words):
    with pytest.raises(ConfigError) as e:
        _place(nodes, overrides)
    for word in words:
        assert word in str(e.value)
    assert "\n" not in str(e.value)


def _cli(*argv, cwd, timeout=180, env=None):
    return subprocess.run([EXE, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or _env())


def test_cli_refuses_gpus_that_do_not_exist_before_anything_starts(tmp_path):
    """use_gpu=true on a machine without GPU, and more 1-CPU peers than cores: one line, exit 2, before Ray."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    start = time.time()
    out = _cli("train", DEMO, "ray.use_gpu=true", f"output_dir={tmp_path}", "run_name=gpu", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("cmd-dist: error:")]
    assert len(errors) == 1 and "no GPU" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "gpu").exists()  # refused before the run folder, Ray or any worker
    assert time.time() - start < 60
    peers = ", ".join(["{arch: cnn_small}"] * ((os.cpu_count() or 1) + 1))
    out = _cli("train", DEMO, f"peers=[{peers}]", f"output_dir={tmp_path}", "run_name=cpus", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "ray.cpus_per_worker" in lines[0] and "do not fit" in lines[0], out.stderr
    assert not (tmp_path / "cpus").exists()


# ----------------------------------------------------------------------------- failure classification (10.3)


def test_lost_worker_classification_matches_ray():
    """Pins the Ray-internal shape the driver relies on: a dead actor arrives as Ray Train's
    WorkerHealthCheckFailedError wrapping ray.exceptions.RayActorError (ActorDiedError)."""
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from cmd_dist.launch.failures import TrainingCodeError, code_error, lost_workers

    died = WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError())
    partner = TrainingCodeError(0, "RuntimeError", "gloo: Connection reset by peer", "tb")
    lost = WorkerGroupError("x", {0: partner, 1: died})
    assert set(lost_workers(lost)) == {1}
    bug = WorkerGroupError("x", {1: TrainingCodeError(1, "ValueError", "boom", "Traceback ...")})
    assert lost_workers(bug) == {}
    assert code_error(bug).kind == "ValueError" and code_error(bug).tb.startswith("Traceback")
    assert set(lost_workers(WorkerGroupError("x", {0: ActorDiedError()}))) == {0}


@pytest.mark.ray
def test_an_exception_in_the_training_code_fails_at_once(ray_cluster, tmp_path, monkeypatch):
    """Rank 1 raises before epoch 2: no retry, the worker's traceback, the run folder as it was."""
    from cmd_dist.launch import failures, job

    monkeypatch.setattr(job, "TEST_FAULT", "raise:1:2")
    cfg = load_config(DEMO, [*FAST, "train.epochs=3", f"output_dir={tmp_path}", "run_name=bug"])
    run_dir = job.resolve_run_dir(cfg)
    notices: list[str] = []
    with pytest.raises(failures.RunFailed) as e:
        job.train(cfg, run_dir, log=notices.append)
    msg = str(e.value)
    assert "ValueError in worker 1: test fault: rank 1 raises before epoch 2" in msg and "not retried" in msg
    assert "Traceback" in e.value.detail and "fault_hook" in e.value.detail
    assert not [n for n in notices if "was lost" in n]  # one attempt: no restart
    assert _ckpt_epochs(run_dir) == [1]  # epoch 1 kept, nothing of epoch 2
    assert load_config(run_dir / "config.yaml").run_name == "bug"


# ----------------------------------------------------------------------------- checkpoints (no Ray)


class _Crash(RuntimeError):
    pass


def _crash_before(epoch: int):
    def hook(rank: int, e: int) -> None:
        if e == epoch:
            raise _Crash(f"crash before epoch {e}")

    return hook


def test_resume_starts_from_the_newest_complete_checkpoint(tmp_path, capsys):
    """A run stopped before epoch 3 resumes at epoch 3 (not 1): its first report is epoch 3."""
    run_dir = tmp_path / "run"
    with pytest.raises(_Crash):
        run_local(_cfg(4), run_dir, fault_hook=_crash_before(3))
    assert _ckpt_epochs(run_dir) == [1, 2]
    capsys.readouterr()
    _, rep = run_local(_cfg(4), run_dir)
    out = capsys.readouterr().out
    assert "checkpoint_000002 (epoch 2 done), training epoch 3 onwards" in out
    assert [r["epoch"] for r in rep.reports] == [3, 4]
    assert json.loads((run_dir / "workers" / "rank0.json").read_text())["resumed_after_epoch"] == 2
    # the same weights as an uninterrupted run
    run_local(_cfg(4), tmp_path / "ref")
    for k in range(2):
        a = load_peer_state(run_dir / "checkpoint_000004", k)["model"]
        b = load_peer_state(tmp_path / "ref" / "checkpoint_000004", k)["model"]
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_an_incomplete_newer_folder_is_skipped_and_cleared(tmp_path, capsys):
    """A folder whose marker never arrived (a worker died while writing) is not resumed from."""
    run_dir = tmp_path / "run"
    run_local(_cfg(2), run_dir)
    partial = run_dir / "checkpoint_000003"
    partial.mkdir()
    (partial / "peer0.pt").write_bytes(b"half")
    assert newest_complete_checkpoint(run_dir, 2, warn=lambda m: None).name == "checkpoint_000002"
    run_local(_cfg(3), run_dir)
    assert "checkpoint_000002 (epoch 2 done)" in capsys.readouterr().out
    assert _ckpt_epochs(run_dir) == [2, 3] and checkpoint_epoch(run_dir / "checkpoint_000003") == 3


def test_retention_never_deletes_the_last_good_checkpoint(tmp_path, capsys):
    """Corrupt latest: resume from the previous one; afterwards only complete checkpoints are kept."""
    run_dir = tmp_path / "run"
    run_local(_cfg(3), run_dir)
    latest = run_dir / "checkpoint_000003" / "peer1.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    # Pruning with a corrupt newest folder keeps the good one (and the corrupt one is not "kept").
    assert prune_checkpoints(run_dir, keep=1, num_peers=2) == []
    assert (run_dir / "checkpoint_000002").is_dir()
    _, rep = run_local(_cfg(4), run_dir)
    assert "truncated or corrupted" in capsys.readouterr().out
    assert [r["epoch"] for r in rep.reports] == [3, 4]
    assert _ckpt_epochs(run_dir) == [3, 4]
    for folder in run_dir.glob("checkpoint_*"):
        for k in range(2):
            load_peer_state(folder, k)  # every kept folder verifies


def test_prune_keeps_the_newest_complete_and_leaves_the_one_being_written(tmp_path):
    run_dir = tmp_path / "run"
    run_local(_cfg(3, ["ray.keep_checkpoints=3"]), run_dir)
    writing = run_dir / "checkpoint_000004"  # no marker yet: the epoch being written now
    writing.mkdir()
    removed = prune_checkpoints(run_dir, keep=1, num_peers=2)
    assert sorted(removed) == [run_dir / "checkpoint_000001", run_dir / "checkpoint_000002"]
    assert writing.is_dir() and _ckpt_epochs(run_dir) == [-1, 3]
    (writing / "epoch.txt").write_text("4")  # marked, but its peer files never arrived: 3 is still the one
    assert prune_checkpoints(run_dir, keep=1, num_peers=2) == [] and _ckpt_epochs(run_dir) == [3, 4]


# ----------------------------------------------------------------------------- full / read-only disk


def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(path: Path) -> None:
    """Fill a file system to the last byte."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_atomic_write_on_a_full_disk_leaves_no_temporary_file(tmp_path):
    """The real ENOSPC path (a 1 MiB tmpfs; where mounting is not allowed, RLIMIT_FSIZE's EFBIG)."""
    disk = tmp_path / "disk"
    if _mount_tmpfs(disk, "1m"):
        try:
            _fill(disk)
            with pytest.raises(OSError) as e:
                atomic_write_bytes(disk / "peer0.pt", b"x" * 200_000)
            assert e.value.errno == 28
            assert sorted(p.name for p in disk.iterdir()) == ["filler"]
        finally:
            _umount(disk)
        return
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "from cmd_dist.runs.checkpoint import atomic_write_bytes\n"
        "try:\n    atomic_write_bytes(__import__('pathlib').Path(sys.argv[1]) / 'peer0.pt', b'x' * 5000)\n"
        "except OSError as e:\n    sys.exit(e.errno)\n"
    )
    disk.mkdir()
    out = subprocess.run([sys.executable, "-c", code, str(disk)], env=_env(), capture_output=True)
    assert out.returncode == 27  # EFBIG
    assert list(disk.iterdir()) == []


@pytest.mark.ray
def test_disk_full_mid_run_is_one_line_no_retry_no_tmp(tmp_path):
    """The run folder's file system fills up after epoch 1: one line, exit 1, no retry, no .tmp files."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT variant is the atomic-write test")
    try:
        run_dir = disk / "full"
        proc = subprocess.Popen(
            [EXE, "train", DEMO, *FAST, "train.epochs=30", f"output_dir={disk}", "run_name=full"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        wait_for(lambda: (run_dir / "checkpoint_000001" / "epoch.txt").is_file() or proc.poll() is not None)
        _fill(disk)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("cmd-dist: error:")]
        assert len(errors) == 1 and "cannot write to the run folder" in errors[0], err[-3000:]
        assert "No space left on device" in errors[0] and f"--resume {run_dir}" in errors[0]
        assert "was lost" not in err and not _our_tracebacks(err)
        assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
        assert newest_complete_checkpoint(run_dir, 2, warn=lambda m: None) is not None  # the last good one
    finally:
        _umount(disk)


def test_read_only_output_dir_is_one_line_exit_2_before_ray(tmp_path):
    disk = tmp_path / "ro"
    if not _mount_tmpfs(disk, "1m", readonly=True):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        out = _cli("train", DEMO, f"output_dir={disk}", "run_name=x", cwd=tmp_path)
    finally:
        _umount(disk)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write the run folder" in lines[0] and "Read-only file system" in lines[0]


# ----------------------------------------------------------------------------- the run-folder lock


def test_a_run_folder_is_locked_by_its_run(tmp_path):
    run_dir = tmp_path / "run"
    held = RunLock(run_dir).acquire()
    code = "import sys; from cmd_dist.runs.lock import RunLock\nRunLock(sys.argv[1]).acquire()"
    other = subprocess.run([sys.executable, "-c", code, str(run_dir)], env=_env(), capture_output=True, text=True)
    assert other.returncode != 0 and "RunFolderBusy" in other.stderr and f"pid {os.getpid()}" in other.stderr
    held.release()
    again = subprocess.run([sys.executable, "-c", code, str(run_dir)], env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr  # released (a dead holder releases it too)
    with pytest.raises(RunFolderBusy):
        with RunLock(run_dir):
            RunLock(run_dir).acquire()


def test_a_second_run_of_the_same_name_is_refused_while_the_first_runs(tmp_path):
    """The first run holds the lock (here: this process, as a running `cmd-dist train` does)."""
    cfg_args = [DEMO, "train.epochs=1", f"output_dir={tmp_path}", "run_name=twin"]
    from cmd_dist.launch import job
    from cmd_dist.runs import lock

    job.resolve_run_dir(load_config(DEMO, cfg_args[1:]))  # takes the lock, writes config.yaml
    try:
        out = _cli("train", *cfg_args, cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "is in use by another cmd-dist run" in lines[0] and f"pid {os.getpid()}" in lines[0]
        resumed = _cli("train", "--resume", str(tmp_path / "twin"), cwd=tmp_path)
        assert resumed.returncode == 2 and "in use by another cmd-dist run" in resumed.stderr
        assert not (tmp_path / "twin" / "metrics.jsonl").exists()
    finally:
        lock._HELD.pop(tmp_path / "twin").release()


def test_the_same_run_name_with_a_different_config_is_refused(tmp_path):
    from cmd_dist.launch import job

    job.resolve_run_dir(load_config(DEMO, ["train.epochs=2", f"output_dir={tmp_path}", "run_name=r"]))
    before = (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(
        ConfigError, match=r"run_name: 'r' already exists .* with a different config; use 'cmd-dist train --resume"
    ):
        job.resolve_run_dir(load_config(DEMO, ["train.epochs=3", f"output_dir={tmp_path}", "run_name=r"]))
    assert (tmp_path / "r" / "config.yaml").read_text() == before


# ----------------------------------------------------------------------------- addresses, YAML, signals


def test_no_address_means_a_fresh_local_ray(monkeypatch):
    """Never address=None (which joins whatever ray_current_cluster names); 'local' starts a new one."""
    from cmd_dist.launch import cluster

    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda address=None, **kw: seen.update(address=address, **kw))
    cluster.init_ray(load_config(DEMO))
    assert seen["address"] == "local" and seen["_node_ip_address"] == "127.0.0.1"
    assert seen["include_dashboard"] is False


def test_an_address_nobody_answers_is_one_line_in_seconds():
    import socket

    from cmd_dist.launch import cluster

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    start = time.time()
    with pytest.raises(ConfigError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        cluster.check_reachable(f"127.0.0.1:{port}", timeout=2.0)
    assert time.time() - start < 5


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  lr: [0.1\nmethod:\n  eta: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "is not valid YAML: line " in str(e.value) and "\n" not in str(e.value)
    tabs = tmp_path / "tabs.yaml"
    tabs.write_text("train:\n  epochs: 3\n\tlr: 0.1\n")
    with pytest.raises(ConfigError, match="line 3, column 1"):
        load_config(tabs)


def test_sigterm_and_sigint_both_raise_keyboard_interrupt():
    from cmd_dist.launch.session import sigterm_as_interrupt

    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            sigterm_as_interrupt()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])


# ----------------------------------------------------------------------------- Ctrl-C (subprocesses)


def _our_tracebacks(err: str) -> bool:
    """A traceback through cmd-dist's code or an error it raised. (Ray's PlacementGroupCleaner thread
    prints one of its own when several Ray instances run on one machine, as in this test session.)"""
    return f'File "{REPO}' in err or "AttributeError" in err or "KeyboardInterrupt" in err


def _epochs_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line)["epoch"])
        except ValueError:
            pass
    return max(rows, default=0)


@pytest.mark.ray
def test_ctrl_c_on_train_with_a_stale_cluster_file(tmp_path):
    """A dead cluster named in ray_current_cluster is ignored (a fresh local Ray starts: the old code
    hung on it); Ctrl-C to the process group exits 130 within seconds with the --resume command."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay < 108
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")  # nobody there
    env = _env(RAY_TMPDIR=str(ray_tmp))
    env.pop("RAY_ADDRESS", None)
    run_dir = tmp_path / "ctrlc"
    args = [EXE, "train", DEMO, *FAST, "train.epochs=30", f"output_dir={tmp_path}", "run_name=ctrlc"]
    try:
        proc = subprocess.Popen(
            args,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        wait_for(lambda: _epochs_logged(run_dir) >= 2 or proc.poll() is not None, timeout=180)
        sent = time.time()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=60)
        took = time.time() - sent
        assert proc.returncode == 130, err[-3000:]
        assert took < 20, took
        assert f"cmd-dist train --resume {run_dir}" in err and not _our_tracebacks(err), err[-3000:]
        done = checkpoint_epoch(newest_complete_checkpoint(run_dir, 2, warn=lambda m: None))
        assert 2 <= done < 30 and f"epochs 1-{done} are checkpointed" in err
        # (resuming after an interrupt, asserting the epoch: test_ray_train.py's SIGTERM test)
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)])


@pytest.mark.ray
def test_ctrl_c_on_tune_exits_130_with_the_resume_command(tmp_path):
    run = tmp_path / "search"
    args = [
        EXE,
        "tune",
        DEMO,
        *FAST,
        "train.epochs=30",
        f"output_dir={tmp_path}",
        "run_name=search",
        "--trials",
        "2",
        "--no-asha",
        "--no-final",
        "--max-concurrent",
        "1",
    ]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    wait_for(
        lambda: any(_epochs_logged(p) >= 1 for p in (run / "trials").glob("trial_*")) or proc.poll() is not None,
        timeout=240,
    )
    sent = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert time.time() - sent < 20
    assert f"cmd-dist tune --resume {run}" in err and not _our_tracebacks(err), err[-3000:]
    assert (run / "search.yaml").is_file()


# ----------------------------------------------------------------------------- a killed driver (issue 18.1)


def _ray_tree(root: int) -> dict[int, str]:
    """pid -> start time of ``root``'s descendants (the local Ray a `cmd-dist train` process started)."""
    procs: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            procs[int(entry.name)] = (int(rest[1]), rest[19])
    found: dict[int, str] = {}
    stack = [pid for pid, (ppid, _) in procs.items() if ppid == root]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found[pid] = procs[pid][1]
            stack.extend(p for p, (ppid, _) in procs.items() if ppid == pid)
    return found


def _still_running(tree: dict[int, str]) -> list[int]:
    alive = []
    for pid, start in tree.items():
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] == start:
                alive.append(pid)
        except (OSError, IndexError):
            pass
    return alive


def _folder_state(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")}


@pytest.mark.ray
def test_a_killed_driver_takes_its_workers_with_it_and_resume_follows(tmp_path):
    """SIGKILL to `cmd-dist train` (no handler of its own runs): the local Ray it started goes with it (Ray alone let
    the workers train on for epochs and left its agents running for good), nothing more is written into the run
    folder, and `--resume` finishes the run."""
    run_dir = tmp_path / "killed"
    epochs = 8
    args = [EXE, "train", DEMO, *FAST, f"train.epochs={epochs}", f"output_dir={tmp_path}", "run_name=killed"]
    proc = subprocess.Popen(
        args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env()
    )
    try:
        wait_for(lambda: (run_dir / "checkpoint_000001" / "epoch.txt").is_file() or proc.poll() is not None, 240)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        tree = _ray_tree(proc.pid)
        assert any("raylet" in Path(f"/proc/{p}/cmdline").read_text() for p in _still_running(tree))
        proc.kill()  # SIGKILL
        proc.wait(30)
        killed_at = _epochs_logged(run_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: not _still_running(tree), 60)  # every process of its Ray, agents included
    before = _folder_state(run_dir)
    time.sleep(3)
    assert _folder_state(run_dir) == before  # nothing writes there any more
    # At most the epoch in flight when the driver died was finished (Ray alone: several more).
    assert _epochs_logged(run_dir) <= killed_at + 1 < epochs
    out = _cli("train", "--resume", str(run_dir), cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(rows) == sorted(list(range(1, epochs + 1)) * 2), rows  # every epoch once per peer
    assert json.loads((run_dir / "summary.json").read_text())["epochs_run"] == epochs
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "workers").glob("rank*.json"))]
    assert ranks and all(r["node_ip"] == "127.0.0.1" for r in ranks), ranks  # not the machine's address


def test_a_new_run_waits_for_workers_of_a_dead_driver(tmp_path, monkeypatch):
    """A worker holds .workers.lock (shared) while it trains; a run of the same folder (its driver's .lock free,
    as after a killed driver) waits for it and refuses in one line if it never ends; it starts once it is gone."""
    from cmd_dist.runs import lock

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    code = (
        "import sys, time\n"
        "from cmd_dist.runs.lock import hold_workers_lock\n"
        "fd = hold_workers_lock(sys.argv[1])\n"
        "print('HELD' if fd is not None else 'NONE', flush=True)\n"
        "sys.stdin.read()\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout.readline().strip() == "HELD"
        with pytest.raises(ConfigError, match=r"workers of an earlier run of it still hold \.workers\.lock"):
            lock.wait_for_old_workers(run_dir, timeout=0.5)
        monkeypatch.setattr(lock, "OLD_WORKERS_WAIT_S", 0.5)
        with pytest.raises(ConfigError, match="still hold"):
            lock.hold_run_lock(run_dir)
        assert run_dir not in lock._HELD  # refused: the folder's own lock is not kept either
        worker.stdin.close()  # the worker ends: its lock goes with it
        worker.wait(30)
        lock.wait_for_old_workers(run_dir, timeout=0.5)
    finally:
        if worker.poll() is None:
            worker.kill()
