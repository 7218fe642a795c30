"""Label-issue detection: cmd-dist's single-run detector against cleanlab on K-fold out-of-sample probabilities.

Issue 21 point 3. The same data (scikit-learn's digits, the 1,438-image training part, corrupted by cmd-dist's own
synthetic noise, Sec. 5.1) and the same network (``cnn_small``, SGD with the demo's learning rate, momentum, weight
decay, schedule, batch size and augmentation), per noise setting and seed:

  (a) **cmd-dist**: one CMD run of two peers (``configs/demo.yaml``: CMD-P + Mconf) in this process
      (:func:`cmd_dist.train.local.run_local`, no Ray), then :mod:`cmd_dist.infer.labels` on its last checkpoint:
      the flag (its threshold chosen without the clean labels) and the score;
  (b) **cleanlab**: ``cleanlab.filter.find_label_issues(labels, pred_probs)`` (its defaults: prune by noise rate)
      on out-of-sample probabilities from K-fold cross-validation (stratified, K = ``--folds``): K networks, each
      trained with cross entropy on the other K-1 folds for the same epochs, predicting its held-out fold; its score
      for AUROC is ``cleanlab.rank.get_label_quality_scores`` (self-confidence, low first).

Reported per setting (mean over seeds): F1 and AUROC of each detector against the known flipped labels, wall time
of training (+ scoring), and the training cost in network-sample passes: (a) 2 peers x E epochs x N, (b) K x E x
N (K-1)/K. The issue's goal: (a)'s F1 at least (b)'s at 1/K of (b)'s training cost. Writes
``benchmarks/results/<date>-label-issues/summary.json`` and prints a Markdown table.

cleanlab is AGPL-3.0: an optional dependency of this benchmark only (``pip install cmd-dist[bench]``), never
imported by cmd_dist.

    .venv/bin/python benchmarks/label_issues.py                          # 4 settings x 2 seeds, K = 5
    .venv/bin/python benchmarks/label_issues.py --seeds 0 1 2 --epochs 20 --folds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmd_dist.config import load_config  # noqa: E402
from cmd_dist.data.augment import normalize  # noqa: E402
from cmd_dist.data.prepare import prepare_data  # noqa: E402
from cmd_dist.infer.labels import detection_metrics, peer_records, score_samples  # noqa: E402
from cmd_dist.infer.loading import open_trained_run  # noqa: E402
from cmd_dist.models import build_model  # noqa: E402
from cmd_dist.runs.fs import atomic_write_bytes  # noqa: E402
from cmd_dist.train.local import run_local  # noqa: E402

SETTINGS = [("symmetric", 0.2), ("symmetric", 0.4), ("pairflip", 0.2), ("pairflip", 0.4)]


def overrides(kind: str, rate: float, seed: int, epochs: int) -> list[str]:
    milestones = [round(epochs * 0.7), round(epochs * 0.9)]  # the demo's [14, 18] of 20, scaled
    return [
        f"noise.kind={kind}",
        f"noise.rate={rate}",
        f"noise.seed={seed}",
        f"seed={seed}",
        f"train.epochs={epochs}",
        f"train.milestones={milestones}",
        "train.log_every=0",
    ]


def ours(cfg, tmp: Path) -> dict:
    """(a): one CMD run, then the detector on its last checkpoint."""
    start = time.perf_counter()
    run_local(cfg, tmp / "run")
    train_s = time.perf_counter() - start
    run = open_trained_run(str(tmp / "run"), "last")
    data = prepare_data(cfg.data, cfg.noise)
    labels, clean = data.train_labels.numpy(), data.train_clean.numpy()
    s = score_samples(peer_records(run), labels, run.spec.num_classes)
    m = detection_metrics(s.score, s.flag, labels != clean)
    return {"train_s": train_s, "total_s": time.perf_counter() - start, **m, "passes": 2 * cfg.train.epochs}


def _train_fold(cfg, data, idx: torch.Tensor, seed: int) -> torch.nn.Module:
    """One network, cross entropy on the noisy labels of ``idx``, the demo's optimiser, schedule and augmentation."""
    t = cfg.train
    torch.manual_seed(seed)
    net = build_model(cfg.peers[0].arch, data.spec.num_classes, data.spec.channels, data.spec.size)
    opt = torch.optim.SGD(net.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=t.milestones, gamma=t.gamma)
    fold = dataclasses.replace(
        data, train_x=data.train_x[idx], train_labels=data.train_labels[idx], train_clean=data.train_clean[idx]
    )
    net.train()
    for epoch in range(t.epochs):
        for b in fold.epoch_batches(epoch, [0], t.batch_size, seed):
            loss = F.cross_entropy(net(b.xs[0]), b.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


def cleanlab_kfold(cfg, folds: int, seed: int) -> dict:
    """(b): K-fold out-of-sample probabilities, then cleanlab's find_label_issues."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    start = time.perf_counter()
    data = prepare_data(cfg.data, cfg.noise)
    labels, clean = data.train_labels.numpy(), data.train_clean.numpy()
    probs = np.zeros((len(labels), data.spec.num_classes), dtype=np.float32)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for f, (train_idx, held_idx) in enumerate(split.split(np.zeros(len(labels)), labels)):
        net = _train_fold(cfg, data, torch.from_numpy(train_idx), seed * 100 + f)
        with torch.no_grad():
            x = normalize(data.train_x[torch.from_numpy(held_idx)], data.mean, data.std)
            probs[held_idx] = torch.softmax(net(x), 1).numpy()
    train_s = time.perf_counter() - start
    issues = find_label_issues(labels, probs)
    quality = get_label_quality_scores(labels, probs)
    m = detection_metrics(-quality, issues, labels != clean)
    return {"train_s": train_s, "total_s": time.perf_counter() - start, **m, "passes": (folds - 1) * cfg.train.epochs}


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def table(results: dict, folds: int) -> list[str]:
    lines = [
        "| noise | cmd-dist F1 | cleanlab F1 | cmd-dist score AUROC | cleanlab score AUROC | cmd-dist train s | "
        f"cleanlab ({folds}-fold) train s | time ratio | cost ratio (passes) | goal met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        a, b = r["cmd-dist"], r["cleanlab"]
        f1a, f1b = _mean(a, "flag_f1"), _mean(b, "flag_f1")
        time_ratio = _mean(a, "train_s") / _mean(b, "train_s")
        cost = a[0]["passes"] / b[0]["passes"]
        met = f1a >= f1b and time_ratio <= 1 / folds
        lines.append(
            f"| {name} | {f1a:.3f} | {f1b:.3f} | {_mean(a, 'score_auroc'):.3f} | {_mean(b, 'score_auroc'):.3f} | "
            f"{_mean(a, 'train_s'):.1f} | {_mean(b, 'train_s'):.1f} | {time_ratio:.2f} | {cost:.2f} | "
            f"{'yes' if met else 'no'} (F1 {'>=' if f1a >= f1b else '<'}, time {time_ratio:.2f} vs 1/{folds}) |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--settings", nargs="+", default=[f"{k}:{r}" for k, r in SETTINGS], help="kind:rate ...")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both detectors alike)")
    ap.add_argument("--out", default=None, help="folder (default benchmarks/results/<date>-label-issues)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    date = datetime.date.today().isoformat()
    out = Path(args.out or REPO / "benchmarks" / "results" / f"{date}-label-issues")
    results: dict[str, dict[str, list[dict]]] = {}
    started = time.perf_counter()
    for setting in args.settings:
        kind, rate = setting.split(":")
        name = f"{kind} {float(rate):.0%}"
        for seed in args.seeds:
            cfg = load_config(REPO / "configs" / "demo.yaml", overrides(kind, float(rate), seed, args.epochs))
            with tempfile.TemporaryDirectory(prefix="cmd-dist-bench-") as tmp:
                a = ours(cfg, Path(tmp))
            b = cleanlab_kfold(cfg, args.folds, seed)
            results.setdefault(name, {"cmd-dist": [], "cleanlab": []})
            results[name]["cmd-dist"].append({"seed": seed, **a})
            results[name]["cleanlab"].append({"seed": seed, **b})
            print(
                f"{name} seed {seed}: cmd-dist F1 {a['flag_f1']:.3f} AUROC {a['score_auroc']:.3f} "
                f"{a['train_s']:.1f} s | cleanlab F1 {b['flag_f1']:.3f} AUROC {b['score_auroc']:.3f} "
                f"{b['train_s']:.1f} s",
                flush=True,
            )
    lines = table(results, args.folds)
    print("\n".join(lines))
    import cleanlab

    summary = {
        "date": date,
        "machine": f"{platform.node()}: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch thread(s), shared CPU",
        "torch": torch.__version__,
        "cleanlab": cleanlab.__version__,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "folds": args.folds,
        "wall_s": time.perf_counter() - started,
        "results": results,
        "table": lines,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
