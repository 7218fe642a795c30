"""benchmarks/gpu_check.py on CPU, tiny: the throughput rows and a 2-epoch paper-cell slice through the CLI."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SHARED_CIFAR


def _load():
    path = Path(REPO) / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("cmd_gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.ray
def test_gpu_check_tiny_on_cpu(tmp_path):
    if not (Path(SHARED_CIFAR) / "cifar-100-python" / "train").is_file():
        pytest.skip("CIFAR-100 is not in ../shared/data")
    gc = _load()
    out = tmp_path / "out"
    info = gc.main(
        ["--device", "cpu", "--tiny", "--data-root", SHARED_CIFAR, "--budget", "400", "--out", str(out), "--skip", "b"]
    )
    rows = info["throughput"]
    assert [r["peers"] for r in rows] == [1, 2]
    assert all(r["images_per_s_per_peer"] > 0 and math.isfinite(r["ms_per_step"]) for r in rows)
    cell = info["cell"]
    assert cell["rc"] == 0 and not cell["stopped_at_deadline"], cell["log_tail"]
    assert cell["epochs_done"] == 2 and sorted(cell["acc_by_epoch"]) == [1, 2]
    assert (out / "cell_files" / "metrics.jsonl").is_file() and (out / "cell_files" / "summary.json").is_file()
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["cell"]["epochs_done"] == 2
    table = (out / "gpu_check.md").read_text()
    assert table == info["table"] + "\n"
    assert "| (a) | plain PyTorch, 1 model, eager" in table and "| (c) | cmdp_mconf.yaml" in table
    assert "| acc | " in table  # accuracy by epoch


def test_the_cmd_row_checks_the_per_sample_record_on_cpu():
    """Row (a)'s cmd-dist step (eager on CPU; the whole-step graph only runs on CUDA): after its two epochs the
    per-sample record's check passes: every sample seen twice, predicted, and carrying both epochs' weights."""
    if not (Path(SHARED_CIFAR) / "cifar-100-python" / "train").is_file():
        pytest.skip("CIFAR-100 is not in ../shared/data")
    gc = _load()
    args = argparse.Namespace(peers=2, arch="cnn_small", steps=3, warmup_steps=1, batch_size=16, data_root=SHARED_CIFAR)
    row = gc.cmd_row(args, torch.device("cpu"), graph=False)
    assert row["record_ok"] is True and row["peers"] == 2
