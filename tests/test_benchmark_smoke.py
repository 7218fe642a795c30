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
