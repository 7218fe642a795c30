"""Training throughput of cmd-dist next to a plain PyTorch loop, as ratios measured in one run.

Rows (same architecture, batch size, data and device):

  (a) plain PyTorch: ONE model, the simplest loop over the same uint8 device tensor with the same
      per-batch augment + normalize, SGD with momentum and weight decay, softmax cross-entropy;
  (b) cmd-dist, N independent peers (knowledge=zero, self_kd=ce) hosted in this process;
  (c) cmd-dist, CMD-P + Mconf, N peers hosted in this process;
  (d) cmd-dist, CMD-P + Mconf, one Ray Train worker per peer (cmd_dist.launch.job): steady-state
      images/s from the ``images_per_s`` each worker reports (its own train-epoch time) for the
      epochs after the first, and the wall time of the whole fit including Ray start-up.

(a)-(c) run in this process, interleaved epoch by epoch (round robin, rotating order) so that
background load hits them alike; the first ``--warmup`` rounds are not timed; a row's rate is
that of its median timed epoch. Every epoch of every row processes the same images. Machines are
noisy: read the ratios, not the absolute rates.

    .venv/bin/python benchmarks/throughput.py                      # CPU: cnn_small on digits
    .venv/bin/python benchmarks/throughput.py --demo --json out.json
    .venv/bin/python benchmarks/throughput.py --device cuda --arch resnet34 --dataset cifar100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cmd_dist.config import Config, load_config
from cmd_dist.data.augment import augment, normalize
from cmd_dist.data.prepare import prepare_data
from cmd_dist.data.resident import load_split
from cmd_dist.data.types import SPECS
from cmd_dist.models import build_model
from cmd_dist.train.exchange import Exchange
from cmd_dist.train.peers import build_peer
from cmd_dist.train.trainer import train_one_epoch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
INDEPENDENT = ["method.objective=cmd", "method.knowledge=zero", "method.self_kd=ce"]
CMD_P_MCONF = ["method.objective=cmd", "method.knowledge=cmd-p", "method.self_kd=mconf"]


@dataclass
class Row:
    key: str
    setup: str
    peers: int  # models this row trains; each sees every image of an epoch
    images: int  # images per epoch, per peer
    seconds: list[float] = field(default_factory=list)  # one per timed epoch
    note: str = ""
    wall_s: float | None = None  # (d): the whole fit, Ray start-up included

    @property
    def per_peer(self) -> float:
        """Steady-state images/s of one peer, from the median timed epoch (robust to a busy neighbour)."""
        return self.images / statistics.median(self.seconds) if self.seconds else math.nan

    @property
    def spread(self) -> float:
        """(max - min) / median of the per-epoch rates, in %: how noisy this row's epochs were."""
        if len(self.seconds) < 2:
            return math.nan
        rates = [self.images / s for s in self.seconds]
        return 100.0 * (max(rates) - min(rates)) / statistics.median(rates)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- (a) plain PyTorch


def reference_setup(args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], float], int]:
    """Row (a): one model and nothing of cmd-dist's training code; returns (time one epoch, images per epoch)."""
    spec = SPECS[args.dataset]
    x, y = load_split(args.dataset, args.data_root, "train")
    if args.train_subset:
        x, y = x[: args.train_subset], y[: args.train_subset]
    x, y = x.to(device), y.to(device)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    torch.manual_seed(0)
    model = build_model(args.arch, spec.num_classes, spec.channels).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(device=device).manual_seed(0)

    def epoch() -> float:
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(y), device=device, generator=gen)
        for i in range(0, len(y), args.batch_size):
            idx = order[i : i + args.batch_size]
            xb = augment(x[idx], spec.pad, spec.flip, gen)
            loss = F.cross_entropy(model(normalize(xb, mean, std)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        return time.perf_counter() - start

    return epoch, len(y)


# ----------------------------------------------------------------------------- (b), (c) cmd-dist in-process


def cmd_config(args: argparse.Namespace, method: list[str], epochs: int, extra: list[str] | None = None) -> Config:
    peers = ", ".join(f"{{arch: {args.arch}}}" for _ in range(args.peers))
    overrides = [
        f"data.dataset={args.dataset}",
        f"data.root={args.data_root}",
        "data.protocol=final",
        f"data.train_subset={args.train_subset}",
        f"data.test_subset={args.test_subset}",
        f"train.batch_size={args.batch_size}",
        f"train.epochs={epochs}",
        f"train.lr={args.lr}",
        "train.log_every=0",
        f"peers=[{peers}]",
        "seed=0",
    ]
    return load_config(None, overrides + method + (extra or []))


def cmd_setup(cfg: Config, device: torch.device) -> tuple[Callable[[], float], int]:
    """Rows (b), (c): every peer in this process through cmd_dist.train.trainer.train_one_epoch (1-process exchange)."""
    data = prepare_data(cfg.data, cfg.noise, device)
    exchange = Exchange(len(cfg.peers))
    peers = [build_peer(cfg, k, data.spec.num_classes, data.spec.channels, device) for k in exchange.local_peers]
    epoch_index = [0]

    def epoch() -> float:
        start = time.perf_counter()
        train_one_epoch(cfg, peers, exchange, data, epoch_index[0], device)
        sync(device)
        seconds = time.perf_counter() - start  # includes Mconf's end-of-epoch r (host arithmetic, negligible)
        epoch_index[0] += 1
        return seconds

    return epoch, data.num_train


def run_in_process(args: argparse.Namespace, device: torch.device) -> list[Row]:
    rounds = args.warmup + args.epochs
    ref, n_a = reference_setup(args, device)
    indep, n_b = cmd_setup(cmd_config(args, INDEPENDENT, rounds), device)
    cmd, n_c = cmd_setup(cmd_config(args, CMD_P_MCONF, rounds), device)
    if not n_a == n_b == n_c:
        raise RuntimeError(f"rows would see different epochs: (a) {n_a}, (b) {n_b}, (c) {n_c} images")
    n = args.peers
    shared = "GPU" if device.type == "cuda" else f"{args.threads} CPU thread(s)"
    turns = f"{n} peers take turns on the same {shared}: ideal per peer 1/{n}"
    rows = [
        Row("a", "plain PyTorch loop, 1 model", 1, n_a),
        Row("b", f"cmd-dist, {n} independent peers (knowledge=zero, self_kd=ce), in-process", n, n_b, note=turns),
        Row("c", f"cmd-dist, CMD-P + Mconf, {n} peers, in-process", n, n_c, note=turns),
    ]
    fns = [ref, indep, cmd]
    for r in range(rounds):
        timed = r >= args.warmup
        for i in range(len(fns)):
            j = (i + r) % len(fns)  # rotate who goes first each round
            seconds = fns[j]()
            if timed:
                rows[j].seconds.append(seconds)
        if timed:
            rates = "  ".join(f"({row.key}) {row.images / row.seconds[-1]:,.0f}" for row in rows)
            print(f"round {r + 1}/{rounds}: img/s per peer {rates}", flush=True)
        else:
            print(f"round {r + 1}/{rounds}: warm-up", flush=True)
    return rows


# ----------------------------------------------------------------------------- (d) Ray Train workers


def start_ray(cfg: Config, verbose: bool) -> bool:
    """Start or join Ray as cmd_dist.launch.cluster.init_ray does; unless verbose, without streaming worker logs."""
    import ray

    from cmd_dist.launch import cluster

    if ray.is_initialized():
        return False
    if verbose:
        cluster.init_ray(cfg)
        return True
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"  # never a stale ray_current_cluster
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_config=ray.LoggingConfig(log_level="ERROR"))
    if address == "local":
        kwargs.update(_node_ip_address="127.0.0.1", include_dashboard=False)
    ray.init(address=address, **kwargs)
    return True


def report_log(path: str) -> Any:
    """A Ray Train callback appending each report's time and per-worker (epoch, images_per_s) as a JSON line.

    It runs in the Ray Train controller, not in this process, hence a file rather than a list; the
    class is local so that it is pickled by value (this script is not an importable module).
    """
    from ray.train import UserCallback

    class ReportLog(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            workers = [{"epoch": m.get("epoch"), "images_per_s": m.get("images_per_s")} for m in metrics]
            with open(path, "a") as f:
                f.write(json.dumps({"t": time.time(), "workers": workers}) + "\n")

    return ReportLog()


def run_ray(args: argparse.Namespace, device: torch.device, workdir: Path) -> tuple[Row, list[dict]]:
    """Row (d): a real cmd_dist.launch.job fit (placement=separate); every worker's images_per_s is recorded."""
    t0 = time.perf_counter()
    import ray

    from cmd_dist.launch import job

    first_timed = max(1, args.warmup) + 1  # epoch 1 (and any further warm-up) is not steady state
    epochs = first_timed - 1 + args.ray_epochs
    use_gpu = "true" if device.type == "cuda" else "false"
    extra = [f"output_dir={workdir}", "run_name=ray", f"ray.use_gpu={use_gpu}", "ray.placement=separate"]
    if device.type == "cpu":
        extra.append(f"ray.cpus_per_worker={args.threads}")  # the worker sets as many torch threads
    cfg = cmd_config(args, CMD_P_MCONF, epochs, extra)
    started = start_ray(cfg, args.verbose)
    init_s = time.perf_counter() - t0
    n = args.peers
    res = ray.cluster_resources()
    note = f"1 worker per peer, {args.threads} CPU each: ideal per peer 1" if device.type == "cpu" else ""
    if device.type == "cuda":
        if res.get("GPU", 0) >= n:
            note = "1 GPU per peer: ideal per peer 1"
        else:
            cfg.ray.placement = "together"
            note = f"{res.get('GPU', 0):.0f} GPU: 1 worker hosts all {n} peers, ideal per peer 1/{n}"
    workers = n if cfg.ray.placement == "separate" else 1
    where = f"{n} Ray Train workers" if workers > 1 else "1 Ray Train worker"
    row = Row("d", f"cmd-dist, CMD-P + Mconf, {n} peers in {where} (launcher)", n, 0, note=note)
    need = workers * cfg.ray.cpus_per_worker
    if res.get("CPU", 0) < need:
        row.note = f"skipped: needs {need:g} CPUs, the Ray cluster has {res.get('CPU', 0):g}"
        return row, []

    run_dir = job.resolve_run_dir(cfg)
    log = run_dir / "bench_reports.jsonl"
    fit_start = time.perf_counter()
    try:
        result = job.build_trainer(cfg, run_dir, callbacks=[report_log(str(log))]).fit()
    finally:
        fit_s = time.perf_counter() - fit_start
        row.wall_s = time.perf_counter() - t0
        if started:
            ray.shutdown()
    if result.error:
        raise RuntimeError(f"row (d): the Ray fit failed: {result.error}")

    reports = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    available = len(load_split(args.dataset, args.data_root, "train")[1])
    row.images = min(cfg.data.train_subset, available) if cfg.data.train_subset else available
    for rep in reports:
        if rep["workers"][0]["epoch"] >= first_timed:
            # Workers step in lockstep (one all_gather per step): the epoch took their mean time.
            row.seconds.append(statistics.mean(row.images / w["images_per_s"] for w in rep["workers"]))
    gaps = [b["t"] - a["t"] for a, b in zip(reports, reports[1:]) if b["workers"][0]["epoch"] >= first_timed]
    cadence = f", an epoch every {statistics.median(gaps):.1f} s with eval + checkpoint + report" if gaps else ""
    row.note += (
        f"; fit wall {row.wall_s:.1f} s incl. Ray start-up (ray.init {init_s:.1f} s, fit {fit_s:.1f} s "
        f"for {epochs} epochs{cadence})"
    )
    return row, reports


# ----------------------------------------------------------------------------- make demo


def run_demo(workdir: Path) -> dict[str, Any]:
    """`make demo`'s command, `cmd-dist train configs/demo.yaml`, with its run folder in a temp dir."""
    exe = Path(sys.executable).with_name("cmd-dist")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cmd_dist.cli"]
    cmd += ["train", "configs/demo.yaml", f"output_dir={workdir / 'demo'}"]
    env = dict(os.environ, RAY_TRAIN_ENABLE_PRINT_PATCH="0", RAY_USAGE_STATS_ENABLED="0")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
    finals = [line.strip() for line in proc.stdout.splitlines() if line.startswith("final ")]
    return {
        "command": "cmd-dist train configs/demo.yaml",
        "wall_s": wall,
        "exit_code": proc.returncode,
        "final": finals,
    }


# ----------------------------------------------------------------------------- report


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPUs"
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def render(args: argparse.Namespace, device: torch.device, rows: list[Row], info: dict[str, Any]) -> str:
    ref = rows[0].per_peer
    steps = math.ceil(rows[0].images / args.batch_size)
    lines = [
        "## Training throughput: cmd-dist vs plain PyTorch",
        "",
        f"- machine: {info['machine']}; device `{device.type}`; torch {torch.__version__}; {info['date']}",
        f"- workload: {args.arch} on {args.dataset}, {rows[0].images} training images per epoch "
        f"({steps} steps of batch {args.batch_size}), {args.peers} peers",
        f"- (a)-(c): interleaved in one process, {args.warmup} warm-up + {args.epochs} timed epochs each; "
        "rate of the median epoch",
    ]
    if not args.skip_ray:
        lines.append(
            f"- (d): a separate Ray fit after them (not interleaved with (a)); {args.ray_epochs} timed epochs "
            "after the first, from the images_per_s every worker reports"
        )
    if device.type == "cpu":
        ray_threads = "" if args.skip_ray else f"; each Ray worker of (d) has {args.threads} CPU and sets as many"
        lines.append(f"- CPU threads: torch.set_num_threads({args.threads}) for (a)-(c){ray_threads}")
    lines += [
        "",
        "| row | setup | img/s per peer | vs (a) | img/s all peers | vs (a) | epoch spread | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        total = r.per_peer * r.peers
        lines.append(
            f"| ({r.key}) | {r.setup} | {fmt(r.per_peer, ',.0f')} | {fmt(r.per_peer / ref, '.2f')} | "
            f"{fmt(total, ',.0f')} | {fmt(total / ref, '.2f')} | {fmt(r.spread, '.0f')}% | {r.note} |"
        )
    lines += [
        "",
        f"CMD overhead, (c) vs (b): {fmt(info['cmd_overhead_pct'], '+.1f')}% time per epoch "
        "(CMD-P + Mconf instead of independent peers, same process)",
    ]
    if info.get("demo"):
        d = info["demo"]
        finals = "; " + "; ".join(d["final"]) if d["final"] else ""
        lines.append(f"`make demo` (`{d['command']}`): {d['wall_s']:.1f} s wall, exit code {d['exit_code']}{finals}")
    lines.append(f"benchmark wall time: {info['wall_s']:.0f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(
        description="Training throughput: plain PyTorch vs cmd-dist (independent peers, CMD, Ray Train workers).",
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu", help="default: cuda if any")
    ap.add_argument("--arch", default=None, help="default: cnn_small on CPU, resnet34 on CUDA")
    ap.add_argument(
        "--dataset", choices=("digits", "cifar100"), default=None, help="default: digits on CPU, else cifar100"
    )
    ap.add_argument(
        "--data-root", default=str(DEFAULT_DATA_ROOT), help="folder holding cifar-100-python/ (default: ../shared/data)"
    )
    ap.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="first N training images (0 = all; default: all digits, 10240 CIFAR-100 images)",
    )
    ap.add_argument(
        "--test-subset", type=int, default=1000, help="images (d) evaluates per epoch (0 = all; default 1000)"
    )
    ap.add_argument("--steps", type=int, default=0, help="steps per epoch: sets --train-subset to steps x batch size")
    ap.add_argument("--batch-size", type=int, default=128, help="default: 128")
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate of every row (default: 0.05)")
    ap.add_argument("--peers", type=int, default=2, help="peers of (b)-(d) (default: 2)")
    ap.add_argument("--epochs", type=int, default=None, help="timed epochs of (a)-(c) (default: 15 CPU, 5 CUDA)")
    ap.add_argument("--ray-epochs", type=int, default=None, help="timed epochs of (d) (default: 10 CPU, 5 CUDA)")
    ap.add_argument(
        "--warmup", type=int, default=1, help="untimed epochs first (default 1; Ray's first epoch never counts)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="CPU: torch threads of (a)-(c), CPUs per Ray worker (default 1)"
    )
    ap.add_argument("--skip-ray", action="store_true", help="leave out row (d)")
    ap.add_argument("--demo", action="store_true", help="also time `make demo`'s command (a 20-epoch Ray fit)")
    ap.add_argument("--verbose", action="store_true", help="stream the Ray workers' logs")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not cuda:
        ap.error("--device cuda: no CUDA device is available")
    args.arch = args.arch or ("resnet34" if gpu else "cnn_small")
    args.dataset = args.dataset or ("cifar100" if gpu else "digits")
    args.epochs = args.epochs or (5 if gpu else 15)
    args.ray_epochs = args.ray_epochs or (5 if gpu else 10)
    if args.train_subset is None:
        args.train_subset = 0 if args.dataset == "digits" else 10240
    if args.steps:
        args.train_subset = args.steps * args.batch_size
    args.data_root = str(Path(args.data_root).expanduser().resolve())
    if min(args.epochs, args.ray_epochs, args.peers, args.threads) < 1 or args.warmup < 0:
        ap.error("--epochs, --ray-epochs, --peers and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)  # every in-process row, and what each Ray worker uses
    info: dict[str, Any] = {
        "machine": machine(device),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "args": vars(args),
    }
    print(f"{args.arch} on {args.dataset}, {device.type}, {args.peers} peers, batch {args.batch_size}", flush=True)
    try:
        rows = run_in_process(args, device)
        with tempfile.TemporaryDirectory(prefix="cmd-bench-") as tmp:
            if not args.skip_ray:
                print("row (d): Ray Train fit ...", flush=True)
                row, info["ray_reports"] = run_ray(args, device, Path(tmp))
                rows.append(row)
            if args.demo:
                print("make demo: cmd-dist train configs/demo.yaml ...", flush=True)
                info["demo"] = run_demo(Path(tmp))
    finally:
        torch.set_num_threads(threads)
    info["cmd_overhead_pct"] = 100.0 * (rows[1].per_peer / rows[2].per_peer - 1.0)
    info["wall_s"] = time.perf_counter() - start
    ref = rows[0].per_peer
    info["rows"] = [
        {**asdict(r), "images_per_s_per_peer": r.per_peer, "ratio_to_a": r.per_peer / ref, "spread_pct": r.spread}
        for r in rows
    ]
    info["table"] = render(args, device, rows, info)
    print("\n" + info["table"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2, default=str))
    return info


if __name__ == "__main__":
    main()
