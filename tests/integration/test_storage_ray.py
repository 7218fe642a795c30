"""A run behind a file:// URI resumed on a real local Ray (the runs layer's integration test)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from cmd_dist.config import load_config
from cmd_dist.runs import storage
from cmd_dist.train.local import run_local
from tests.conftest import REPO
from tests.unit.runs.test_checkpoint import FAST
from tests.unit.runs.test_storage import _stop_before

DEMO = os.path.join(REPO, "configs", "demo.yaml")


@pytest.mark.ray
def test_ray_run_resumes_from_a_file_uri(tmp_path, ray_cluster, capsys):
    """Epochs 1-2 written to a file:// URI (in-process, stopped before epoch 3); ``cmd-dist train --resume URI``
    on Ray: both workers download their peers from the URI, train epoch 3 and upload; nothing staged is left."""
    from cmd_dist import cli
    from cmd_dist.launch import job

    uri = f"file://{tmp_path}/shared"
    cfg = load_config(DEMO, FAST + [f"output_dir={uri}", "run_name=ray-uri"])
    run_dir = job.resolve_run_dir(cfg)
    with pytest.raises(KeyboardInterrupt):
        run_local(cfg, run_dir, fault_hook=_stop_before(3))
    capsys.readouterr()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["train", "--resume", run_dir]) == 0
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    out = capsys.readouterr().out
    assert f"run folder {run_dir}" in out and f"summary: {run_dir}/summary.json" in out
    assert "epoch 3/3" in out and "epoch 2/3" not in out
    folder = tmp_path / "shared" / "ray-uri"
    workers = [json.loads((folder / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [w["resumed_after_epoch"] for w in workers] == [2, 2] and workers[0]["pid"] != workers[1]["pid"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["run_dir"] == run_dir
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 1, 2, 2, 3, 3]
    assert sorted(p.name for p in folder.glob("checkpoint_*")) == ["checkpoint_000002", "checkpoint_000003"]
    state = torch.load(folder / "checkpoint_000003" / "peer1.pt", weights_only=True)
    assert state["epoch"] == 3
    assert list(storage.staging_root().glob("*-ray-uri-p*")) == []  # every worker removed its staging folder
