"""benchmarks/predict.py, tiny and without Ray: both in-process rows run over the same files and give rates and a
ratio in the summary it writes."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_CIFAR


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_CIFAR, "cifar-100-python")), reason="no CIFAR-100 here")
def test_predict_benchmark_rows_without_ray(tmp_path):
    path = Path(REPO) / "benchmarks" / "predict.py"
    spec = importlib.util.spec_from_file_location("cmd_bench_predict", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    args = ["--images", "48", "--batch-size", "16", "--train-images", "128", "--repeats", "1", "--skip-ray"]
    result = bench.main([*args, "--data-root", SHARED_CIFAR, "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["images"] == 48 and sorted(saved["images_per_s"]) == ["a", "b"]
    assert all(r > 0 for r in saved["images_per_s"].values()) and saved["ratio_to_plain"]["a"] == 1.0
    assert "| (b) | cmd-dist local (DataLoader) |" in result["table"]
