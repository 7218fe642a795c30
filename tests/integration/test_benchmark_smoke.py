"""The throughput benchmark's in-process rows, tiny: same images per epoch, sane rates, a table, threads restored."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from tests.conftest import REPO


def _load_benchmark():
    path = Path(REPO) / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("cmd_bench_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_in_process_rows_time_the_same_epochs(tmp_path):
    bench = _load_benchmark()
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    info = bench.main(
        ["--device", "cpu", "--skip-ray", "--steps", "2", "--epochs", "2", "--warmup", "1", "--json", str(out)]
    )
    assert torch.get_num_threads() == threads  # the benchmark's set_num_threads(1) does not leak
    rows = {r["key"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == ["a", "b", "c"]
    assert [rows[k]["peers"] for k in "abc"] == [1, 2, 2]
    for r in rows.values():
        assert r["images"] == 2 * 128  # --steps 2: every row's epoch is the same 256 images
        assert len(r["seconds"]) == 2 and all(s > 0 for s in r["seconds"])
        assert r["images_per_s_per_peer"] > 0
    assert rows["a"]["ratio_to_a"] == 1.0
    assert "| (c) | cmd-dist, CMD-P + Mconf" in info["table"] and "CMD overhead, (c) vs (b)" in info["table"]


def test_replicas_benchmark_times_both_rows_in_the_same_processes(tmp_path):
    """benchmarks/replicas.py, tiny: 2 peers x 2 replicas (4 gloo processes), one timed epoch of each row."""
    import subprocess

    out = tmp_path / "replicas.json"
    run = subprocess.run(
        [sys.executable, str(Path(REPO) / "benchmarks" / "replicas.py"), "--epochs", "1", "--warmup", "0"]
        + ["--batch-size", "256", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["images"] == 1438 and sorted(res["times"]) == ["cmd", "plain"]
    assert all(len(ts) == 1 and ts[0] > 0 for ts in res["times"].values())
    assert res["ratio"] == res["rate"]["cmd"] / res["rate"]["plain"] > 0
    assert "| (b) cmd-dist CMD-P + Mconf, replicas_per_peer=2 |" in run.stdout
