"""Input-pipeline throughput: cmd-dist's streamed data vs torchvision ImageFolder + DataLoader, in one run.

Rows (same JPEG files, same crop size, same number of loader processes W, batches of --batch):

  (a) the plain reference: ``torchvision.datasets.ImageFolder`` (PIL decode) with
      ``RandomResizedCrop(size)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` and a
      shuffled ``DataLoader(num_workers=W)``; float batches moved to --device;
  (b) cmd-dist ``StreamedData.epoch_batches`` for one peer: torchvision.io decode (libjpeg-turbo)
      + v2 random-resized crop and flip on uint8 in W loader processes, normalised on --device;
  (c) the same for two peers: one decode, two augmented views (what a worker hosting two peers gets);
  (d) CUDA only: nvJPEG batch decode through torchvision.io, then crop/flip image by image on the GPU;
  (e), (f) with --model: a training step fed by (b), and the same step on a device-resident batch;
  (g) CUDA only: cmd-dist streamed, 1 peer, ``data.decode=cuda`` (loader processes read the files and draw
      the crops; nvJPEG decodes the batch and all crops are cut on the GPU at once);
  (h) CUDA only, with --model: the step fed by (g). Without CUDA (g) and (h) are skipped with a message.

Every row passes over all --images files once per repeat, loader start-up included (each epoch
starts its loader processes, as both pipelines do by default); a row's rate is that of its
median repeat; repeats run round robin so background load hits all rows alike. "per core" divides
by W (the loader processes do the work; W = 0 means the main process, counted as one core); "vs (f)"
is the ratio to the step on a resident batch, measured in the same run.

    .venv/bin/python benchmarks/data_throughput.py                       # 2 loader processes, CPU
    .venv/bin/python benchmarks/data_throughput.py --workers 15 --device cuda --images 8192
    .venv/bin/python benchmarks/data_throughput.py --device cuda --model resnet50 --rows b e f g h
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmd_dist.config import load_config  # noqa: E402
from cmd_dist.data.streamed import build_streamed  # noqa: E402


def _write_jpeg(args: tuple[Path, int, int, int]) -> None:
    from PIL import Image

    root, i, classes, short_side = args
    rng = np.random.default_rng(i)
    long_side = int(rng.integers(short_side, int(short_side * 1.5)))
    h, w = (short_side, long_side) if i % 2 else (long_side, short_side)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 1), dtype=np.int16)
    folder = root / "train" / f"class{i % classes:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def make_jpegs(root: Path, n: int, classes: int = 10, short_side: int = 256) -> None:
    """n photo-like JPEGs (smooth colour fields + fine texture, quality 90), shorter side 256 px."""
    import multiprocessing

    with multiprocessing.Pool(os.cpu_count() or 1) as pool:
        pool.map(_write_jpeg, [(root, i, classes, short_side) for i in range(n)], chunksize=64)
    for split in ("test",):  # cmd-dist's imagefolder layout needs the class folders of a test split
        for c in range(classes):
            (root / split / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
        src = next((root / "train" / "class000").iterdir())
        (root / split / "class000" / src.name).write_bytes(src.read_bytes())


def reference_epoch(root: Path, size: int, batch: int, workers: int, device: torch.device) -> int:
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda"
    )
    n = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def cmd_epoch(data, peers: list[int], batch: int, epoch: int, device: torch.device) -> int:
    n = 0
    for b in data.epoch_batches(epoch, peers, batch, 0, device):
        n += len(b.ids)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


class _Bytes(torch.utils.data.Dataset):
    """Loader workers only read files; decoding happens on the GPU (row d)."""

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        # Plain bytes through the pipe: one shared-memory tensor per file would cost a file descriptor each.
        return self.paths[i].read_bytes(), self.labels[i]


def _collate_bytes(items):
    return [b for b, _ in items], torch.tensor([y for _, y in items])


def gpu_decode_epoch(paths, labels, size: int, batch: int, workers: int, device: torch.device, seed: int) -> int:
    """nvJPEG batch decode through torchvision.io on the GPU, then per-image random-resized crop + flip there."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    from cmd_dist.data.views import random_resized_crop_box

    loader = torch.utils.data.DataLoader(
        _Bytes(paths, labels), batch_size=batch, shuffle=True, num_workers=workers, collate_fn=_collate_bytes
    )
    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1) * 255
    rng = np.random.default_rng(seed)
    n = 0
    for raw, y in loader:
        imgs = decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw], device=device)
        crops = []
        for img in imgs:
            top, left, ch, cw = random_resized_crop_box(img.shape[1], img.shape[2], rng)
            c = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
            crops.append(TF.horizontal_flip(c) if rng.random() < 0.5 else c)
        x = (torch.stack(crops).float() - mean) / std
        y = y.to(device, non_blocking=True)
        n += x.shape[0]
    torch.cuda.synchronize(device)
    return n


def make_step(arch: str, classes: int, size: int, device: torch.device):
    """One SGD step of ``arch`` as the engine's fast path runs it on CUDA: bf16 autocast, channels_last."""
    import torch.nn.functional as F

    from cmd_dist.models import build_model

    model = build_model(arch, classes, 3, image_size=size).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def fed_epoch(data, step, batch: int, epoch: int, device: torch.device) -> int:
    n = 0
    for b in data.epoch_batches(epoch, [0], batch, 0, device):
        step(b.xs[0], b.y)
        n += len(b.ids)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def resident_epoch(step, n_images: int, batch: int, size: int, classes: int, device: torch.device) -> int:
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    n = 0
    while n < n_images:
        k = min(batch, n_images - n)
        step(x[:k], y[:k])
        n += k
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--root", help="reuse/keep the generated JPEG folder here (default: a temp folder)")
    ap.add_argument("--json", help="also write the results as JSON")
    ap.add_argument(
        "--model",
        help="also time a training step of this arch (e.g. resnet50) fed by row (b), and on "
        "a device-resident batch (the step's own speed)",
    )
    ap.add_argument("--rows", nargs="*", help="run only these rows (default: every row this machine can run)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)  # the main process only collates and moves batches

    tmp = None
    if args.root:
        root = Path(args.root)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="cmd-data-bench-")
        root = Path(tmp.name)
    if not (root / "train").is_dir():
        t = time.perf_counter()
        make_jpegs(root, args.images)
        print(f"wrote {args.images} JPEGs to {root} in {time.perf_counter() - t:.1f} s", flush=True)
    n_files = sum(1 for _ in (root / "train").rglob("*.jpg"))
    cfg = load_config(
        None,
        [
            "data.dataset=imagefolder",
            f"data.root={root}",
            f"data.image_size={args.size}",
            "noise.kind=none",
            f"data.workers={args.workers}",
            "data.decode=cpu",  # rows (b), (c), (e): the loader processes decode; (g) decodes on the GPU
        ],
    )
    data = build_streamed(cfg.data, cfg.noise, device=device)
    rows = {
        "a": (
            "torchvision ImageFolder (PIL) + transforms + DataLoader",
            lambda e: reference_epoch(root, args.size, args.batch, args.workers, device),
        ),
        "b": (
            "cmd-dist streamed, 1 peer (torchvision.io decode, v2 crop/flip on uint8)",
            lambda e: cmd_epoch(data, [0], args.batch, e, device),
        ),
        "c": (
            "cmd-dist streamed, 2 peers (one decode, two views)",
            lambda e: cmd_epoch(data, [0, 1], args.batch, e, device),
        ),
    }
    if device.type == "cuda":
        paths = sorted((root / "train").rglob("*.jpg"))
        labels = [int(p.parent.name[5:]) for p in paths]
        rows["d"] = (
            "nvJPEG decode on the GPU (torchvision.io), crop/flip per image on the GPU",
            lambda e: gpu_decode_epoch(paths, labels, args.size, args.batch, args.workers, device, e),
        )
    if args.model:
        step = make_step(args.model, data.spec.num_classes, args.size, device)
        resident_epoch(step, 2 * args.batch, args.batch, args.size, data.spec.num_classes, device)  # warm-up
        rows["e"] = (f"{args.model} training step fed by (b)", lambda e: fed_epoch(data, step, args.batch, e, device))
        rows["f"] = (
            f"{args.model} training step on a {device.type}-resident batch (no input pipeline)",
            lambda e: resident_epoch(step, n_files, args.batch, args.size, data.spec.num_classes, device),
        )
    skipped = []
    if device.type == "cuda":
        cfg.data.decode = "cuda"
        on_gpu = build_streamed(cfg.data, cfg.noise, device=device)
        assert data.decode == "cpu" and on_gpu.decode == "device"
        rows["g"] = (
            "cmd-dist streamed, 1 peer, data.decode=cuda (nvJPEG batch decode, all crops cut on the GPU at once)",
            lambda e: cmd_epoch(on_gpu, [0], args.batch, e, device),
        )
        if args.model:
            rows["h"] = (
                f"{args.model} training step fed by (g)",
                lambda e: fed_epoch(on_gpu, step, args.batch, e, device),
            )
    else:
        skipped.append(f"rows (g), (h) skipped: data.decode=cuda decodes on a CUDA device, this run has {device}")
        print(skipped[-1], flush=True)
    if args.rows:
        rows = {k: v for k, v in rows.items() if k in args.rows}
    seconds: dict[str, list[float]] = {k: [] for k in rows}
    for rep in range(args.repeats):
        order = list(rows)[rep % len(rows) :] + list(rows)[: rep % len(rows)]
        for key in order:
            t = time.perf_counter()
            n = rows[key][1](rep)
            seconds[key].append(time.perf_counter() - t)
            assert n == n_files, (key, n, n_files)
            print(f"repeat {rep + 1} row ({key}): {n / seconds[key][-1]:,.0f} img/s", flush=True)
    cores = max(1, args.workers)
    rate_of = {key: n_files / statistics.median(seconds[key]) for key in rows}
    base, resident = rate_of.get("a"), rate_of.get("f")

    def ratio(rate: float, ref: float | None) -> float | None:
        return rate / ref if ref else None

    def cell(r: float | None) -> str:
        return "-" if r is None else f"{r:.2f}"

    lines = [
        f"{n_files} JPEGs (shorter side 256 px) -> {args.size} px crops, batch {args.batch}, W = {args.workers} "
        f"loader processes, device {device}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}",
        "",
        "| row | pipeline | images/s | images/s per core | vs (a) | vs (f) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    out_rows = []
    for key, (name, _) in rows.items():
        rate = rate_of[key]
        lines.append(
            f"| ({key}) | {name} | {rate:,.0f} | {rate / cores:,.0f} | {cell(ratio(rate, base))} | "
            f"{cell(ratio(rate, resident))} |"
        )
        out_rows.append(
            {
                "key": key,
                "pipeline": name,
                "seconds": seconds[key],
                "images_per_s": rate,
                "images_per_s_per_core": rate / cores,
                "ratio_to_a": ratio(rate, base),
                "ratio_to_f": ratio(rate, resident),
            }
        )
    lines += [f"\n{line}" for line in skipped]
    table = "\n".join(lines)
    print("\n" + table)
    info = {
        "table": table,
        "rows": out_rows,
        "skipped": skipped,
        "images": n_files,
        "workers": args.workers,
        "device": str(device),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return info


if __name__ == "__main__":
    main()
