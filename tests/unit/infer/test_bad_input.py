"""Issue 20 point 4: bad input to `evaluate` and `export` is one line `cmd-dist: error: ...` naming the value and the
fix, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmd_dist.cli import main
from tests.conftest import REPO

SHARED_DATA = Path("/work/shared/data")


def _one_line_exit_2(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmd-dist: error: "), err
    return err[0]


@pytest.mark.parametrize("command", [["evaluate"], ["export", "--format", "onnx"]])
def test_a_folder_that_is_not_a_run(command, tmp_path, capsys):
    line = _one_line_exit_2([*command[:1], str(tmp_path), *command[1:]], capsys)
    assert f"{tmp_path} is not a run folder (no config.yaml there)" in line


@pytest.mark.parametrize("command", [["evaluate"], ["export", "--format", "torchscript"]])
def test_a_checkpoint_that_does_not_exist(command, trained_run, capsys):
    line = _one_line_exit_2([*command[:1], str(trained_run), "--checkpoint", "7", *command[1:]], capsys)
    assert "checkpoint_000007 does not exist; this run has: best, 3, 2" in line
    line = _one_line_exit_2([*command[:1], str(trained_run), "--checkpoint", "latest", *command[1:]], capsys)
    assert "--checkpoint: 'latest' is not best, last or an epoch number" in line


def test_a_checkpoint_that_fails_its_checksum_in_a_real_process(run_copy):
    pt = run_copy / "best_checkpoint" / "peer0.pt"
    pt.write_bytes(pt.read_bytes()[:-100])  # truncated
    env = {**os.environ, "PYTHONPATH": REPO}
    for argv in (["evaluate", str(run_copy)], ["export", str(run_copy), "--format", "safetensors"]):
        proc = subprocess.run(
            [sys.executable, "-m", "cmd_dist.cli", *argv], capture_output=True, text=True, env=env, cwd=run_copy
        )
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and "peer0.pt is truncated or corrupted (checksum mismatch)" in err[0], err
        assert "choose another with --checkpoint" in err[0]
    assert not list(run_copy.glob("*.safetensors"))


@pytest.mark.skipif(not (SHARED_DATA / "cifar-100-python").is_dir(), reason="shared CIFAR-100 absent")
def test_a_dataset_of_another_class_count(trained_run, capsys):
    line = _one_line_exit_2(
        ["evaluate", str(trained_run), "data.dataset=cifar100", f"data.root={SHARED_DATA}", "data.test_subset=10"],
        capsys,
    )
    assert "has 100 classes, the run's peers were trained on 10; score them on a dataset with the same 10" in line


def test_a_dataset_of_another_class_count_imagefolder(trained_run, tmp_path, capsys):
    from tests.image_fixtures import make_imagefolder

    root = make_imagefolder(tmp_path / "pets")
    line = _one_line_exit_2(["evaluate", str(trained_run), "data.dataset=imagefolder", f"data.root={root}"], capsys)
    assert f"data.dataset=imagefolder data.root={root} has 3 classes, the run's peers were trained on 10" in line


def test_a_dataset_of_the_same_class_count_but_other_images(trained_run, tmp_path, capsys):
    import numpy as np

    from tests.image_fixtures import make_cifar10

    root = make_cifar10(tmp_path, np.arange(50) % 10)
    line = _one_line_exit_2(["evaluate", str(trained_run), "data.dataset=cifar10", f"data.root={root}"], capsys)
    assert "gives 3-channel 32x32 images, the run's peers take 1-channel 8x8 ones" in line


def test_an_unknown_format_and_an_unknown_peer(trained_run, capsys):
    line = _one_line_exit_2(["export", str(trained_run), "--format", "tflite"], capsys)
    assert line == "cmd-dist: error: --format: 'tflite' is not one of torchscript, onnx, safetensors"
    line = _one_line_exit_2(["export", str(trained_run), "--format", "onnx", "--peer", "peerC"], capsys)
    assert (
        "--peer: 'peerC' is not a peer of" in line
        and "(its peers: peerA, peerB); name one of them, or ensemble" in line
    )


def test_a_split_the_protocol_has_not(trained_run, capsys):
    line = _one_line_exit_2(["evaluate", str(trained_run), "--split", "val"], capsys)
    assert "--split val: this run used data.protocol final" in line
    line = _one_line_exit_2(["evaluate", str(trained_run), "--split", "holdout"], capsys)
    assert "--split: 'holdout' is not one of test, val, train" in line


def test_out_in_a_folder_that_does_not_exist(trained_run, tmp_path, capsys):
    line = _one_line_exit_2(
        ["export", str(trained_run), "--format", "torchscript", "--out", f"{tmp_path}/no/x.pt"], capsys
    )
    assert f"--out: folder {tmp_path}/no does not exist" in line
