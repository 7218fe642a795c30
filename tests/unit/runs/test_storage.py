"""output_dir as a filesystem URI (issue 13, point 2): the store on pyarrow's in-memory mock filesystem,
real in-process runs through a ``file://`` URI, and one Ray run that resumes from the URI.

The URI path is exercised for real: everything goes through pyarrow (``file://`` is pyarrow's local
filesystem, the mock one lives in memory), never through the local-folder code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pyarrow.fs
import pytest
import torch

from cmd_dist.config import ConfigError, load_config
from cmd_dist.errors import RunFolderBusy
from cmd_dist.runs import fs as runs_fs
from cmd_dist.runs import lock as runs_lock
from cmd_dist.runs import storage
from cmd_dist.runs.checkpoint import (
    checkpoint_names,
    load_peer_state,
    marker_epoch,
    newest_epoch,
    save_peer_state,
    select_pruned,
    stale,
    write_epoch_marker,
)
from cmd_dist.runs.fs import LocalFolder, Remote, open_folder
from cmd_dist.runs.lock import RunLock, UriRunLock, lock_run
from cmd_dist.runs.run_folder import mirror_for_report, open_run_folder, read_run_file
from cmd_dist.runs.storage import RunStore
from cmd_dist.train.local import run_local
from tests.conftest import REPO
from tests.unit.runs.test_checkpoint import FAST  # 3 quick epochs on 512 digits, knowledge flowing from epoch 1

DEMO = os.path.join(REPO, "configs", "demo.yaml")


def _cfg(extra=()):
    return load_config(None, FAST + list(extra))


class Recording(Remote):
    """A Remote that records every upload and delete, in order."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.log: list[tuple[str, str]] = []

    def upload(self, local, rel):
        self.log.append(("upload", rel))
        super().upload(local, rel)

    def delete_dir(self, rel):
        self.log.append(("delete", rel))
        super().delete_dir(rel)


def _mock_store(fs=None, name="r") -> RunStore:
    fs = fs or pyarrow.fs._MockFileSystem()
    return RunStore(f"mock://bucket/runs/{name}", Recording(fs, f"bucket/runs/{name}", f"mock://bucket/runs/{name}"))


def _stop_before(epoch):
    def hook(rank, e):
        if e == epoch:
            raise KeyboardInterrupt(f"stopped before epoch {e}")

    return hook


# ----------------------------------------------------------------------------- config and bad URIs


def test_uri_output_dir_is_accepted_and_bad_ones_are_one_line():
    for uri in ("s3://bucket/runs", "gs://bucket/runs", "hdfs://namenode:8020/runs", "file:///shared/runs"):
        assert load_config(DEMO, [f"output_dir={uri}"]).output_dir == uri
    with pytest.raises(ConfigError, match=r"output_dir: 'nosuch://b/runs' is not a filesystem URI .*scheme 'nosuch'"):
        load_config(DEMO, ["output_dir=nosuch://b/runs"])
    with pytest.raises(ConfigError, match=r"output_dir: '://x' is not a filesystem URI .*no scheme.*file:///shared"):
        load_config(DEMO, ["output_dir=://x"])
    with pytest.raises(ConfigError, match=r"'file://runs': a file:// URI needs an absolute path .*file:///shared"):
        load_config(DEMO, ["output_dir=file://runs"])
    with pytest.raises(ConfigError, match=r"'s3:///runs' names no bucket or host"):
        load_config(DEMO, ["output_dir=s3:///runs"])


def test_bad_uri_scheme_on_the_command_line_is_one_line_exit_2(capsys):
    from cmd_dist import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["train", DEMO, "output_dir=nosuch://bucket/runs"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("cmd-dist: error: output_dir: 'nosuch://bucket/runs' is not a filesystem URI")
    assert "s3://bucket/runs" in err  # the fix


def test_a_uri_that_cannot_be_opened_is_a_config_error():
    with pytest.raises(ConfigError, match=r"output_dir: cannot open 'hdfs://nn:8020/runs' \(.*\); check the URI"):
        runs_fs.open_filesystem("hdfs://nn:8020/runs")  # no Hadoop client here: refused in one line


def test_submit_accepts_a_uri_output_dir_and_still_refuses_a_relative_folder():
    from cmd_dist.launch.submit import check_job_config

    check_job_config(load_config(DEMO, ["output_dir=s3://bucket/runs"]))
    with pytest.raises(
        ConfigError, match=r"output_dir: 'runs' is relative; .* or a URI \(output_dir=s3://bucket/runs\)"
    ):
        check_job_config(load_config(DEMO, ["output_dir=runs"]))


def test_tune_takes_a_uri_output_dir_and_refuses_bad_ones_in_one_line(tmp_path):
    """The search folder is ``output_dir/run_name`` on the URI (a str, never resolved as a local path); a bad
    scheme is the same one line as for ``train`` (exit 2, before Ray)."""
    from cmd_dist.cli import build_parser
    from tune.search import prepare

    def args(*over):
        return build_parser().parse_args(["tune", DEMO, *over, "--trials", "2"])

    job = prepare(args(f"output_dir=file://{tmp_path}/runs/", "run_name=s"))
    assert job.search_dir == f"file://{tmp_path}/runs/s" and job.is_uri
    assert (
        job.experiment_dir == f"file://{tmp_path}/runs/s/trials" and job.base["output_dir"] == f"file://{tmp_path}/runs"
    )
    assert not (tmp_path / "runs").exists()  # nothing written while checking
    with pytest.raises(ConfigError, match=r"^output_dir: 'nosuch://b/runs' is not a filesystem URI") as err:
        prepare(args("output_dir=nosuch://b/runs"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"a file:// URI needs an absolute path"):
        prepare(args("output_dir=file://runs"))


# ----------------------------------------------------------------------------- the store on the mock filesystem


def test_a_config_file_behind_a_uri_loads_and_a_missing_one_is_one_line(tmp_path):
    """``cmd-dist train s3://.../tune-x/best.yaml``: a config is read through pyarrow like the run's files."""
    (tmp_path / "best.yaml").write_text("train: {epochs: 3}\noutput_dir: s3://b/runs/tune-x\n")
    cfg = load_config(f"file://{tmp_path}/best.yaml", ["seed=4"])
    assert (cfg.train.epochs, cfg.output_dir, cfg.seed) == (3, "s3://b/runs/tune-x", 4)
    with pytest.raises(ConfigError, match=rf"^config file 'file://{tmp_path}/nope.yaml' not found$"):
        load_config(f"file://{tmp_path}/nope.yaml")
    with pytest.raises(ConfigError, match=r"^config file 'nosuch://b/c.yaml': 'nosuch://b' is not a filesystem URI"):
        load_config("nosuch://b/c.yaml")


def test_select_pruned_never_deletes_the_newest_complete_or_the_one_being_written():
    # (folder, epoch, complete)
    folders = [("c1", 1, True), ("c2", 2, True), ("c3", 3, False), ("c4", 4, True), ("c5", 5, False)]
    assert select_pruned(folders, 1) == ["c3", "c2", "c1"]  # c5 (being written) and c4 (newest complete) stay
    assert select_pruned(folders, 2) == ["c3", "c1"]
    assert select_pruned([("c1", 1, False), ("c2", 2, False)], 1) == []  # nothing complete: nothing deleted


def test_checkpoint_uploads_put_the_marker_last_and_prune_on_the_uri():
    store = _mock_store()
    try:
        metrics, rep = run_local(_cfg(["ray.keep_checkpoints=2"]), store)
    finally:
        store.close()
    log = store.folder.log
    ups = [rel for op, rel in log if op == "upload"]
    for epoch in (1, 2, 3):
        name = f"checkpoint_{epoch:06d}"
        mine = [i for i, rel in enumerate(ups) if rel.startswith(name + "/")]
        assert ups[mine[-1]] == f"{name}/epoch.txt"  # the marker is the folder's last upload
        assert {ups[i] for i in mine} == {
            f"{name}/{f}" for f in ("peer0.pt", "peer0.sha256", "peer1.pt", "peer1.sha256", "metrics.json", "epoch.txt")
        }
    best = [i for i, rel in enumerate(ups) if rel.startswith("best_checkpoint/")]
    assert ups[best[-1]] == "best_checkpoint/epoch.txt"
    # Retention on the URI: epoch 1 deleted once epoch 3 was complete (keep 2).
    assert ("delete", "checkpoint_000001") in log
    assert log.index(("delete", "checkpoint_000001")) > log.index(("upload", "checkpoint_000003/epoch.txt"))
    remote = store.folder
    assert checkpoint_names(remote) == ["checkpoint_000003", "checkpoint_000002"]
    assert newest_epoch(remote, 2) == 3
    rows = [json.loads(x) for x in remote.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [(r["epoch"], r["peer"]) for r in rows] == [(e, p) for e in (1, 2, 3) for p in ("peer0", "peer1")]
    assert any(f.startswith("tb/peer0/events.out.tfevents") for f in remote.files())
    assert json.loads(remote.read_bytes("workers/rank0.json"))["resumed_after_epoch"] == 0
    assert not store.dir.exists()  # staging removed


def test_logs_are_on_the_uri_after_every_epoch():
    """metrics.jsonl reaches the URI when each epoch ends, not only at the end of the run."""
    store = _mock_store()
    seen = []

    def hook(rank, epoch):
        data = store.folder.read_bytes("metrics.jsonl")
        seen.append(len(data.decode().splitlines()) if data else 0)

    try:
        run_local(_cfg(["train.checkpoint_every=10"]), store, fault_hook=hook)
    finally:
        store.close()
    assert seen == [0, 2, 4]  # two peers' rows per finished epoch, before any checkpoint but the last


def test_prune_on_the_uri_keeps_the_newest_complete_and_the_one_being_written(tmp_path):
    fs = pyarrow.fs._MockFileSystem()
    remote = Remote(fs, "b/run", "mock://b/run")

    def folder(epoch, marker=True, peers=2):
        name = f"checkpoint_{epoch:06d}"
        for k in range(peers):
            remote.write_bytes(f"{name}/peer{k}.pt", b"x")
            remote.write_bytes(f"{name}/peer{k}.sha256", b"y")
        if marker:
            remote.write_bytes(f"{name}/epoch.txt", str(epoch).encode())

    folder(1)
    folder(2)
    folder(3, peers=1)  # a worker's files missing: not complete
    folder(4, marker=False)  # being written
    store = RunStore("mock://b/run", remote)
    try:
        removed = store.prune(1, 2, set())
    finally:
        store.close()
    assert removed == ["mock://b/run/checkpoint_000001"]  # 3 is older than nothing complete: kept, as is 4
    assert checkpoint_names(remote) == ["checkpoint_000004", "checkpoint_000003", "checkpoint_000002"]
    folder(5)
    assert RunStore("mock://b/run", remote).prune(1, 2, set()) == [
        f"mock://b/run/checkpoint_00000{e}" for e in (4, 3, 2)
    ]


def test_resume_from_the_uri_skips_incomplete_and_corrupt_checkpoints(capsys):
    fs = pyarrow.fs._MockFileSystem()
    store = _mock_store(fs)
    cfg = _cfg(["ray.keep_checkpoints=3"])
    with pytest.raises(KeyboardInterrupt):
        run_local(cfg, store, fault_hook=_stop_before(3))
    assert not store.dir.exists()  # staging removed on the way out too
    remote = store.folder
    assert checkpoint_names(remote) == ["checkpoint_000002", "checkpoint_000001"]
    # A newer folder whose marker never arrived, and epoch 2 corrupted after its marker was written.
    for f in ("peer0.pt", "peer0.sha256", "peer1.pt", "peer1.sha256", "metrics.json"):
        remote.write_bytes(f"checkpoint_000003/{f}", remote.read_bytes(f"checkpoint_000002/{f}"))
    data = remote.read_bytes("checkpoint_000002/peer1.pt")
    remote.write_bytes("checkpoint_000002/peer1.pt", data[:-7])
    again = _mock_store(fs)
    try:
        metrics, rep = run_local(cfg, again)
    finally:
        again.close()
    out = capsys.readouterr().out
    assert "skipping checkpoint mock://bucket/runs/r/checkpoint_000003: incomplete (no epoch.txt" in out
    assert "skipping checkpoint mock://bucket/runs/r/checkpoint_000002: checkpoint file" in out
    assert "truncated or corrupted" in out
    assert "resuming from mock://bucket/runs/r/checkpoint_000001 (epoch 1 done)" in out
    assert [r["epoch"] for r in rep.reports] == [2, 3]
    assert json.loads(remote.read_bytes("workers/rank0.json"))["resumed_after_epoch"] == 1
    # The stale folders past the resume point were cleared before training; each epoch's folder is this run's.
    assert marker_epoch(remote, "checkpoint_000003") == 3 and newest_epoch(remote, 2) == 3
    rows = [json.loads(x) for x in remote.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 1, 2, 2, 3, 3]  # truncated to the resumed epoch, no duplicates


def test_staging_folders_are_private_and_dead_ones_are_cleaned(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path))
    fs = pyarrow.fs._MockFileSystem()
    a = RunStore("mock://b/runs/x", Remote(fs, "b/runs/x", "mock://b/runs/x"))
    b = RunStore("mock://b/runs/x", Remote(fs, "b/runs/x", "mock://b/runs/x"))
    c = RunStore("mock://b/other/x", Remote(fs, "b/other/x", "mock://b/other/x"))
    assert len({a.dir, b.dir, c.dir}) == 3 and all(s.dir.parent == tmp_path / "cmd-dist-staging" for s in (a, b, c))
    # Another output_dir with the same run name never shares a prefix: no orphan cleanup across runs.
    assert a.dir.name.split("-p")[0] != c.dir.name.split("-p")[0]
    dead = a.dir.parent / (a.dir.name.split("-p")[0] + "-p999999999-zz")  # a pid that cannot exist
    (dead / "checkpoint_000001").mkdir(parents=True)
    d = RunStore("mock://b/runs/x", Remote(fs, "b/runs/x", "mock://b/runs/x"))
    assert not dead.exists() and a.dir.exists() and b.dir.exists()  # live processes' folders are left alone
    for s in (a, b, c, d):
        s.close()
        assert not s.dir.exists()


def test_dead_staging_of_a_run_is_swept_and_live_ones_stay(tmp_path, monkeypatch):
    """What ``cmd-dist tune`` runs on every node for its trials when the search ends (for killed workers)."""
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path))
    uri = "s3://b/runs/s/trials/trial_1"
    root = tmp_path / "cmd-dist-staging"
    prefix = storage._staging_prefix(uri)
    dead, live, mine = (root / f"{prefix}{pid}-x" for pid in (999999999, os.getppid(), os.getpid()))
    other = root / f"{storage._staging_prefix('s3://b/runs/s/trials/trial_2')}999999999-x"
    for folder in (dead, live, mine, other):
        (folder / "checkpoint_000001").mkdir(parents=True)
    assert storage.remove_dead_staging(uri) == 1
    assert not dead.exists() and live.exists() and mine.exists() and other.exists()


def test_uri_run_lock_is_best_effort_with_a_heartbeat(monkeypatch):
    monkeypatch.setattr(UriRunLock, "SETTLE_S", 0.0)
    fs = pyarrow.fs._MockFileSystem()
    remote = Remote(fs, "b/run", "mock://b/run")
    first = UriRunLock("mock://b/run", remote).acquire()
    with pytest.raises(ConfigError, match=r"run folder mock://b/run is in use by another cmd-dist run \(pid \d+ on"):
        UriRunLock("mock://b/run", remote).acquire()
    first.release()
    assert remote.read_bytes(".lock") is None
    # A lock whose run died (no heartbeat for STALE_S) is taken over.
    stale = {"pid": 1, "host": "gone", "since": "then", "token": "old", "heartbeat": 0}
    remote.write_bytes(".lock", json.dumps(stale).encode())
    second = UriRunLock("mock://b/run", remote).acquire()
    assert json.loads(remote.read_bytes(".lock"))["token"] == second.token
    second.release()


# ----------------------------------------------------------------------------- one interface, folders and URIs alike


def _folder(kind, tmp_path):
    """The same run folder as a folder of this machine or behind a URI (pyarrow's in-memory mock filesystem)."""
    if kind == "folder":
        return LocalFolder(tmp_path / "run")
    return Remote(pyarrow.fs._MockFileSystem(), "b/run", "mock://b/run")


@pytest.mark.parametrize("kind", ["folder", "uri"])
def test_a_folder_and_a_uri_answer_the_same_interface_alike(kind, tmp_path):
    folder = _folder(kind, tmp_path)
    assert folder.read_bytes("a/b.txt") is None and not folder.is_file("a/b.txt") and not folder.is_dir("a")
    assert folder.files() == [] and folder.dirs() == [] and folder.files("nothing") == []
    folder.write_bytes("a/b.txt", b"one")
    src = tmp_path / "src.bin"
    src.write_bytes(b"two" * 1000)
    folder.upload(src, "c.bin")
    assert folder.read_bytes("a/b.txt") == b"one" and folder.is_file("a/b.txt") and folder.is_dir("a")
    assert folder.files() == ["a/b.txt", "c.bin"] and folder.files("a") == ["a/b.txt"] and folder.dirs() == ["a"]
    assert folder.files("", recursive=False) == ["c.bin"]
    assert folder.uri("a/b.txt") == f"{folder.shown}/a/b.txt" and folder.uri() == folder.shown
    out = tmp_path / "out" / "c.bin"
    assert folder.download("c.bin", out) and out.read_bytes() == src.read_bytes()
    missing = tmp_path / "out" / "nope.bin"
    assert not folder.download("nope.bin", missing) and not missing.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.bin"]  # no temporary file left
    folder.delete_file("c.bin")
    folder.delete_file("c.bin")  # gone already: nothing
    folder.delete_dir("a")
    folder.delete_dir("a")
    assert folder.files() == [] and folder.dirs() == []
    assert (folder.local is None) == (kind == "uri")
    assert isinstance(open_folder(tmp_path), LocalFolder) and isinstance(open_folder(f"file://{tmp_path}/"), Remote)
    assert runs_fs.arrow_storage(tmp_path) == (None, str(tmp_path))
    assert mirror_for_report(tmp_path, tmp_path / "copy") == tmp_path and not (tmp_path / "copy").exists()
    arrow, path = runs_fs.arrow_storage(f"file://{tmp_path}/x/")
    assert arrow.type_name == "local" and path == f"{tmp_path}/x"


def _checkpoint(folder, tmp_path, epoch, peers=(0, 1), marker=True, corrupt=False):
    """Checkpoint ``epoch`` written as a run writes it (real peer files), then put into ``folder``."""
    name = f"checkpoint_{epoch:06d}"
    local = tmp_path / "made" / name
    local.mkdir(parents=True)
    for k in peers:
        save_peer_state(local, k, {"epoch": epoch, "w": torch.full((3,), float(k))})
    if corrupt:
        (local / "peer1.pt").write_bytes((local / "peer1.pt").read_bytes()[:-9])
    if marker:
        write_epoch_marker(local, epoch)
    for path in sorted(local.iterdir()):
        folder.upload(path, f"{name}/{path.name}")


@pytest.mark.parametrize("kind", ["folder", "uri"])
def test_the_checkpoint_policy_is_one_for_a_folder_and_a_uri(kind, tmp_path):
    """Resume choice, its warnings, stale clearing and retention: the same answers for a folder and a URI."""
    folder = _folder(kind, tmp_path)
    _checkpoint(folder, tmp_path, 1)
    _checkpoint(folder, tmp_path, 2)
    _checkpoint(folder, tmp_path, 3, corrupt=True)  # listed whole, fails verification
    _checkpoint(folder, tmp_path, 4, peers=(0,))  # marker written, a worker's files never arrived
    _checkpoint(folder, tmp_path, 5, marker=False)  # being written
    store = RunStore(folder.shown, folder)
    try:
        warnings = []
        chosen = store.newest_complete_checkpoint(2, warn=warnings.append)
        assert chosen == store.dir / "checkpoint_000002" and load_peer_state(chosen, 1)["epoch"] == 2
        at = folder.shown
        assert warnings == [
            f"warning: skipping checkpoint {at}/checkpoint_000005: incomplete (no epoch.txt: the run stopped while "
            "writing it)",
            f"warning: skipping checkpoint {at}/checkpoint_000004: checkpoint file {at}/checkpoint_000004/peer1.pt "
            "is missing",
            f"warning: skipping checkpoint {at}/checkpoint_000003: checkpoint file {at}/checkpoint_000003/peer1.pt "
            "is truncated or corrupted (checksum mismatch)",
        ]
        if kind == "uri":
            assert not (store.dir / "checkpoint_000003").exists()  # a download that failed verification is dropped
        assert stale(folder, "checkpoint_000002", 2) == [f"checkpoint_00000{e}" for e in (5, 4, 3)]
        store.clear_stale(chosen, 2)
        assert checkpoint_names(folder) == ["checkpoint_000002", "checkpoint_000001"]
        assert newest_epoch(folder, 2) == 2
        verified = set()
        assert store.prune(1, 2, verified) == [f"{at}/checkpoint_000001"]
        assert checkpoint_names(folder) == ["checkpoint_000002"] and verified == {store.dir / "checkpoint_000002"}
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["folder", "uri"])
def test_a_run_folder_is_made_ready_alike_for_a_folder_and_a_uri(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(UriRunLock, "SETTLE_S", 0.0)
    output_dir = str(tmp_path / "runs") if kind == "folder" else f"file://{tmp_path}/runs"
    run_dir = open_run_folder(output_dir, "r", "a: 1\n", "abc")
    try:
        assert run_dir == (tmp_path / "runs" / "r" if kind == "folder" else f"{output_dir}/r")
        on_disk = tmp_path / "runs" / "r"
        assert (on_disk / "config.yaml").read_text() == "a: 1\n" and (on_disk / "git_rev.txt").read_text() == "abc\n"
        assert (on_disk / ".lock").is_file()  # locked, until this process exits
        assert read_run_file(run_dir, "config.yaml") == b"a: 1\n" and read_run_file(run_dir, "nope") is None
        assert open_run_folder(output_dir, "r", "a: 1\n", "abc") == run_dir  # the same config: continues
        with pytest.raises(
            ConfigError,
            match=re.escape(
                f"run_name: 'r' already exists in {output_dir} with a different config; use 'cmd-dist train --resume "
                f"{run_dir}' to continue it, or choose a new run_name"
            ),
        ):
            open_run_folder(output_dir, "r", "a: 2\n", "abc")
    finally:
        runs_lock._HELD.pop(run_dir).release()


def test_lock_run_takes_a_folder_or_a_uri(tmp_path, monkeypatch):
    monkeypatch.setattr(UriRunLock, "SETTLE_S", 0.0)
    held = lock_run(tmp_path / "a")
    assert isinstance(held, RunLock)
    with pytest.raises(RunFolderBusy, match="is in use by another cmd-dist run"):
        lock_run(tmp_path / "a")
    held.release()
    held = lock_run(f"file://{tmp_path}/b/")
    assert isinstance(held, UriRunLock) and held.location == f"file://{tmp_path}/b"
    with pytest.raises(ConfigError, match="is in use by another cmd-dist run"):
        lock_run(f"file://{tmp_path}/b")
    held.release()
    assert not (tmp_path / "b" / ".lock").exists()


def test_the_runs_layer_imports_neither_ray_nor_the_layers_above():
    code = (
        "import sys\n"
        "import cmd_dist.runs.fs, cmd_dist.runs.checkpoint, cmd_dist.runs.storage, cmd_dist.runs.lock\n"
        "import cmd_dist.runs.run_folder\n"
        "bad = ('ray', 'tune', 'cmd_dist.config', 'cmd_dist.train', 'cmd_dist.launch', 'cmd_dist.cli')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad or m.startswith(bad[2:])))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- real runs through file://


def test_a_file_uri_run_equals_a_folder_run_and_resumes_from_the_uri(tmp_path, capsys):
    """In-process, end to end: interrupted after epoch 2, resumed from the URI, equal to a plain folder run."""
    from cmd_dist import cli
    from cmd_dist.launch import job
    from cmd_dist.launch.summary import record_resume, summarize

    cfg = _cfg()
    ref, _ = run_local(cfg, tmp_path / "plain")
    uri = f"file://{tmp_path}/shared/runs"
    cfg = _cfg([f"output_dir={uri}", "run_name=r"])
    run_dir = job.resolve_run_dir(cfg)
    assert run_dir == f"{uri}/r"
    with pytest.raises(KeyboardInterrupt):
        run_local(cfg, run_dir, fault_hook=_stop_before(3))
    assert "epochs 1-2 are checkpointed" in cli.interrupted_message(run_dir, 2)
    metrics, rep = run_local(cfg, run_dir)
    assert [r["epoch"] for r in rep.reports] == [3]
    for key in ("peer0/test_acc", "peer1/test_acc", "peer0/train_loss", "peer1/train_loss"):
        assert metrics[key] == pytest.approx(ref[key], abs=1e-5)
    folder = tmp_path / "shared" / "runs" / "r"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert {"config.yaml", "git_rev.txt", "metrics.jsonl", "workers/rank0.json", ".lock"} <= set(files)
    assert sorted({f.split("/")[0] for f in files if f.startswith("checkpoint_")}) == [
        "checkpoint_000002",
        "checkpoint_000003",
    ]
    assert {f"best_checkpoint/{f}" for f in ("epoch.txt", "metrics.json", "peer0.pt", "peer1.pt")} <= set(files)
    assert [f for f in files if ".tmp" in f] == []  # file:// writes go to a temporary name, then renamed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tb" / "peer0"))
    events.Reload()
    assert [e.step for e in events.Scalars("test/acc")] == [1, 2, 3]
    # Reading the run back from the URI: summary, report, the resume command line.
    summarize(cfg, metrics, run_dir, 1.0)
    assert "resuming from " + run_dir + "/checkpoint_000002 (epoch 2 done)" in capsys.readouterr().out
    assert json.loads((folder / "summary.json").read_text())["run_dir"] == run_dir
    assert cli.main(["report", run_dir]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run_dir}/report/report.md"
    assert "peer0" in (folder / "report" / "report.md").read_text()
    # Extending the run behind the URI: allowed with --allow-changes, and recorded there (issue 18.2).
    r = cli._resume_config(run_dir + "/", ["train.epochs=4"], allow_changes=True)
    assert r.run_dir == run_dir and r.cfg.output_dir == uri and r.cfg.run_name == "r" and r.cfg.train.epochs == 4
    record_resume(r.run_dir, r.text, r.cfg, r.changes, r.done + 1)
    assert "epochs: 4" in (folder / "config.yaml").read_text()
    assert "epochs: 3" in (folder / "config.original.yaml").read_text()
    assert json.loads((folder / "changes.jsonl").read_text())["from_epoch"] == 4


def test_report_and_resume_of_a_missing_uri_folder_name_the_uri(tmp_path, capsys):
    from cmd_dist import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["report", f"file://{tmp_path}/nothing"])
    assert e.value.code == 2
    assert f"file://{tmp_path}/nothing: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", f"file://{tmp_path}/nothing"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"cmd-dist: error: --resume file://{tmp_path}/nothing: no config.yaml there; pass a run folder "
        "written by cmd-dist train"
    )
