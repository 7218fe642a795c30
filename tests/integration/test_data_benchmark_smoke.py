"""The input-pipeline benchmark, tiny: every row passes over every file once, rates are positive, a table is printed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from tests.conftest import REPO


def test_data_throughput_rows_pass_over_every_file(tmp_path):
    path = Path(REPO) / "benchmarks" / "data_throughput.py"
    spec = importlib.util.spec_from_file_location("cmd_bench_data_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    info = bench.main(
        [
            "--images",
            "24",
            "--workers",
            "0",
            "--batch",
            "8",
            "--size",
            "32",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--root",
            str(tmp_path / "jpegs"),
            "--model",
            "cnn_small",
            "--json",
            str(out),
        ]
    )
    rows = {r["key"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == ["a", "b", "c", "e", "f"] and info["images"] == 24
    assert all(r["images_per_s"] > 0 and len(r["seconds"]) == 1 for r in rows.values())
    assert rows["a"]["ratio_to_a"] == 1.0 and "| (b) | cmd-dist streamed, 1 peer" in info["table"]
