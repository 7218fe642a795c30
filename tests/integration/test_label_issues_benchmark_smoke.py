"""benchmarks/label_issues.py on the CIFAR rows of issue 21 point 3, tiny: the script end to end on a 300-image slice
of CIFAR-100 with 40% symmetric noise (cleanlab, the optional ``bench`` extra, is needed), its configs (the paper's
CIFAR-100 config, the milestones scaled, the digits runs unchanged) and the CIFAR-100N labels both detectors see."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmd_dist.data.human_labels import load_label_file
from tests.conftest import REPO, SHARED_CIFAR

SCRIPT = Path(REPO) / "benchmarks" / "label_issues.py"
NO_CIFAR = not os.path.isdir(os.path.join(SHARED_CIFAR, "cifar-100-python"))
CIFAR_N = os.path.join(SHARED_CIFAR, "cifar-n", "CIFAR-100_human.pt")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("cmd_bench_label_issues", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_configs_per_dataset_and_digits_unchanged():
    bench = _load_benchmark()
    # digits: the demo config with exactly the overrides the cited results ran with ([14, 18] of 20 epochs)
    digits = bench.parse_args([])
    assert digits.settings == ["symmetric:0.2", "symmetric:0.4", "pairflip:0.2", "pairflip:0.4"]
    expected = bench.load_config(
        Path(REPO) / "configs" / "demo.yaml",
        [
            "noise.kind=pairflip",
            "noise.rate=0.4",
            "noise.seed=2",
            "seed=2",
            "train.epochs=20",
            "train.milestones=[14, 18]",
            "train.log_every=0",
            "train.checkpoint_every=20",
        ],
    )
    assert bench.make_config(digits, "pairflip", "0.4", 2, 20) == expected
    assert bench.make_config(digits, "symmetric", "0.2", 0, 8).train.milestones == [6, 7]
    assert bench.default_out("digits", "D").name == "D-label-issues"  # the cited folder, never a CIFAR one
    # CIFAR-100: paper Table 1's CMD-P + Mconf cell, ResNet-34, 40% symmetric; [50, 80] of 100 epochs scaled
    cifar = bench.parse_args(["--dataset", "cifar100", "--data-root", SHARED_CIFAR])
    assert cifar.parsed == [("symmetric", "0.4", "symmetric 40%")]
    cfg = bench.make_config(cifar, "symmetric", "0.4", 1, 200)
    assert cfg.peers[0].arch == cfg.peers[1].arch == "resnet34" and cfg.train.milestones == [100, 160]
    assert (cfg.method.knowledge, cfg.method.self_kd, cfg.train.lr, cfg.train.batch_size) == (
        "cmd-p",
        "mconf",
        0.1,
        128,
    )
    assert (cfg.noise.kind, cfg.noise.rate, cfg.noise.seed, cfg.seed, cfg.data.root) == (
        "symmetric",
        0.4,
        1,
        1,
        SHARED_CIFAR,
    )
    assert bench.make_config(cifar, "symmetric", "0.4", 0, 1).train.milestones == [1, 1]  # 1/K run of 2 epochs
    assert bench.default_out("cifar100n", "D").name == "D-label-issues-cifar100n"
    small = bench.parse_args(["--dataset", "cifar100n", "--arch", "cnn_small", "--train-subset", "300"])
    cfg = bench.make_config(small, *small.parsed[0][:2], 0, 10)
    assert (cfg.noise.kind, cfg.noise.label_set, cfg.data.train_subset) == ("human", "noisy_fine", 300)
    assert [p.arch for p in cfg.peers] == ["cnn_small", "cnn_small"] and [p.name for p in cfg.peers] == [
        "peerA",
        "peerB",
    ]


@pytest.mark.parametrize(
    "argv",
    [["--dataset", "cifar100n", "--settings", "symmetric:0.4"], ["--dataset", "digits", "--settings", "human:x"]],
)
def test_a_setting_that_does_not_fit_the_dataset_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _load_benchmark().parse_args([*argv, "--data-root", SHARED_CIFAR])
    assert e.value.code == 2 and "does not fit --dataset" in capsys.readouterr().err


@pytest.mark.skipif(NO_CIFAR or not os.path.isfile(CIFAR_N), reason="no CIFAR-100 / CIFAR-100N here")
def test_cifar100n_both_detectors_see_the_human_labels():
    bench = _load_benchmark()
    args = bench.parse_args(["--dataset", "cifar100n", "--train-subset", "300", "--data-root", SHARED_CIFAR])
    cfg = bench.make_config(args, *args.parsed[0][:2], 0, 2)
    data = bench.prepare_data(cfg.data, cfg.noise)  # what ours() and cleanlab_kfold() score against
    human = load_label_file(Path(CIFAR_N))  # the file, read on its own (weights_only, numpy arrays only)
    assert torch.equal(data.train_labels, human["noisy_label"][:300])
    assert torch.equal(data.train_clean, human["clean_label"][:300])
    assert 0.25 < data.noise_rate < 0.55  # CIFAR-100N noisy_fine: 40.2% over the 50,000


@pytest.mark.skipif(NO_CIFAR, reason="no CIFAR-100 here")
def test_cifar100_rows_end_to_end(tmp_path):
    pytest.importorskip("cleanlab")
    out = tmp_path / "out"
    argv = ["--dataset", "cifar100", "--arch", "cnn_small", "--train-subset", "300", "--test-subset", "100"]
    argv += ["--epochs", "2", "--folds", "2", "--seeds", "0", "--settings", "symmetric:0.4"]
    argv += ["--data-root", SHARED_CIFAR, "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["dataset"], summary["arch"], summary["train_subset"], summary["folds"]) == (
        "cifar100",
        "cnn_small",
        300,
        2,
    )
    assert summary["num_train"] == 300 and summary["milestones"] == [1, 2]
    assert list(summary["results"]) == ["symmetric 40%"]
    rows = summary["results"]["symmetric 40%"]
    assert sorted(rows) == ["cleanlab", "cmd-dist", "cmd-dist 1/K"]
    # the same 300 images and the same noisy labels for all three detectors
    bench = _load_benchmark()
    cfg = bench.make_config(bench.parse_args(argv), "symmetric", "0.4", 0, 2)
    data = bench.prepare_data(cfg.data, cfg.noise)
    flipped = int((data.train_labels != data.train_clean).sum())
    assert 60 < flipped < 180  # 40% of 300, drawn
    for name, (r,) in rows.items():
        assert r["seed"] == 0 and r["samples"] == 300 and r["noisy"] == flipped, name
        assert 0.0 <= r["flag_f1"] <= 1.0 and 0.0 <= r["score_auroc"] <= 1.0, name
        assert r["train_s"] > 0, name
    assert rows["cmd-dist 1/K"][0]["epochs"] == 1
    # passes over the data of one network: 2 peers x 2 epochs; 2 peers x 1; cleanlab (K-1) x 2
    assert [rows[k][0]["passes"] for k in ("cmd-dist", "cmd-dist 1/K", "cleanlab")] == [4, 2, 2]
    assert summary["table"][2].startswith("| symmetric 40% |")
