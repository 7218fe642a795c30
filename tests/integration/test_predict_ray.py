"""`cmd-dist predict --address`: the Ray Data path (read_binary_files -> decode -> peers in an actor pool) gives the
rows of the local DataLoader path, on the session's shared Ray cluster, for real images (scikit-learn digits written
as PNG, and two unreadable files that both paths list and skip)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.image_fixtures import corrupt_jpeg

pytestmark = pytest.mark.ray


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_ray_data_path_gives_the_local_rows(ray_cluster, trained_run, tmp_path, capsys):
    from cmd_dist.cli import main
    from cmd_dist.data.resident import load_digits

    x, _ = load_digits("test")
    imgs = tmp_path / "imgs"
    for i in range(40):
        (imgs / f"{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, 0].numpy()).save(imgs / f"{i % 3}" / f"d{i:03d}.png")
    corrupt_jpeg(imgs / "truncated.jpg")
    (imgs / "notes.png").write_text("not an image\n")
    base = ["predict", str(trained_run), str(imgs), "--topk", "3", "--batch-size", "16"]

    assert main([*base, "--out", str(tmp_path / "local.csv")]) == 0
    local_err = capsys.readouterr().err
    address = ray_cluster.get_runtime_context().gcs_address
    assert main([*base, "--out", str(tmp_path / "ray.csv"), "--address", address]) == 0
    captured = capsys.readouterr()
    assert "predicted 40 images with the ensemble of peerA, peerB" in captured.out
    for err in (local_err, captured.err):
        skipped = sorted(line.split(": ")[1] for line in err.splitlines() if "skipped unreadable image" in line)
        assert skipped == [f"skipped unreadable image {imgs / n}" for n in ("notes.png", "truncated.jpg")]

    local, on_ray = _rows(tmp_path / "local.csv"), _rows(tmp_path / "ray.csv")
    assert len(local) == 40
    assert [r["filename"] for r in on_ray] == [r["filename"] for r in local]  # same files, same order
    for a, b in zip(local, on_ray):
        assert [a[f"index_{i}"] for i in range(3)] == [b[f"index_{i}"] for i in range(3)]
        assert [a[f"label_{i}"] for i in range(3)] == [b[f"label_{i}"] for i in range(3)]
        pa = [float(a[f"prob_{i}"]) for i in range(3)]
        pb = [float(b[f"prob_{i}"]) for i in range(3)]
        assert np.allclose(pa, pb, rtol=0, atol=1e-5)
