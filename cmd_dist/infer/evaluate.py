"""``cmd-dist evaluate``: score every peer of one checkpoint, and the peers' ensemble, on a split of the run's
dataset (or of another dataset with the same classes), in this process.

The ensemble is the mean of the peers' softmax outputs (DivideMix, Li et al. 2020, tests with its two networks'
outputs combined the same way). Every model is scored in float32 in eval mode on the same batches, with the same
normalisation as the training run's evaluation (:mod:`cmd_dist.data.scoring`); on the CPU this is the computation
training ran, so ``--checkpoint last`` gives ``summary.json``'s accuracies (tested). A GPU run evaluated in bf16
autocast while training, so its last digits may differ. The measures are :mod:`cmd_dist.infer.metrics`'s.

Overrides (``key=value``) may only say *where* the split is read (``data.root``, ``data.dataset``, ...): the keys
that say which images the run trained on (protocol, subset, seed, noise) are refused, so ``val`` and ``train`` always
mean the run's own splits. A dataset of another class count, channel count or input size is a one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cmd_dist.config import Config, load_config, parse_overrides
from cmd_dist.data.class_names import class_names as dataset_class_names
from cmd_dist.data.class_names import numbered
from cmd_dist.data.scoring import ScoringSet, scoring_set
from cmd_dist.errors import RunError
from cmd_dist.infer.loading import BEST, TrainedRun, open_trained_run, warn
from cmd_dist.infer.metrics import ECE_BINS, Scores, ensemble_log_probs
from cmd_dist.runs.fs import atomic_write_bytes

ENSEMBLE = "ensemble"
#: Keys ``evaluate`` takes: where the split is read and how fast; every other key is part of what was trained.
SCORING_KEYS = (
    "data.root",
    "data.dataset",
    "data.test_subset",
    "data.workers",
    "data.decode",
    "data.num_classes",
    "data.food_train",
    "train.eval_batch_size",
)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def scoring_config(trained: TrainedRun, overrides: list[str]) -> Config:
    """The run's config with ``overrides`` of :data:`SCORING_KEYS` applied (RunError naming any other key)."""
    for key, _ in parse_overrides(overrides):
        if key not in SCORING_KEYS:
            raise RunError(
                f"{key}: evaluate scores the peers as they were trained, so only where the data is read may change "
                f"({', '.join(SCORING_KEYS)})"
            )
    return load_config(trained.run_dir / "config.yaml", overrides) if overrides else trained.cfg


def check_fits(trained: TrainedRun, data: ScoringSet, cfg: Config) -> None:
    """The dataset scored must have the run's classes, channels and input size (RunError otherwise)."""
    got, want = data.spec, trained.spec
    where = f"data.dataset={cfg.data.dataset}" + ("" if cfg.data.dataset == "digits" else f" data.root={cfg.data.root}")
    if got.num_classes != want.num_classes:
        raise RunError(
            f"{where} has {got.num_classes} classes, the run's peers were trained on {want.num_classes}; score them "
            f"on a dataset with the same {want.num_classes} classes"
        )
    if (got.channels, got.size) != (want.channels, want.size):
        raise RunError(
            f"{where} gives {got.channels}-channel {got.size}x{got.size} images, the run's peers take "
            f"{want.channels}-channel {want.size}x{want.size} ones; score them on a dataset of that kind"
        )


def scored_class_names(trained: TrainedRun, cfg: Config, log=warn) -> list[str]:
    """The names of the scored dataset's labels (per-class accuracy is by its labels); a dataset moved by an
    override whose names differ from the run's gets a warning (the classifier's class i is compared with label i)."""
    if cfg is trained.cfg:
        return trained.class_names
    names = dataset_class_names(cfg.data, cfg.noise, trained.spec.num_classes)
    if names != trained.class_names and names != numbered(len(names)) and trained.class_names != numbered(len(names)):
        log(
            f"warning: the classes of data.root={cfg.data.root} are not named as the run's "
            f"({', '.join(names[:3])}, ... vs {', '.join(trained.class_names[:3])}, ...); label i is scored as class i"
        )
    return names if names != numbered(len(names)) else trained.class_names


@torch.no_grad()
def score(
    trained: TrainedRun, data: ScoringSet, batch_size: int, device: torch.device, class_names: list[str]
) -> list[dict]:
    """Every peer's and the ensemble's results (:meth:`Scores.result`), in that order."""
    models = trained.models(device)
    names = [*models, ENSEMBLE]
    scores = {name: Scores(trained.spec.num_classes, device) for name in names}
    for x, y in data.batches(batch_size):
        log_probs = [torch.log_softmax(net(x).float(), 1) for net in models.values()]
        for name, lp in zip(models, log_probs):
            scores[name].update(lp, y)
        scores[ENSEMBLE].update(ensemble_log_probs(log_probs), y)
    archs = {p.name: p.arch for p in trained.cfg.peers}
    rows = []
    for name in names:
        row = {"name": name, "arch": archs.get(name, " + ".join(archs.values()))}
        rows.append({**row, **scores[name].result(class_names)})
    return rows


def evaluate_run(
    run: str,
    checkpoint: str = "best",
    split: str | None = None,
    overrides: list[str] | None = None,
    device: torch.device | str | None = None,
    log=warn,
) -> dict:
    """Open ``run``'s ``checkpoint``, score it on ``split`` (default: the split the run evaluated on: ``val`` in
    the search protocol, ``test`` in the final one) and return the results (what ``--out`` writes)."""
    dev = torch.device(device) if device is not None else default_device()
    trained = open_trained_run(run, checkpoint, log)
    try:
        cfg = scoring_config(trained, list(overrides or []))
        run_split = trained.summary.get("eval_split") or ("val" if trained.cfg.data.protocol == "search" else "test")
        split = split or run_split
        data = scoring_set(cfg.data, cfg.noise, split, dev)
        check_fits(trained, data, cfg)
        names = scored_class_names(trained, cfg, log)
        rows = score(trained, data, cfg.train.eval_batch_size, dev, names)
    finally:
        trained.close()
    return {
        "run": trained.run,
        "checkpoint": trained.checkpoint,
        "epoch": trained.epoch,
        "protocol": cfg.data.protocol,
        "split": split,
        "dataset": cfg.data.dataset,
        "data_root": None if cfg.data.dataset == "digits" else cfg.data.root,
        "labels": data.labels,
        "images": data.size,
        "skipped_images": data.skipped(),
        "ece_bins": ECE_BINS,
        # best_checkpoint is the epoch with the best mean accuracy on the run's eval split (selected on it)
        "selected_on": run_split if trained.checkpoint == BEST else None,
        "device": str(dev),
        "class_names": names,
        "models": rows,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}%"


def format_table(result: dict) -> str:
    """The console table: one row per peer and the ensemble."""
    head = (
        f"{result['run']}: {result['checkpoint']} (epoch {result['epoch']}) on the {result['split']} split of "
        f"{result['dataset']} ({result['images']:,} images, {result['labels']} labels; protocol {result['protocol']})"
    )
    width = max(len("model"), *(len(r["name"]) for r in result["models"]))
    lines = [head, f"{'model':<{width}}  {'top-1':>8}  {'top-5':>8}  {'loss':>7}  {'ECE (15 bins)':>13}"]
    for r in result["models"]:
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        lines.append(
            f"{r['name']:<{width}}  {_pct(r['top1']):>8}  {_pct(r['top5']):>8}  {loss:>7}  {_pct(r['ece']):>13}"
        )
    if result.get("selected_on") == result["split"]:
        lines.append(
            f"note: best_checkpoint is the epoch chosen by accuracy on this {result['split']} split, so these numbers "
            f"are optimistic; --checkpoint last gives the run's final ones"
        )
    if result.get("skipped_images"):
        lines.append(f"skipped {result['skipped_images']} unreadable images")
    return "\n".join(lines)


def write_json(result: dict, out: str | Path) -> Path:
    """``--out``: the results as JSON, written atomically (a temporary file renamed)."""
    path = Path(out).expanduser()
    if path.parent and not path.parent.is_dir():
        raise RunError(f"--out: folder {path.parent} does not exist; create it or choose another file")
    atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
    return path
