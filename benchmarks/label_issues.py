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

  (c) **cmd-dist at 1/K of cleanlab's cost**: (a) again with E' = (K-1) E / (2K) epochs (8 of 20 for K = 5), so
      its 2 peers x E' passes over the data are 1/K of (b)'s K x (K-1)/K x E.

Reported per setting (mean over seeds): F1 of the flag and AUROC of the score of each detector against the known
flipped labels, the training cost in passes over the data of one network ("passes"), and wall times (median over
seeds): training (cmd-dist's includes its start-up, the test evaluation after every epoch and the checkpoint) and
cmd-dist's epoch loops alone (``loop_s``, the steps of every epoch as metrics.jsonl's ``train_s`` records them).
The issue's goal: at least (b)'s F1 at 1/K of (b)'s training cost, judged on (c). Writes
``benchmarks/results/<date>-label-issues/summary.json`` and prints a Markdown table.

The issue's CIFAR rows (``--dataset``): ``cifar100``, CIFAR-100 with 40% symmetric noise, the method and network
of paper Table 1's best cell (``configs/table1/cmdp_mconf.yaml``: CMD-P + Mconf, two ResNet-34, SGD lr 0.1, batch
128, milestones [50, 80] of 100 epochs scaled to ``--epochs``); ``cifar100n``, the same recipe on CIFAR-100N's
human ``noisy_fine`` labels (``configs/cifarn/cifar100n_noisy_fine.yaml``, Wei et al., ICLR 2022; clean labels
known, so F1 and AUROC as above). cleanlab's networks get the run's augmentation (pad 4, random crop 32, flip) from
the same ``epoch_batches``, and on CUDA (``--device cuda``) the run's bf16 autocast on channels_last. ``--arch``,
``--train-subset``, ``--test-subset`` and ``--data-root`` (the folder of ``cifar-100-python/`` and ``cifar-n/``)
make a CPU slice; results go to ``benchmarks/results/<date>-label-issues-<dataset>/``. docs/label_issues.md,
"CIFAR rows", has the GPU command and the CPU slice measured.

cleanlab is AGPL-3.0: an optional dependency of this benchmark only (``pip install cmd-dist[bench]``), never
imported by cmd_dist.

    .venv/bin/python benchmarks/label_issues.py                  # 4 settings x 3 seeds, 20 epochs, K = 5
    .venv/bin/python benchmarks/label_issues.py --seeds 0 --epochs 5 --folds 3 --settings symmetric:0.4
    .venv/bin/python benchmarks/label_issues.py --dataset cifar100n --device cuda --epochs 100 --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmd_dist.config import dump_yaml, load_config  # noqa: E402
from cmd_dist.data.augment import normalize  # noqa: E402
from cmd_dist.data.prepare import prepare_data  # noqa: E402
from cmd_dist.infer.labels import detection_metrics, peer_records, score_samples  # noqa: E402
from cmd_dist.infer.loading import open_trained_run  # noqa: E402
from cmd_dist.models import build_model  # noqa: E402
from cmd_dist.runs.fs import atomic_write_bytes  # noqa: E402
from cmd_dist.train.local import run_local  # noqa: E402
from cmd_dist.train.peers import fast_path_enabled  # noqa: E402

SETTINGS = [("symmetric", 0.2), ("symmetric", 0.4), ("pairflip", 0.2), ("pairflip", 0.4)]


def overrides(kind: str, rate, seed: int, epochs: int, fractions: tuple[float, ...] = (0.7, 0.9)) -> list[str]:
    """The per-run overrides: noise, seeds, epochs and the config's milestones scaled to ``epochs`` (``fractions``:
    the demo's [14, 18] of 20 = (0.7, 0.9); the CIFAR configs' [50, 80] of 100 = (0.5, 0.8)). ``kind`` ``human``:
    ``rate`` is the CIFAR-N label set (no synthetic noise, so no ``noise.rate``)."""
    milestones = [max(1, round(epochs * f)) for f in fractions]  # >= 1: a config rule (digits: always >= 1)
    noise = [f"noise.label_set={rate}"] if kind == "human" else [f"noise.kind={kind}", f"noise.rate={rate}"]
    return [
        *noise,
        f"noise.seed={seed}",
        f"seed={seed}",
        f"train.epochs={epochs}",
        f"train.milestones={milestones}",
        "train.log_every=0",
        f"train.checkpoint_every={epochs}",  # one checkpoint, after the last epoch: the one label-issues reads
    ]


def ours(cfg, tmp: Path, save: Path | None = None, device: str = "cpu") -> dict:
    """(a): one CMD run, then the detector on its last checkpoint; ``save``: an .npz of its per-sample record."""
    start = time.perf_counter()
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_text(dump_yaml(cfg))  # what cmd-dist train writes first
    run_local(cfg, tmp / "run", device)
    train_s = time.perf_counter() - start
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    loop_s = sum(r["train_s"] for r in rows if r.get("peer") == cfg.peers[0].name)  # the epochs' steps only
    run = open_trained_run(str(tmp / "run"), "last")
    data = prepare_data(cfg.data, cfg.noise)
    labels, clean = data.train_labels.numpy(), data.train_clean.numpy()
    records = peer_records(run)
    s = score_samples(records, labels, run.spec.num_classes)
    m = detection_metrics(s.score, s.flag, labels != clean)
    total_s = time.perf_counter() - start
    if save is not None:  # the per-sample record, to compute other thresholds from the same trained run
        save.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"peer{k}_{key}": v for k, r in enumerate(records) for key, v in r.items()}
        np.savez_compressed(save, labels=labels, clean=clean, score=s.score, **arrays)
    return {
        "train_s": train_s,
        "loop_s": loop_s,
        "total_s": total_s,
        **m,
        "passes": 2 * cfg.train.epochs,
        "thresholds": threshold_variants(s, labels != clean),
    }


def threshold_variants(s, noisy: np.ndarray) -> dict:
    """The flag's F1 under three clean-label-free counts n (each flags the top n scores), from the same run:
    ``confident_joint`` (the CLI's rule), ``agreed_differs`` (the samples whose agreed label is not the given one, the
    rule before), ``gmm_aum`` (DivideMix's rule, Li et al., ICLR 2020, Sec. 3.1: a two-component Gaussian mixture
    fitted to the peers' mean late-weighted AUM, the score's quantity, n = the samples whose posterior of the
    low-mean component exceeds 0.5)."""
    from sklearn.metrics import precision_recall_fscore_support
    from sklearn.mixture import GaussianMixture

    aum = np.nanmean(s.late_aum, axis=0)
    ok = ~np.isnan(aum)
    gmm = GaussianMixture(2, max_iter=100, tol=1e-3, reg_covar=1e-4, random_state=0).fit(aum[ok, None])
    low = int(np.argmin(gmm.means_[:, 0]))
    counts = {
        "confident_joint": s.n_est,
        "agreed_differs": s.n_disagree,
        "gmm_aum": int((gmm.predict_proba(aum[ok, None])[:, low] > 0.5).sum()),
    }
    out = {}
    for name, n in counts.items():
        flag = np.zeros(noisy.size, dtype=bool)
        flag[s.order[:n]] = True
        p, r, f, _ = precision_recall_fscore_support(noisy, flag, average="binary", zero_division=0)
        out[name] = {"n": n, "precision": float(p), "recall": float(r), "f1": float(f)}
    return out


def _forward(net: torch.nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """The run's forward: on its GPU fast path bf16 autocast on channels_last input (cmd_dist.train.peers)."""
    if not fast:
        return net(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return net(x.contiguous(memory_format=torch.channels_last)).float()


def _train_fold(cfg, data, idx: torch.Tensor, seed: int, fast: bool = False) -> torch.nn.Module:
    """One network, cross entropy on the noisy labels of ``idx``, the run's optimiser, schedule and augmentation.

    The batches come from the run's own :meth:`epoch_batches` (peer 0's generator) on the fold: the same random
    crop (and, on CIFAR, horizontal flip) and normalisation as a cmd-dist peer gets (Appendix A.1's pad 4 + crop
    32 + flip on CIFAR, a 1-pixel shift without flip on digits; ``cmd_dist.data.types.SPECS``)."""
    t = cfg.train
    torch.manual_seed(seed)
    net = build_model(cfg.peers[0].arch, data.spec.num_classes, data.spec.channels, data.spec.size)
    net = net.to(data.train_x.device)
    if fast:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=t.milestones, gamma=t.gamma)
    fold = dataclasses.replace(
        data, train_x=data.train_x[idx], train_labels=data.train_labels[idx], train_clean=data.train_clean[idx]
    )
    net.train()
    for epoch in range(t.epochs):
        for b in fold.epoch_batches(epoch, [0], t.batch_size, seed):
            loss = F.cross_entropy(_forward(net, b.xs[0], fast), b.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


def cleanlab_kfold(cfg, folds: int, seed: int, device: str = "cpu") -> dict:
    """(b): K-fold out-of-sample probabilities, then cleanlab's find_label_issues.

    The held-out fold is predicted in the run's evaluation view: the images normalised, without augmentation, in
    batches of ``train.eval_batch_size`` (a digits fold is one batch, as before)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    start = time.perf_counter()
    data = prepare_data(cfg.data, cfg.noise, device)
    fast = fast_path_enabled(cfg, torch.device(device))
    labels, clean = data.train_labels.cpu().numpy(), data.train_clean.cpu().numpy()
    probs = np.zeros((len(labels), data.spec.num_classes), dtype=np.float32)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for f, (train_idx, held_idx) in enumerate(split.split(np.zeros(len(labels)), labels)):
        net = _train_fold(cfg, data, torch.from_numpy(train_idx).to(device), seed * 100 + f, fast)
        held = torch.from_numpy(held_idx).to(device)
        with torch.no_grad():
            for i in range(0, len(held_idx), cfg.train.eval_batch_size):
                rows = held[i : i + cfg.train.eval_batch_size]
                x = normalize(data.train_x[rows], data.mean, data.std)
                probs[held_idx[i : i + len(rows)]] = torch.softmax(_forward(net, x, fast), 1).cpu().numpy()
    train_s = time.perf_counter() - start
    issues = find_label_issues(labels, probs)
    quality = get_label_quality_scores(labels, probs)
    m = detection_metrics(-quality, issues, labels != clean)
    return {"train_s": train_s, "total_s": time.perf_counter() - start, **m, "passes": (folds - 1) * cfg.train.epochs}


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def _median(rows: list[dict], key: str) -> float:
    """Times: the median over the seeds (a shared machine's load spikes would move a mean)."""
    return statistics.median(r[key] for r in rows)


def table(results: dict, folds: int, epochs: int) -> list[str]:
    """One row per noise setting, means over the seeds; the goal is judged on the 1/K-cost cmd-dist run."""
    lines = [
        f"| noise | cmd-dist F1 ({epochs} ep.) | cmd-dist F1 (1/K cost) | cleanlab F1 ({folds}-fold) | "
        "cmd-dist AUROC | cmd-dist AUROC (1/K cost) | cleanlab AUROC | train s: cmd-dist / 1/K / cleanlab | "
        "time ratio (1/K run) | epoch-loop ratio (1/K run) | goal met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        a, c, b = r["cmd-dist"], r["cmd-dist 1/K"], r["cleanlab"]
        f1a, f1c, f1b = _mean(a, "flag_f1"), _mean(c, "flag_f1"), _mean(b, "flag_f1")
        ta, tc, tb = _median(a, "train_s"), _median(c, "train_s"), _median(b, "train_s")
        met = f1c >= f1b
        lines.append(
            f"| {name} | {f1a:.3f} | {f1c:.3f} | {f1b:.3f} | {_mean(a, 'score_auroc'):.3f} | "
            f"{_mean(c, 'score_auroc'):.3f} | {_mean(b, 'score_auroc'):.3f} | {ta:.1f} / {tc:.1f} / {tb:.1f} | "
            f"{tc / tb:.2f} | {_median(c, 'loop_s') / tb:.2f} | {'yes' if met else 'no'} "
            f"(F1 {f1c:.3f} {'>=' if met else '<'} {f1b:.3f} at {c[0]['passes'] / b[0]['passes']:.2f} of its passes) |"
        )
    return lines


def variants_table(results: dict) -> list[str]:
    """The flag's F1 (mean over seeds) under each clean-label-free threshold, from the same runs, beside cleanlab's."""
    names = ["confident_joint", "agreed_differs", "gmm_aum"]
    lines = [
        "| noise | run | " + " | ".join(f"F1 ({n})" for n in names) + " | F1 (top n = true count) | cleanlab F1 |",
        "|---|---|" + "---|" * (len(names) + 2),
    ]
    for setting, r in results.items():
        for run in ("cmd-dist", "cmd-dist 1/K"):
            f1 = [statistics.fmean(x["thresholds"][n]["f1"] for x in r[run]) for n in names]
            cells = [f"{v:.3f}" for v in f1]
            cells += [f"{_mean(r[run], 'score_top_f1'):.3f}", f"{_mean(r['cleanlab'], 'flag_f1'):.3f}"]
            lines.append(f"| {setting} | {run} | " + " | ".join(cells) + " |")
    return lines


#: --dataset -> (the method's config, its default --settings). CIFAR-100: paper Table 1's best cell (CMD-P + Mconf,
#: ResNet-34, 40% symmetric noise, 69.09%); CIFAR-100N: the same recipe on the human noisy_fine labels (configs/cifarn).
DATASETS = {
    "digits": ("configs/demo.yaml", [f"{k}:{r}" for k, r in SETTINGS]),
    "cifar100": ("configs/table1/cmdp_mconf.yaml", ["symmetric:0.4"]),
    "cifar100n": ("configs/cifarn/cifar100n_noisy_fine.yaml", ["human:noisy_fine"]),
}
#: The folder holding cifar-100-python/ and cifar-n/ (the configs' ``../shared/data``, from the repo root).
SHARED_DATA = REPO.parent / "shared" / "data"


def default_out(dataset: str, date: str) -> Path:
    """benchmarks/results/<date>-label-issues (digits, the cited results) or <date>-label-issues-<dataset>."""
    suffix = "" if dataset == "digits" else f"-{dataset}"
    return REPO / "benchmarks" / "results" / f"{date}-label-issues{suffix}"


def parse_setting(dataset: str, setting: str) -> tuple[str, str, str]:
    """``kind:rate`` (synthetic noise) or, on cifar100n only, ``human:<label set>``: (kind, rate, row name)."""
    kind, _, rate = setting.partition(":")
    if (kind == "human") != (dataset == "cifar100n") or not rate:
        want = "human:noisy_fine" if dataset == "cifar100n" else "kind:rate, e.g. symmetric:0.4"
        raise ValueError(f"--settings {setting!r} does not fit --dataset {dataset}; use {want}")
    if kind == "human":
        return kind, rate, f"CIFAR-100N {rate}"
    return kind, rate, f"{kind} {float(rate):.0%}"


def make_config(args: argparse.Namespace, kind: str, rate: str, seed: int, epochs: int):
    """The dataset's config with the benchmark's overrides: noise, seeds, ``epochs`` with the config's milestones
    scaled to them (digits: exactly the overrides of before), then --data-root, --train-subset, --test-subset and
    --arch where they apply."""
    path = REPO / DATASETS[args.dataset][0]
    base = load_config(path)
    fractions = tuple(m / base.train.epochs for m in base.train.milestones)  # demo: 14/20, 18/20 == 0.7, 0.9
    extra = []
    if args.dataset != "digits":
        extra.append(f"data.root={args.data_root}")
    if args.train_subset:
        extra.append(f"data.train_subset={args.train_subset}")
    if args.test_subset:
        extra.append(f"data.test_subset={args.test_subset}")
    if args.arch:
        peers = ", ".join(f"{{arch: {args.arch}, name: {p.name}}}" for p in base.peers)
        extra.append(f"peers=[{peers}]")
    value = rate if kind == "human" else float(rate)
    return load_config(path, overrides(kind, value, seed, epochs, fractions) + extra)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--settings", nargs="+", default=None, help="kind:rate ... (default: the dataset's)")
    ap.add_argument("--arch", default=None, help="both detectors' network (default: the dataset config's)")
    ap.add_argument("--train-subset", type=int, default=0, help="the first N training images (0 = all)")
    ap.add_argument("--test-subset", type=int, default=0, help="the first N test images cmd-dist evaluates (0 = all)")
    ap.add_argument("--data-root", default=str(SHARED_DATA), help="folder with cifar-100-python/ and cifar-n/")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both detectors alike)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both detectors alike)")
    ap.add_argument("--out", default=None, help="folder (default benchmarks/results/<date>-label-issues[-DATASET])")
    ap.add_argument("--save-records", default=None, help="folder for each cmd-dist run's per-sample record (.npz)")
    args = ap.parse_args(argv)
    args.settings = args.settings or DATASETS[args.dataset][1]
    try:
        args.parsed = [parse_setting(args.dataset, s) for s in args.settings]
    except ValueError as e:
        ap.error(str(e))
    if args.dataset != "digits" and not Path(args.data_root, "cifar-100-python").is_dir():
        ap.error(f"--data-root {args.data_root} holds no cifar-100-python/; point it at the folder that does")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else default_out(args.dataset, date)
    results: dict[str, dict[str, list[dict]]] = {}
    started = time.perf_counter()
    for kind, rate, name in args.parsed:
        for seed in args.seeds:
            cfg = make_config(args, kind, rate, seed, args.epochs)
            saved = Path(args.save_records) if args.save_records else None
            tag = f"{kind}{rate}_seed{seed}"
            with tempfile.TemporaryDirectory(prefix="cmd-dist-bench-") as tmp:
                a = ours(cfg, Path(tmp), saved and saved / f"{tag}_ep{args.epochs}.npz", args.device)
            # cmd-dist again at 1/K of cleanlab's training cost: 2 peers x E' = (K-1) E / K passes
            cheap_epochs = max(1, round(args.epochs * (args.folds - 1) / (2 * args.folds)))
            cheap_cfg = make_config(args, kind, rate, seed, cheap_epochs)
            with tempfile.TemporaryDirectory(prefix="cmd-dist-bench-") as tmp:
                c = ours(cheap_cfg, Path(tmp), saved and saved / f"{tag}_ep{cheap_epochs}.npz", args.device)
            b = cleanlab_kfold(cfg, args.folds, seed, args.device)
            results.setdefault(name, {"cmd-dist": [], "cmd-dist 1/K": [], "cleanlab": []})
            results[name]["cmd-dist"].append({"seed": seed, **a})
            results[name]["cmd-dist 1/K"].append({"seed": seed, "epochs": cheap_epochs, **c})
            results[name]["cleanlab"].append({"seed": seed, **b})
            write_summary(out, args, date, started, results, cfg)  # after every cell: an interrupted run keeps its rows
            print(
                f"{name} seed {seed}: cmd-dist F1 {a['flag_f1']:.3f} AUROC {a['score_auroc']:.3f} "
                f"{a['train_s']:.1f} s | cmd-dist {cheap_epochs} epochs F1 {c['flag_f1']:.3f} "
                f"AUROC {c['score_auroc']:.3f} {c['train_s']:.1f} s | cleanlab F1 {b['flag_f1']:.3f} "
                f"AUROC {b['score_auroc']:.3f} {b['train_s']:.1f} s",
                flush=True,
            )
    print("\n".join(table(results, args.folds, args.epochs)))
    print("\n".join(variants_table(results)))
    print(f"wrote {write_summary(out, args, date, started, results, cfg)}")


def _device_words(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}"
    return "no GPU"


def write_summary(out: Path, args: argparse.Namespace, date: str, started: float, results: dict, cfg=None) -> Path:
    import cleanlab

    lines = table(results, args.folds, args.epochs)
    summary = {
        "date": date,
        "machine": f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs "
        f"(load average {os.getloadavg()[0]:.1f} at the end), {torch.get_num_threads()} torch thread(s), "
        f"{_device_words(args.device)}",
        "torch": torch.__version__,
        "cleanlab": cleanlab.__version__,
        "dataset": args.dataset,
        "config": DATASETS[args.dataset][0],
        "arch": cfg.peers[0].arch if cfg is not None else args.arch,
        "train_subset": args.train_subset,
        "test_subset": args.test_subset,
        "num_train": next(iter(results.values()))["cmd-dist"][0]["samples"] if results else None,
        "device": args.device,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "milestones": cfg.train.milestones if cfg is not None else None,
        "folds": args.folds,
        "wall_s": time.perf_counter() - started,
        "results": results,
        "table": lines,
        "threshold": "cmd-dist's flag: the top n scores, n = the off-diagonal of the calibrated confident joint of the "
        "peers' last probabilities (Northcutt et al., JAIR 2021); the other counts in variants_table, same runs",
        "variants_table": variants_table(results),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    return out / "summary.json"


if __name__ == "__main__":
    main()
