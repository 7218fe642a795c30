"""A run on a streamed dataset (an image folder of real JPEG/PNG files): evaluate reads the split through the
streamed evaluation view and gives summary.json's numbers; the run opens without its image folder (the class count
is the trained classifier's); an override moves the data to another folder with the same classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cmd_dist.infer.evaluate import evaluate_run
from cmd_dist.infer.loading import open_trained_run
from tests.image_fixtures import train_imagefolder_run


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path]:
    return train_imagefolder_run(tmp_path_factory.mktemp("folder-run"), ["noise.rate=0.2", "train.lr=0.05"])


def test_evaluate_reads_the_streamed_test_split_as_training_did(folder_run):
    run_dir, _ = folder_run
    summary = json.loads((run_dir / "summary.json").read_text())
    result = evaluate_run(str(run_dir), "last")
    assert (result["split"], result["images"], result["labels"]) == ("test", 6, "clean")
    rows = {r["name"]: r for r in result["models"]}
    for peer in summary["peers"]:
        assert rows[peer["name"]]["top1"] == pytest.approx(peer["test_acc"], abs=1e-6)
    assert [c["class"] for c in rows["ensemble"]["per_class"]] == ["cat", "dog", "fox"]
    assert evaluate_run(str(run_dir), "last", split="train")["images"] == 21  # 3 x (6 JPEGs + 1 PNG)


def test_the_run_opens_without_its_images_and_scores_another_copy(folder_run, tmp_path):
    run_dir, root = folder_run
    copy = tmp_path / "elsewhere"
    shutil.copytree(root, copy)
    moved = tmp_path / "pets-run"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns(".lock", ".workers.lock"))
    cfg = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(cfg.replace(str(root), str(tmp_path / "gone")))
    run = open_trained_run(str(moved), "last")
    assert (run.spec.num_classes, run.spec.channels, run.spec.size) == (3, 3, 32)
    assert run.class_names == ["0", "1", "2"]  # no folder to name them: numbered, no error
    here = evaluate_run(str(moved), "last", overrides=[f"data.root={copy}"])
    assert here["models"] == evaluate_run(str(run_dir), "last")["models"]  # names from the folder scored
    assert here["class_names"] == ["cat", "dog", "fox"]


def test_a_folder_whose_classes_are_named_otherwise_is_scored_with_a_warning(folder_run, tmp_path):
    run_dir, root = folder_run
    other = tmp_path / "other"
    for split in ("train", "test"):
        for old, new in zip(("cat", "dog", "fox"), ("ant", "bee", "cow")):
            shutil.copytree(root / split / old, other / split / new)
    said = []
    result = evaluate_run(str(run_dir), "last", overrides=[f"data.root={other}"], log=said.append)
    assert result["class_names"] == ["ant", "bee", "cow"] and len(said) == 1
    assert "are not named as the run's (ant, bee, cow, ... vs cat, dog, fox, ...)" in said[0]
