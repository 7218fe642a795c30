"""Replicas per peer: cmd-dist's 2 peers x R DDP replicas next to plain PyTorch DDP of the same 2 models.

Rows (same architecture, global batch, data, device and process layout: 2 x R ranks, rank r is replica
r // 2 of peer r % 2, as ``ray.replicas_per_peer`` lays them out):

  (a) plain PyTorch DDP: each of the 2 models is R DDP replicas over its own process group; every replica
      trains on its slice of the same global batch with softmax cross-entropy; no knowledge exchange;
  (b) cmd-dist, CMD-P + Mconf, ``ray.replicas_per_peer=R``: the engine's Trainer (each batch: the exchange
      between replica j of both peers, the confidence-masked objective, DDP's gradient averaging).

Both rows run in the same processes, interleaved epoch by epoch (rotating order); the first ``--warmup``
rounds are not timed; an epoch's time is the slowest rank's; a row's rate is that of its median timed epoch.
Reported: images per second per peer (global-batch images) and (b) / (a). Read the ratio, not the rates.

    .venv/bin/python benchmarks/replicas.py                          # CPU, gloo: 2 peers x 2 replicas, digits
    .venv/bin/python benchmarks/replicas.py --replicas 1             # the same without replicas
    .venv/bin/python benchmarks/replicas.py --device cuda --arch resnet34 --dataset cifar100 --replicas 2
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"data.dataset={args.dataset}",
        f"data.root={args.data_root}",
        f"train.batch_size={args.batch_size}",
        f"train.epochs={args.warmup + args.epochs + 1}",
        "train.milestones=[1000]",
        "train.log_every=0",
        "method.objective=cmd",
        "method.knowledge=cmd-p",
        "method.self_kd=mconf",
        f"peers=[{{arch: {args.arch}, name: peerA}}, {{arch: {args.arch}, name: peerB}}]",
        f"ray.replicas_per_peer={args.replicas}",
        "ray.placement=separate",
        "ray.cpus_per_worker=1",
    ]


def _rank_main(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from cmd_dist.config import load_config
    from cmd_dist.data.prepare import prepare_data
    from cmd_dist.data.types import WHOLE, Shard
    from cmd_dist.models import build_model
    from cmd_dist.train.exchange import Exchange
    from cmd_dist.train.peers import build_peer
    from cmd_dist.train.trainer import Trainer

    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        cfg = load_config(DEMO, _overrides(args))
        data = prepare_data(cfg.data, cfg.noise, device)
        ex = Exchange(2, args.replicas)
        spec = data.spec
        peers = [build_peer(cfg, k, spec.num_classes, spec.channels, device, spec.size) for k in ex.local_peers]
        trainer = Trainer(cfg, peers, ex, data, device)

        # (a) plain PyTorch DDP: the same network (same init), the same slices of the same batches.
        k = ex.local_peers[0]
        torch.manual_seed(cfg.seed * 1000 + k)
        net = build_model(cfg.peers[k].arch, spec.num_classes, spec.channels, spec.size).to(device)
        if peers[0].fast:
            net = net.to(memory_format=torch.channels_last)
        ddp = DistributedDataParallel(net, process_group=ex.peer_group) if args.replicas > 1 else net
        t = cfg.train
        opt = torch.optim.SGD(net.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        shard = Shard(ex.replica, args.replicas) if args.replicas > 1 else WHOLE

        def plain_epoch(epoch: int) -> None:
            ddp.train()
            kw = {"shard": shard} if args.replicas > 1 else {}
            for b in data.epoch_batches(epoch, [k], t.batch_size, cfg.seed, **kw):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=peers[0].fast):
                    loss = F.cross_entropy(ddp(b.xs[0]).float(), b.y)
                opt.zero_grad(set_to_none=True)
                (loss * (b.share * args.replicas)).backward()
                opt.step()

        rows = {"plain": plain_epoch, "cmd": lambda e: trainer.train_one_epoch(e)}
        times: dict[str, list[float]] = {name: [] for name in rows}
        order = list(rows)
        for r in range(args.warmup + args.epochs):
            for name in order[r % 2 :] + order[: r % 2]:
                dist.barrier()
                start = time.perf_counter()
                rows[name](r)
                if cuda:
                    torch.cuda.synchronize()
                spent = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(spent, op=dist.ReduceOp.MAX)  # an epoch ends when its slowest rank does
                if r >= args.warmup:
                    times[name].append(float(spent))
        if rank == 0:
            Path(out).write_text(json.dumps({"times": times, "images": data.num_train}))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--arch", default="cnn_small_gn")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs per row")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    world = 2 * args.replicas
    if args.device == "cuda" and torch.cuda.device_count() < world:
        print(f"replicas.py: {world} ranks need {world} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.start_processes(
            _rank_main, args=(world, os.path.join(tmp, "init"), args, out), nprocs=world, start_method="spawn"
        )
        res = json.loads(Path(out).read_text())
    rate = {name: res["images"] / statistics.median(ts) for name, ts in res["times"].items()}
    ratio = rate["cmd"] / rate["plain"]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.device}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: 2 peers x {args.replicas} replicas ({world} ranks), "
        f"{args.arch} on {args.dataset}, global batch {args.batch_size}, median of {args.epochs} epochs"
    )
    print("| row | images/s per peer | ratio to (a) |\n| --- | --- | --- |")
    print(f"| (a) plain PyTorch DDP, cross-entropy | {rate['plain']:,.0f} | 1.00 |")
    print(f"| (b) cmd-dist CMD-P + Mconf, replicas_per_peer={args.replicas} | {rate['cmd']:,.0f} | {ratio:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rate": rate, "ratio": ratio, **res}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
