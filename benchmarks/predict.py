"""``cmd-dist predict`` throughput: the local DataLoader path and the Ray Data path against a plain-PyTorch loop, in
one run, over the same image files, the same peers, the same batch size.

Rows (images/s over all --images files; each row's rate is its median repeat; repeats run round robin so background
load on a shared machine hits every row alike):

  (a) plain PyTorch: a Dataset that opens each file with PIL, ``Resize(size)``, ``CenterCrop(size)``, ``ToTensor``,
      ``Normalize``; a ``DataLoader(num_workers=W, batch_size=B)``; the peers' softmax averaged, ``topk``;
      nothing written (the simplest loop a user would write by hand);
  (b) cmd-dist local path (``cmd-dist predict RUN INPUT``): :func:`cmd_dist.infer.predict.predict_local`, the
      same W loader processes (torchvision.io decode, the run's eval view), the CSV written atomically;
  (c) cmd-dist Ray Data path (``--address``) on a local Ray started once before timing (token auth, 127.0.0.1):
      read tasks + decode, an actor pool that builds the peers in its constructor, rows streamed back to the
      driver's CSV. Every repeat builds a new actor pool: its start-up is in the time, as it is in every
      ``cmd-dist predict --address`` call.

The peers come from a run trained here first (1 epoch on --train-images CIFAR-100 training images, ``cnn_small``
peers by default: the pipeline, not the network, is what is measured on a CPU; ``--arch resnet18`` on a GPU).
The images are the first --images CIFAR-100 *test* images written as PNG. Writes
``benchmarks/results/<date>-predict/summary.json`` (or ``--out-dir``).

    .venv/bin/python benchmarks/predict.py                        # 2,000 images, CPU: about 2 minutes on 2 cores
    .venv/bin/python benchmarks/predict.py --images 20000 --arch resnet18 --batch-size 512   # a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmd_dist.config import load_config  # noqa: E402
from cmd_dist.data.resident import load_cifar  # noqa: E402
from cmd_dist.infer.images import list_images  # noqa: E402
from cmd_dist.infer.predict import PeerProbabilities, PredictionCsv, default_workers, predict_local  # noqa: E402


def train_run(out: Path, data_root: str, arch: str, train_images: int) -> Path:
    """A real run to predict with: 2 peers, 1 epoch on CIFAR-100 (the demo's method), in this process."""
    from cmd_dist.launch import job
    from cmd_dist.launch.summary import summarize
    from cmd_dist.train.local import run_local

    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            "data.dataset=cifar100",
            f"data.root={data_root}",
            f"data.train_subset={train_images}",
            "data.test_subset=256",
            "train.epochs=1",
            "train.milestones=[]",
            "train.log_every=0",
            f"peers=[{{arch: {arch}, name: peerA}}, {{arch: {arch}, name: peerB}}]",
            f"output_dir={out}",
            "run_name=bench",
        ],
    )
    run_dir = Path(job.resolve_run_dir(cfg, lock=False))
    metrics, _ = run_local(cfg, run_dir)
    summarize(cfg, metrics, run_dir, wall_s=0.0)
    return run_dir


def write_pngs(folder: Path, data_root: str, n: int) -> list[str]:
    from PIL import Image

    x, _ = load_cifar("cifar100", data_root, "test")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    return list_images([str(folder)])


class PilFiles(torch.utils.data.Dataset):
    """Row (a)'s dataset: PIL and torchvision's classic transforms."""

    def __init__(self, files: list[str], size: int, mean, std) -> None:
        from torchvision import transforms as T

        self.files = files
        self.tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.tf(im.convert("RGB"))


def plain_loop(models: list[torch.nn.Module], files, spec, batch_size: int, workers: int, k: int, device) -> int:
    loader = torch.utils.data.DataLoader(
        PilFiles(files, spec.size, spec.mean, spec.std),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    n = 0
    with torch.inference_mode():
        for x in loader:
            x = x.to(device, non_blocking=True)
            probs = sum(torch.softmax(m(x), 1) for m in models) / len(models)
            probs.topk(k, 1)[0].cpu()
            n += x.shape[0]
    return n


def main(argv: list[str] | None = None) -> dict:
    """Parse, measure, write the summary; the temporary run and images are removed however it ends."""
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="cmd-dist-bench-predict-"))
    try:
        return _measure(argv, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(argv: list[str] | None, tmp: Path) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--arch", default="cnn_small")
    p.add_argument("--train-images", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--skip-ray", action="store_true", help="rows (a) and (b) only")
    p.add_argument("--out-dir", help="default: benchmarks/results/<date>-predict")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    run_dir = train_run(tmp / "runs", args.data_root, args.arch, args.train_images)
    files = write_pngs(tmp / "images", args.data_root, args.images)
    print(f"setup: a {args.arch} run and {len(files)} PNG files in {time.time() - t0:.0f} s", flush=True)

    from cmd_dist.infer.loading import open_trained_run

    trained = open_trained_run(str(run_dir), "best")
    models = trained.models(device)
    probs_of = PeerProbabilities(models, trained.spec, "ensemble", device)
    workers = default_workers(len(files), args.batch_size)
    k = min(args.topk, trained.spec.num_classes)

    def plain() -> None:
        assert plain_loop(list(models.values()), files, trained.spec, args.batch_size, workers, k, device) == len(files)

    def local() -> None:
        with PredictionCsv(tmp / "local.csv", k, trained.class_names) as out:
            predict_local(probs_of, files, out, False, args.batch_size, workers)
        assert out.rows == len(files)

    rows = {"a": ("plain PyTorch (PIL + DataLoader)", plain), "b": ("cmd-dist local (DataLoader)", local)}
    if not args.skip_ray:
        rows["c"] = ("cmd-dist Ray Data (local Ray)", _ray_row(trained, files, tmp, k, args.batch_size))
    times: dict[str, list[float]] = {key: [] for key in rows}
    for _ in range(args.repeats):
        for key, (_, fn) in rows.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    result = _summary(args, rows, times, len(files), workers, device)
    out_dir = Path(args.out_dir) if args.out_dir else REPO / "benchmarks" / "results" / f"{result['date']}-predict"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    print(f"summary: {out_dir / 'summary.json'}")
    return result


def _ray_row(trained, files: list[str], tmp: Path, k: int, batch_size: int):
    import copy

    from cmd_dist.launch.cluster import init_ray
    from cmd_dist.launch.predict import predict_on_ray

    cfg = copy.deepcopy(trained.cfg)
    cfg.ray.address = None
    init_ray(cfg)  # a fresh local Ray, token auth, 127.0.0.1: started once, before any timing

    def ray_data() -> None:
        with PredictionCsv(tmp / "ray.csv", k, trained.class_names) as out:
            predict_on_ray(trained, files, out, "ensemble", batch_size, "local")
        assert out.rows == len(files)

    return ray_data


def _summary(args, rows: dict, times: dict, n: int, workers: int, device: torch.device) -> dict:
    rate = {key: n / statistics.median(ts) for key, ts in times.items()}
    lines = [
        "| row | pipeline | images/s | vs (a) |",
        "| --- | --- | ---: | ---: |",
    ]
    for key, (name, _) in rows.items():
        lines.append(f"| ({key}) | {name} | {rate[key]:.0f} | {rate[key] / rate['a']:.2f} |")
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (no GPU)",
        "torch": torch.__version__,
        "load_average_1_5_15_min_at_end": [round(v, 2) for v in os.getloadavg()],  # a shared machine says so
    }
    return {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "images": n,
        "batch_size": args.batch_size,
        "loader_workers": workers,
        "arch": args.arch,
        "repeats": args.repeats,
        "seconds": times,
        "images_per_s": rate,
        "ratio_to_plain": {key: r / rate["a"] for key, r in rate.items()},
        "table": "\n".join(lines),
    }


if __name__ == "__main__":
    main()
