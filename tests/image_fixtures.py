"""Small on-disk datasets in the exact layouts cmd-dist streams (real JPEG files, a few classes).

Each class has its own mean colour so a tiny network can learn something in one epoch; sizes vary
so the random-resized crop and the eval resize are exercised. ``corrupt=True`` adds one truncated
JPEG to the training images (it must be skipped with a warning, not stop the run).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40), (40, 200, 200)]


def jpeg_bytes(cls: int, seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = size
    base = np.array(COLOURS[cls % len(COLOURS)], dtype=np.float64)
    img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_jpeg(path: Path, cls: int, seed: int, size: tuple[int, int] = (40, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(cls, seed, size))


def corrupt_jpeg(path: Path) -> None:
    """A truncated JPEG: a valid header, half the data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = jpeg_bytes(0, 999)
    path.write_bytes(data[: len(data) // 3])


def make_webvision(
    root: Path,
    classes: int = 4,
    per_class: int = 6,
    val_per_class: int = 2,
    corrupt: bool = False,
    imagenet: bool = True,
) -> Path:
    """mini-WebVision (DivideMix layout) with ``classes`` classes; imagenet/val/<c>/ when ``imagenet``."""
    wv = root / "webvision"
    train_lines, val_lines = [], []
    seed = 0
    for c in range(classes):
        for j in range(per_class):
            rel = f"google/q{c + 1:04d}/{j:07d}.jpg"
            write_jpeg(wv / rel, c, seed, (40 + 4 * (j % 3), 48 - 2 * (j % 4)))
            train_lines.append(f"{rel} {c}")
            seed += 1
        for j in range(val_per_class):
            name = f"val{c * val_per_class + j:06d}.JPEG"
            write_jpeg(wv / "val_images_256" / name, c, seed)
            val_lines.append(f"{name} {c}")
            seed += 1
        if imagenet:
            for _ in range(val_per_class):
                write_jpeg(root / "imagenet" / "val" / str(c) / f"ILSVRC2012_val_{seed:08d}.JPEG", c, seed)
                seed += 1
    if corrupt:
        rel = "google/q0001/corrupt.jpg"
        corrupt_jpeg(wv / rel)
        train_lines.insert(1, f"{rel} 0")
    (wv / "info").mkdir(parents=True, exist_ok=True)
    (wv / "info" / "train_filelist_google.txt").write_text("\n".join(train_lines) + "\n")
    (wv / "info" / "val_filelist.txt").write_text("\n".join(val_lines) + "\n")
    return root


FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "baklava"]


def make_food101n(root: Path, per_class: int = 6, test_per_class: int = 2) -> Path:
    """Food-101N_release/ (image list, verified flags) beside food-101/ (test split, classes)."""
    rel_root, food = root / "Food-101N_release", root / "food-101"
    lines, verified_train, verified_val = [], [], []
    test_lines, train_lines = [], []
    seed = 100
    for c, name in enumerate(FOOD_CLASSES):
        for j in range(per_class):
            key = f"{name}/{seed:032x}.jpg"
            write_jpeg(rel_root / "images" / key, c, seed)
            lines.append(key)
            # Two verified per class in train (one right, one wrong), one right in val.
            if j == 0:
                verified_train.append(f"{key}\t1")
            elif j == 1:
                verified_train.append(f"{key}\t0")
            elif j == 2:
                verified_val.append(f"{key}\t1")
            seed += 1
        for _ in range(test_per_class):
            ident = f"{seed}"
            write_jpeg(food / "images" / name / f"{ident}.jpg", c, seed)
            test_lines.append(f"{name}/{ident}")
            seed += 1
        ident = f"{seed}"
        write_jpeg(food / "images" / name / f"{ident}.jpg", c, seed)
        train_lines.append(f"{name}/{ident}")
        seed += 1
    (rel_root / "meta").mkdir(parents=True, exist_ok=True)
    (rel_root / "meta" / "classes.txt").write_text("class_name\n" + "\n".join(FOOD_CLASSES) + "\n")
    (rel_root / "meta" / "imagelist.tsv").write_text("class_name/key\n" + "\n".join(lines) + "\n")
    header = "class_name/key\tverification_label\n"
    (rel_root / "meta" / "verified_train.tsv").write_text(header + "\n".join(verified_train) + "\n")
    (rel_root / "meta" / "verified_val.tsv").write_text(header + "\n".join(verified_val) + "\n")
    (food / "meta").mkdir(parents=True, exist_ok=True)
    (food / "meta" / "classes.txt").write_text("\n".join(FOOD_CLASSES) + "\n")
    (food / "meta" / "test.txt").write_text("\n".join(test_lines) + "\n")
    (food / "meta" / "train.txt").write_text("\n".join(train_lines) + "\n")
    return root


def make_imagefolder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: int = 6,
    splits: tuple[str, ...] = ("train", "val", "test"),
    png: bool = True,
) -> Path:
    seed = 500
    for split in splits:
        n = per_class if split == "train" else 2
        for c, name in enumerate(classes):
            for j in range(n):
                path = root / split / name / f"{j:04d}.jpg"
                write_jpeg(path, c, seed)
                seed += 1
            if png and split == "train":  # PNGs decode too
                arr = np.full((36, 36, 3), COLOURS[c], dtype=np.uint8)
                Image.fromarray(arr).save(root / split / name / "extra.png")
    return root


def make_cifar10(root: Path, labels: np.ndarray, test_labels: np.ndarray | None = None, seed: int = 0) -> Path:
    """``cifar-10-batches-py/`` with len(labels) training images over five batches (pickle layout)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    parts = np.array_split(np.asarray(labels, dtype=np.int64), 5)
    for i, part in enumerate(parts, 1):
        data = rng.integers(0, 256, (len(part), 3072), dtype=np.uint8)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": [int(x) for x in part]}, f, protocol=2)
    tl = np.arange(20) % 10 if test_labels is None else test_labels
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(
            {b"data": rng.integers(0, 256, (len(tl), 3072), dtype=np.uint8), b"labels": [int(x) for x in tl]},
            f,
            protocol=2,
        )
    return root


def train_imagefolder_run(
    base: Path, overrides: list[str], splits: tuple[str, ...] = ("train", "val", "test")
) -> tuple[Path, Path]:
    """A tiny image-folder run (3 classes, 6 JPEGs + 1 PNG each, 2 epochs) trained in this process with the
    worker's own code (``run_local``, no Ray), its folder made and summarised as ``cmd-dist train`` leaves it;
    ``overrides`` add to the settings (noise, lr); ``splits``: the folders made (no ``val/``: the search protocol
    holds out 10% of train/). Returns (run folder, image root)."""
    from cmd_dist.config import load_config
    from cmd_dist.launch import job
    from cmd_dist.launch.summary import summarize
    from cmd_dist.train.local import run_local

    root = make_imagefolder(base / "images", per_class=6, splits=splits)
    settings = ["data.dataset=imagefolder", f"data.root={root}", "data.image_size=32", "data.workers=0"]
    settings += ["train.epochs=2", "train.batch_size=8", "train.log_every=0", f"output_dir={base}", "run_name=pets"]
    cfg = load_config(None, [*settings, *overrides])
    run_dir = Path(job.resolve_run_dir(cfg, lock=False))
    metrics, _ = run_local(cfg, run_dir)
    summarize(cfg, metrics, run_dir, wall_s=1.0)
    return run_dir, root
