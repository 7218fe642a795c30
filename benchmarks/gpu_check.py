"""The one script to run on a CUDA machine: throughput, every placement, and a paper cell, in a time budget.

    python benchmarks/gpu_check.py --data-root /tmp/data --budget 540 --out $OUT
    python benchmarks/gpu_check.py --data-root /tmp/data --budget 540 --data-budget 150 --out $OUT  # + (d)

In order:
  (a) throughput rows in this process, plain PyTorch next to cmd-dist (about a minute): one ResNet-34
      eager and as one whole-step CUDA graph (CUDA only), then two cmd-dist peers in one process
      (CMD-P + Mconf, the engine's real step) with and without the whole-step graph; img/s per peer
      and ratios to the plain loops, measured in the same run;
  (b) every placement for one short run through Ray (cmd_dist.launch.job, the product path): all
      peers in one worker (``together``) and one worker per peer sharing the GPU (``separate``,
      0.5 GPU each, gloo); with one GPU, ``separate`` with a GPU each (NCCL) cannot run and is
      listed as such;
  (c) a paper cell (default ``configs/table1/cmdp_mconf.yaml``) through ``cmd-dist train`` for as
      many epochs as the budget allows, stopped cleanly with SIGTERM at the deadline;
  (d) only with ``--data-budget S`` (those seconds are kept from the cell's share): the input pipeline,
      ``benchmarks/data_throughput.py`` in a subprocess: a ResNet-50 step fed by streamed JPEGs decoded
      by the loader processes (row e) and by nvJPEG with the crops cut on the GPU (``data.decode=cuda``,
      row h), each as a ratio to the same step on a GPU-resident batch (row f) of the same run.
It prints one Markdown table last (placements, img/s per peer, ratios, s/epoch, test accuracy every
10 epochs) and writes it with the measurements to ``--out``. ``--device cpu --tiny`` runs the same
stages on a small slice with a small network (the CPU test suite does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray workers (stage b) and the CLI subprocess (stage c) import cmd_dist from this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))

from cmd_dist.config import load_config  # noqa: E402
from cmd_dist.data.augment import augment, normalize  # noqa: E402
from cmd_dist.data.prepare import prepare_data  # noqa: E402
from cmd_dist.data.resident import load_split  # noqa: E402
from cmd_dist.data.types import SPECS  # noqa: E402
from cmd_dist.method.dynamics import epoch_weight  # noqa: E402
from cmd_dist.models import build_model  # noqa: E402
from cmd_dist.train.exchange import Exchange  # noqa: E402
from cmd_dist.train.peers import build_peer  # noqa: E402
from cmd_dist.train.trainer import Trainer  # noqa: E402

CMD_P_MCONF = ["method.objective=cmd", "method.knowledge=cmd-p", "method.self_kd=mconf"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_synthetic_cifar100(root: Path, seed: int = 0) -> None:
    """Random images and labels in the exact CIFAR-100 pickle layout (for throughput when no data is at hand).

    Accuracies on it mean nothing; speeds, the step and every placement's code path are the real ones.
    """
    import pickle

    import numpy as np

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", 50_000), ("test", 10_000)):
        d = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": rng.integers(0, 100, n).tolist(),
            "coarse_labels": rng.integers(0, 20, n).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


# ----------------------------------------------------------------------------- (a) throughput


def plain_rows(args: argparse.Namespace, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Plain PyTorch, one model, softmax CE and SGD on the same device-resident images and augmentation."""
    spec = SPECS["cifar100"]
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    fast = device.type == "cuda"
    rows = []

    def make():
        torch.manual_seed(0)
        model = build_model(args.arch, 100, 3).to(device)
        if fast:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        return model, opt

    def batch(i: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, x.shape[0], (args.batch_size,), device=device, generator=gen)
        return normalize(augment(x[idx], 4, True, gen), mean, std), y[idx]

    def step(model, opt, xb, yb):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast, cache_enabled=False):
            out = model(xb.contiguous(memory_format=torch.channels_last) if fast else xb)
        loss = F.cross_entropy(out.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # eager
    model, opt = make()
    gen = torch.Generator(device=device).manual_seed(0)
    for i in range(args.warmup_steps):
        step(model, opt, *batch(i, gen))
    sync(device)
    t = time.perf_counter()
    for i in range(args.steps):
        step(model, opt, *batch(i, gen))
    sync(device)
    sec = time.perf_counter() - t
    rows.append(_row("plain PyTorch, 1 model, eager" + (" bf16 + channels_last" if fast else ""), 1, sec, args))

    if device.type == "cuda":  # whole step (forward, loss, backward, SGD) as one CUDA graph
        model, opt = make()
        sx, sy = batch(0, gen)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step(model, opt, sx, sy)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(g):
            step(model, opt, sx, sy)
        for i in range(args.warmup_steps):
            xb, yb = batch(i, gen)
            sx.copy_(xb)
            sy.copy_(yb)
            g.replay()
        sync(device)
        t = time.perf_counter()
        for i in range(args.steps):
            xb, yb = batch(i, gen)
            sx.copy_(xb)
            sy.copy_(yb)
            g.replay()
        sync(device)
        rows.append(
            _row("plain PyTorch, 1 model, whole step in one CUDA graph, bf16", 1, time.perf_counter() - t, args)
        )
    return rows


def _row(setup: str, peers: int, seconds: float, args: argparse.Namespace, **extra: Any) -> dict:
    images = args.steps * args.batch_size
    return {
        "setup": setup,
        "peers": peers,
        "ms_per_step": 1000.0 * seconds / args.steps,
        "images_per_s_per_peer": images / seconds,
        **extra,
    }


def cmd_row(args: argparse.Namespace, device: torch.device, graph: bool) -> dict:
    """Two (or --peers) cmd-dist peers in one process: the engine's Trainer, CMD-P + Mconf, timed epoch 2."""
    peers = ", ".join(f"{{arch: {args.arch}}}" for _ in range(args.peers))
    n = (args.steps + args.warmup_steps) * args.batch_size
    cfg = load_config(
        None,
        [
            "data.dataset=cifar100",
            f"data.root={args.data_root}",
            f"data.train_subset={n}",
            "data.test_subset=256",
            f"train.batch_size={args.batch_size}",
            "train.epochs=10",
            "train.log_every=0",
            f"train.cuda_graph={'true' if graph else 'false'}",
            "train.compile_mode=none",
            f"peers=[{peers}]",
        ]
        + CMD_P_MCONF,
    )
    data = prepare_data(cfg.data, cfg.noise, device)
    exchange = Exchange(len(cfg.peers))
    ps = [build_peer(cfg, k, 100, 3, device) for k in exchange.local_peers]
    trainer = Trainer(cfg, ps, exchange, data, device)
    trainer.train_one_epoch(0)  # warm-up: cuDNN choice, the graph's eager steps and its capture
    res = trainer.train_one_epoch(1)
    label = "cmd-dist together, CMD-P + Mconf, whole step in one CUDA graph" if graph else "cmd-dist together, eager"
    row = {
        "setup": label + (" bf16" if device.type == "cuda" else ""),
        "peers": args.peers,
        "ms_per_step": 1000.0 * res.seconds / data.steps_per_epoch(args.batch_size),
        "images_per_s_per_peer": res.images / res.seconds,
    }
    if trainer.graphed is not None:
        row["graph_captures"], row["graph_replays"] = trainer.graphed.captures, trainer.graphed.replays
    # The per-sample record (issue 21) under the graph: after 2 epochs every sample counted exactly twice (a replay
    # with stale ids, or a capture that also ran, would count some samples more and others less).
    # The late-weighted sums are folded in after each epoch: every sample carries the two epochs' weights.
    weights = epoch_weight(0, cfg.train.epochs) + epoch_weight(1, cfg.train.epochs)
    row["record_ok"] = all(
        bool((p.dynamics.seen == 2).all())
        and bool((p.dynamics.last_pred >= 0).all())
        and bool(torch.allclose(p.dynamics.weight_sum, torch.full_like(p.dynamics.weight_sum, weights)))
        for p in ps
    )
    return row


# ----------------------------------------------------------------------------- (b) placements through Ray


def placement_rows(args: argparse.Namespace, device: torch.device, out: Path) -> list[dict]:
    try:
        from cmd_dist.launch import cluster, job
    except ImportError as e:  # no Ray on this machine
        return [{"setup": "placements through Ray", "error": f"skipped: {e}"}]
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    peers = ", ".join(f"{{arch: {args.arch}}}" for _ in range(args.peers))
    base = [
        "data.dataset=cifar100",
        f"data.root={args.data_root}",
        f"data.train_subset={args.placement_images}",
        "data.test_subset=1000",
        "train.epochs=2",
        "train.log_every=0",
        f"peers=[{peers}]",
        f"output_dir={args.run_root / 'placements'}",
        f"ray.use_gpu={'true' if gpus else 'false'}",
        "ray.cpus_per_worker=0.5" if device.type == "cpu" else "ray.cpus_per_worker=1",
    ] + CMD_P_MCONF
    cases = [("together", ["ray.placement=together", "ray.gpus_per_worker=1"])]
    cases.append(
        (
            "separate, shared GPU (0.5 GPU each, gloo)" if gpus == 1 else "separate",
            [
                "ray.placement=separate",
                f"ray.gpus_per_worker={1 if gpus >= args.peers else round(1 / args.peers, 3)}",
            ],
        )
    )
    rows = []
    for name, extra in cases:
        run_name = name.split(",")[0]
        cfg = load_config(None, base + extra + [f"run_name={run_name}"])
        start = time.perf_counter()
        try:
            run_dir = job.resolve_run_dir(cfg)
            cluster.init_ray(cfg)
            summary = job.train(cfg, run_dir)
            rows.append(
                {
                    "setup": f"ray.placement={name}",
                    "peers": args.peers,
                    "images_per_s_per_peer": _rate_from_jsonl(run_dir),
                    "wall_s": time.perf_counter() - start,
                    "test_acc": summary.get("mean_test_acc"),
                }
            )
        except Exception as e:  # noqa: BLE001 - a placement failing is a finding, not the end of the check
            rows.append({"setup": f"ray.placement={name}", "error": f"{type(e).__name__}: {str(e)[:300]}"})
    if gpus < 2 and args.peers > 1:
        rows.append({"setup": "ray.placement=separate, one GPU each (NCCL)", "error": f"not run: {gpus} GPU(s) here"})
    return rows


def _rate_from_jsonl(run_dir: Path) -> float:
    """images/s of one peer in the last epoch, from metrics.jsonl (train images / the epoch's train time)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_epoch = max(r["epoch"] for r in rows)
    rates = [r.get("images_per_s") for r in rows if r["epoch"] == last_epoch and r.get("images_per_s")]
    return float(statistics.mean(rates)) if rates else math.nan


# ----------------------------------------------------------------------------- (c) a paper cell


_LOCAL_CELL = (
    "import sys, torch; from cmd_dist.config import load_config; from cmd_dist.train.local import run_local; "
    "cfg = load_config(sys.argv[1], sys.argv[3:]); "
    "run_local(cfg, cfg.output_dir + '/' + cfg.run_name, device=sys.argv[2], echo=True)"
)


def paper_cell(args: argparse.Namespace, out: Path, seconds: float) -> dict:
    """``cmd-dist train CONFIG`` in a subprocess, SIGTERM at the deadline; epochs read from metrics.jsonl.

    ``--cell-local``: the same training loop in one plain process (cmd_dist.train.local.run_local), no Ray.
    """
    run_root = args.run_root / "cell"
    overrides = [f"data.root={args.data_root}", f"output_dir={run_root}", "run_name=cell", *args.cell_overrides]
    if args.cell_local:
        cmd = [sys.executable, "-c", _LOCAL_CELL, args.config, args.device, *overrides]
    else:
        cmd = [sys.executable, "-m", "cmd_dist.cli", "train", args.config, *overrides]
    env = dict(os.environ)
    log_path = out / "cell.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(5.0, seconds))
            stopped = False
        except subprocess.TimeoutExpired:
            stopped = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    wall = time.perf_counter() - start
    metrics = run_root / "cell" / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    by_epoch: dict[int, list[dict]] = {}
    for r in rows:
        by_epoch.setdefault(int(r["epoch"]), []).append(r)
    epochs = sorted(by_epoch)
    split = rows[0]["eval_split"] if rows else "test"
    acc = {
        e: statistics.mean(r[f"{split}_acc"] if f"{split}_acc" in r else r["eval_acc"] for r in by_epoch[e])
        for e in epochs
    }
    rates = [statistics.mean(r.get("images_per_s", math.nan) for r in by_epoch[e]) for e in epochs[1:]]
    # evaluation + checkpoint + report per epoch: epoch wall (between consecutive log times) minus train time
    times = [statistics.mean(r["time"] for r in by_epoch[e]) for e in epochs if all("time" in r for r in by_epoch[e])]
    trains = [statistics.mean(r.get("train_s", math.nan) for r in by_epoch[e]) for e in epochs]
    overhead = [
        (times[i] - times[i - 1] - trains[i]) / (times[i] - times[i - 1])
        for i in range(2, min(len(times), len(trains)))
        if times[i] > times[i - 1]
    ]
    evals = [statistics.mean(r.get("eval_s", math.nan) for r in by_epoch[e]) for e in epochs[1:]]
    summary_path = run_root / "cell" / "summary.json"
    keep = out / "cell_files"  # the small files of the run (not its checkpoints) next to the table
    keep.mkdir(exist_ok=True)
    for name in ("metrics.jsonl", "summary.json", "config.yaml"):
        if (run_root / "cell" / name).is_file():
            shutil.copy2(run_root / "cell" / name, keep / name)
    return {
        "config": args.config,
        "overrides": args.cell_overrides,
        "rc": rc,
        "stopped_at_deadline": stopped,
        "wall_s": wall,
        "epochs_done": len(epochs),
        "s_per_epoch_wall": (wall / len(epochs)) if epochs else math.nan,
        "images_per_s_per_peer": statistics.median(rates) if rates else math.nan,
        "acc_by_epoch": acc,
        "overhead_fraction_median": statistics.median(overhead) if overhead else math.nan,
        "overhead_fraction_max": max(overhead) if overhead else math.nan,
        "eval_s_median": statistics.median(evals) if evals else math.nan,
        "train_s_median": statistics.median(trains[1:]) if len(trains) > 1 else math.nan,
        "eval_split": split,
        "summary": json.loads(summary_path.read_text()) if summary_path.is_file() else None,
        "log_tail": log_path.read_text()[-3000:],
    }


# ----------------------------------------------------------------------------- (d) the input pipeline


def data_rows(args: argparse.Namespace, out: Path, seconds: float) -> dict:
    """``benchmarks/data_throughput.py`` in a subprocess, stopped at the deadline; its rows and ratios."""
    if args.tiny:
        extra = ["--images", "24", "--workers", "0", "--batch", "8", "--size", "32", "--repeats", "1"]
        extra += ["--model", "cnn_small"]
    else:
        workers = max(1, min(15, (os.cpu_count() or 2) - 1))
        extra = ["--images", "8192", "--workers", str(workers), "--batch", "128", "--repeats", "2"]
        extra += ["--model", "resnet50", "--rows", "b", "e", "f", "g", "h"]
    start = time.perf_counter()
    # First the GPU decode path's own tests (nvJPEG against the CPU path, no host sync): seconds, and a wrong
    # pixel would make the figures below meaningless. They skip on a machine without CUDA.
    test_file = "tests/unit/data/test_gpu_decode.py"
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "cuda"]
    tests_rc, tests_tail = _run_logged(tests, out / "gpu_decode_tests.log", min(90.0, seconds / 3))
    result = out / "data_throughput.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "data_throughput.py"), "--device", args.device]
    cmd += ["--json", str(result), *extra, *args.data_args]
    rc, tail = _run_logged(cmd, out / "data_throughput.log", seconds - (time.perf_counter() - start))
    info = json.loads(result.read_text()) if rc == 0 and result.is_file() else {}
    return {
        "tests_rc": tests_rc,
        "tests_tail": tests_tail,
        "command": " ".join(cmd[1:]),
        "rc": rc,
        "rows": info.get("rows", []),
        "skipped": info.get("skipped", []),
        "header": info.get("table", "").splitlines()[0] if info else "",
        "log_tail": tail,
    }


def _run_logged(cmd: list[str], log_path: Path, seconds: float) -> tuple[int, str]:
    """``cmd`` from the checkout, output to ``log_path``, killed after ``seconds``; (exit code, the log's tail)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(5.0, seconds))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    return rc, log_path.read_text()[-3000:]


# ----------------------------------------------------------------------------- table


def table(info: dict) -> str:
    lines = [
        f"gpu_check on {info['device_name']} ({info['date']}), torch {info['torch']}, batch {info['batch_size']}, "
        f"{info['arch']}"
        + (" (synthetic data: speeds only, accuracies meaningless)" if info["synthetic_data"] else ""),
        "",
        "| stage | setup | peers | ms/step | img/s per peer | ratio to plain eager | ratio to plain graph | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    a = info["throughput"]
    eager = next(
        (r["images_per_s_per_peer"] for r in a if r["setup"].startswith("plain PyTorch, 1 model, eager")), None
    )
    graph = next(
        (r["images_per_s_per_peer"] for r in a if "plain PyTorch" in r["setup"] and "graph" in r["setup"]), None
    )

    def ratio(v, ref):
        return f"{v / ref:.2f}" if v and ref and not math.isnan(v) else "-"

    for r in a:
        v = r["images_per_s_per_peer"]
        lines.append(
            f"| (a) | {r['setup']} | {r['peers']} | {r['ms_per_step']:.2f} | {v:,.0f} | {ratio(v, eager)} | "
            f"{ratio(v, graph)} | {'captures ' + str(r['graph_captures']) if 'graph_captures' in r else ''}"
            f"{'' if 'record_ok' not in r else ' per-sample record ' + ('ok' if r['record_ok'] else 'WRONG')} |"
        )
    for r in info["placements"]:
        if "error" in r:
            lines.append(f"| (b) | {r['setup']} | | | | | | {r['error']} |")
            continue
        v = r["images_per_s_per_peer"]
        lines.append(
            f"| (b) | {r['setup']} | {r['peers']} | | {v:,.0f} | {ratio(v, eager)} | {ratio(v, graph)} | "
            f"wall {r['wall_s']:.0f} s incl. Ray start-up |"
        )
    c = info.get("cell")
    if c:
        v = c["images_per_s_per_peer"]
        stop = ", stopped at the deadline" if c["stopped_at_deadline"] else ""
        lines.append(
            f"| (c) | {Path(c['config']).name} {' '.join(c['overrides'])} | | | {v:,.0f} | {ratio(v, eager)} | "
            f"{ratio(v, graph)} | {c['epochs_done']} epochs in {c['wall_s']:.0f} s wall "
            f"({c['s_per_epoch_wall']:.2f} s/epoch incl. start-up){stop}, rc {c['rc']}; train "
            f"{c['train_s_median']:.2f} s/epoch, eval+checkpoint+report {100 * c['overhead_fraction_median']:.1f}% "
            f"of an epoch (median; max {100 * c['overhead_fraction_max']:.1f}%) |"
        )
        accs = c["acc_by_epoch"]
        marks = [e for e in sorted(accs) if e % 10 == 0 or e == max(accs)]
        if marks:
            lines += [
                "",
                f"{c['eval_split']} accuracy (mean of peers, %) by epoch:",
                "",
                "| epoch | " + " | ".join(str(e) for e in marks) + " |",
                "| --- | " + " | ".join("---" for _ in marks) + " |",
                "| acc | " + " | ".join(f"{accs[e]:.2f}" for e in marks) + " |",
            ]
    d = info.get("data")
    if d:
        summary = d["tests_tail"].strip().splitlines()[-1] if d["tests_tail"].strip() else ""
        lines.append(f"| (d) | tests/unit/data/test_gpu_decode.py -k cuda | | | | | | rc {d['tests_rc']}: {summary} |")
        if d["rc"] != 0:
            lines.append(f"| (d) | input pipeline (data_throughput.py) | | | | | | failed or stopped, rc {d['rc']} |")
        for r in d["rows"]:
            vs = f"{r['ratio_to_f']:.2f} of the resident step (f)" if r.get("ratio_to_f") else ""
            lines.append(f"| (d) | ({r['key']}) {r['pipeline']} | | | {r['images_per_s']:,.0f} | | | {vs} |")
        for line in d["skipped"]:
            lines.append(f"| (d) | | | | | | | {line} |")
        if d["header"]:
            lines += ["", f"(d): {d['header']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True, help="folder holding cifar-100-python/")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all stages together")
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--run-root", default=None, help="where the runs (with checkpoints) go; default --out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default="configs/table1/cmdp_mconf.yaml")
    ap.add_argument("--cell-overrides", nargs="*", default=None, help="key=value for the paper cell")
    ap.add_argument("--arch", default="resnet34")
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100, help="timed steps per throughput row")
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--placement-images", type=int, default=12800)
    ap.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c", "d"])
    ap.add_argument(
        "--data-budget",
        type=float,
        default=0.0,
        help="seconds of --budget kept for stage (d), the input pipeline, run after the cell (0: no stage d)",
    )
    ap.add_argument("--data-args", nargs="*", default=[], help="more arguments for benchmarks/data_throughput.py")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: cnn_small, few steps, a 2-epoch cell slice")
    ap.add_argument("--synthetic", action="store_true", help="write random CIFAR-100-layout data to --data-root first")
    ap.add_argument("--cell-local", action="store_true", help="run the cell in one process without Ray")
    args = ap.parse_args(argv)
    deadline = time.perf_counter() + args.budget
    device = torch.device(args.device)
    if args.tiny:
        args.arch, args.steps, args.warmup_steps, args.placement_images = "cnn_small", 4, 2, 512
    if args.cell_overrides is None:
        args.cell_overrides = []  # the config as a user runs it: ray.placement auto decides where the peers go
        if args.tiny:
            args.cell_overrides += [
                "peers=[{arch: cnn_small, name: peerA}, {arch: cnn_small, name: peerB}]",
                "data.train_subset=512",
                "data.test_subset=256",
                "train.epochs=2",
                "ray.cpus_per_worker=0.5",
            ]
    args.data_root = str(Path(args.data_root).resolve())
    if args.synthetic:
        write_synthetic_cifar100(Path(args.data_root))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.run_root = Path(args.run_root).resolve() if args.run_root else out
    args.run_root.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "synthetic_data": args.synthetic,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "arch": args.arch,
        "throughput": [],
        "placements": [],
        "cell": None,
        "data": None,
    }
    run_data = "d" not in args.skip and args.data_budget > 0
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    if "a" not in args.skip:
        x, y = load_split("cifar100", args.data_root, "train")
        n = (args.steps + args.warmup_steps) * args.batch_size
        x, y = x[:n].to(device), y[:n].to(device)
        info["throughput"] += plain_rows(args, device, x, y)
        for graph in [True, False] if device.type == "cuda" else [False]:
            try:
                info["throughput"].append(cmd_row(args, device, graph))
            except Exception as e:  # noqa: BLE001 - report and go on to the other stages
                info["throughput"].append(
                    {
                        "setup": f"cmd-dist together graph={graph}",
                        "peers": args.peers,
                        "ms_per_step": math.nan,
                        "images_per_s_per_peer": math.nan,
                        "error": f"{type(e).__name__}: {str(e)[:300]}",
                    }
                )
        print(f"(a) done, {deadline - time.perf_counter():.0f} s left", flush=True)
    if "b" not in args.skip:
        info["placements"] = placement_rows(args, device, out)
        try:
            import ray

            ray.shutdown()  # the cell starts its own Ray in its own process
        except ImportError:
            pass
        print(f"(b) done, {deadline - time.perf_counter():.0f} s left", flush=True)
    if "c" not in args.skip:
        remaining = deadline - time.perf_counter() - 45.0  # leave time for SIGTERM, the table and the copy-back
        remaining -= args.data_budget if run_data else 0.0
        if remaining > 30:
            info["cell"] = paper_cell(args, out, remaining)
    if run_data:
        seconds = min(args.data_budget, deadline - time.perf_counter() - 15.0)
        if seconds > 20:
            info["data"] = data_rows(args, out, seconds)
            print(f"(d) done, {deadline - time.perf_counter():.0f} s left", flush=True)
    text = table(info)
    (out / "gpu_check.json").write_text(json.dumps(info, indent=2, default=str))
    (out / "gpu_check.md").write_text(text + "\n")
    print(text, flush=True)
    info["table"] = text
    return info


if __name__ == "__main__":
    main()
    sys.exit(0)
