"""The training labels that look wrong, ranked and scored from one run's per-sample record (issue 21).

Every peer's checkpoint holds its :class:`~cmd_dist.method.dynamics.SampleDynamics` record: per training sample
the sum of its AUM margins, the epochs it was trained on, the epochs a confident prediction of the peer (H(p) < chi,
Eq. 8-9) contradicted the given label, and the last epoch's prediction. From these, per sample:

- ``aum_<peer>``: the area under the margin (Pleiss et al., NeurIPS 2020), the peer's mean margin of the given label;
- ``disagree_epochs``: the epochs, summed over the peers, in which a peer's confident prediction disagreed;
- ``agreed_label``, ``agreed_prob``: the peers' last predictions, each weighted by its probability (the class with
  the largest sum), and that sum divided by the number of peers (a peer predicting another class adds 0);
- ``late_aum_<peer>``: the peer's late-weighted AUM (epoch e of E weighted 2^(e / (E/5)), method/dynamics.py);
- ``score`` in [0, 1], higher = the label more likely wrong: the percentile rank of the peers' mean late-weighted
  AUM, lowest first. Plain AUM weighs the first epochs, when every margin is small, as much as the last; chosen on
  digits seeds 10-12 among plain AUM, the plain AUM mixed with the disagreement fraction (this command's first
  score), exponential and linear weightings and the last epochs' margins, and checked on the benchmark's seeds 0-2
  (docs/label_issues.md). The confident-disagreement fraction is not in the score: mixed in, it cost 0.040 F1 at
  5% noise and gained at most 0.003 elsewhere; it stays in the CSV as CMD's own evidence;
- ``flag``: the ``n_est`` highest scores, ``n_est`` estimated without the clean labels by Confident Learning's count
  of label issues (Northcutt et al., "Confident Learning", JAIR 2021, Sec. 3.1, Eq. 1-3): the off-diagonal of the
  calibrated confident joint, computed as ``cleanlab.count.compute_confident_joint`` does, on the peers' last
  probabilities (:func:`confident_joint_count`). A sample counts only where its probability of the class it is
  counted in reaches that class's threshold, the mean self-confidence of the samples given that class; each given
  class's counts are then scaled to its size. The plain count of samples whose agreed label is not the given one
  (``n_disagree``, the "C_confusion" baseline of that paper) counts every low-confidence mistake of an underfit
  network as a wrong label and overestimates the noise after short training (docs/label_issues.md).

Where the clean labels are known (synthetic noise, CIFAR-N), :func:`detection_metrics` scores the flag (precision,
recall, F1, AUROC) and the score (AUROC, average precision, and precision/recall/F1 of its top-n at the true count).
Ray-free: the CLI calls :func:`label_issues`.

Each training sample is named by its place in the dataset as shipped (:func:`training_samples`): the CSV's
``sample`` is the train-pickle / ``load_digits()`` index, or an image's file path; ``detection.npy`` has one entry per
image of the shipped training set (streamed datasets: of the training list as read, in the order of
:mod:`cmd_dist.data.image_lists`), False where the run did not train on the image.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmd_dist.data.prepare import prepare_data
from cmd_dist.data.types import STREAMED
from cmd_dist.errors import RunError
from cmd_dist.infer.loading import TrainedRun
from cmd_dist.method.dynamics import SampleDynamics
from cmd_dist.runs.fs import atomic_write_bytes

#: Bins of the score histograms (clean vs noisy samples) stored for ``cmd-dist report``.
HIST_BINS = 20
#: Above this estimated noise rate the flag is called unreliable (see :func:`flag_warning`).
UNRELIABLE_RATE = 0.5


@dataclass
class TrainingSamples:
    """A run's training set as the record indexes it: who each position is in the dataset as shipped."""

    keys: list[Any]  # per position: the index in the shipped training set (int) or the image's path (str)
    labels: np.ndarray  # the given (trained-on) labels
    clean: np.ndarray  # the clean labels, -1 where unknown
    origin: np.ndarray  # per position: the index in the shipped training set (streamed: in the list as read)
    shipped: int  # the shipped training set's size (detection.npy's length)


def training_samples(cfg) -> TrainingSamples:
    """Rebuild the run's training set (labels, split and subset exactly as its workers did; no image decoded for
    streamed datasets) and each position's identity in the dataset as shipped.

    Resident data: the index in the train pickles / ``load_digits()`` (``PeerData.train_origin``). Streamed data: the
    key is the file's path, the origin its index in the training list as read (``ImageList.origin``, in the order
    of :mod:`cmd_dist.data.image_lists`'s docstring)."""
    data = prepare_data(cfg.data, cfg.noise, "cpu")
    if cfg.data.dataset in STREAMED:
        train = data.train
        keys = [str(train.path(i)) for i in range(len(train))]
        return TrainingSamples(keys, train.labels.copy(), train.clean.copy(), train.origin.copy(), train.shipped)
    origin = data.train_origin.numpy()
    return TrainingSamples(
        [int(i) for i in origin], data.train_labels.numpy(), data.train_clean.numpy(), origin, data.shipped_train
    )


def peer_records(run: TrainedRun) -> list[dict[str, np.ndarray]]:
    """Every peer's per-sample record in the chosen checkpoint, as :class:`SampleDynamics` restores it (a record saved
    before the late-weighted sums existed gets the plain ones); RunError (one line) when the run has none."""
    records = []
    for k in range(len(run.peer_names)):
        dyn = run.states[k].get("dynamics")
        if not isinstance(dyn, dict):
            raise RunError(
                f"{run.run}: {run.checkpoint} holds no per-sample record (the run was trained before cmd-dist "
                f"recorded one); train it again, or resume it (cmd-dist train --resume) to record the epochs it trains"
            )
        state = SampleDynamics.from_state(dyn).state_dict()
        records.append({key: v.numpy() if hasattr(v, "numpy") else v for key, v in state.items()})
    return records


def _percentile_rank(values: np.ndarray) -> np.ndarray:
    """Average ranks scaled to [0, 1] (ties share their mean rank); NaN ranks lowest."""
    from scipy.stats import rankdata

    v = np.where(np.isnan(values), -np.inf, values)
    return (rankdata(v) - 1) / max(len(v) - 1, 1)


@dataclass
class Scores:
    """Per training sample (see the module docstring)."""

    aum: np.ndarray  # [peers, n]
    late_aum: np.ndarray  # [peers, n], the late-weighted AUM
    disagree: np.ndarray  # [n] epochs summed over the peers
    seen: np.ndarray  # [n] epochs summed over the peers
    agreed_label: np.ndarray
    agreed_prob: np.ndarray
    score: np.ndarray
    flag: np.ndarray
    n_est: int  # the confident joint's estimate of the number of wrong labels: the flag's size
    n_disagree: int  # the samples whose agreed label is not the given one
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # most likely wrong first


def score_samples(records: list[dict[str, np.ndarray]], labels: np.ndarray, num_classes: int) -> Scores:
    """Scores, flags and the peers' agreed labels of every training sample from the peers' records."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean AUM of a sample no peer ever saw: NaN
        aum = np.stack([r["margin_sum"] / r["seen"] for r in records])
        late = np.stack([r["weighted_margin_sum"] / r["weight_sum"] for r in records])
        seen = np.sum([r["seen"] for r in records], axis=0)
        disagree = np.sum([r["disagree"] for r in records], axis=0)
        mean_late = np.nanmean(late, axis=0)
    n = labels.shape[0]
    votes = np.zeros((n, num_classes))
    for r in records:
        pred = r["last_pred"].astype(np.int64)
        ok = pred >= 0
        np.add.at(votes, (np.nonzero(ok)[0], pred[ok]), r["last_prob"][ok])
    agreed = votes.argmax(1)
    agreed_prob = votes.max(1) / max(len(records), 1)
    never = seen == 0
    agreed[never] = -1
    score = _percentile_rank(-mean_late)
    score[never] = 0.0  # nothing is known of a sample never trained on (e.g. an unreadable image)
    n_disagree = int(((agreed != labels) & ~never).sum())
    n_est = confident_joint_count(votes[~never] / max(len(records), 1), labels[~never], num_classes)
    order = np.argsort(-score, kind="stable")
    flag = np.zeros(n, dtype=bool)
    flag[order[:n_est]] = True
    return Scores(aum, late, disagree, seen, agreed, agreed_prob, score, flag, n_est, n_disagree, order)


def confident_joint_count(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> int:
    """The number of wrong labels estimated by Confident Learning (Northcutt et al., JAIR 2021, Eq. 1-3; the code
    of ``cleanlab.count.compute_confident_joint`` with ``calibrate=True`` and ``num_label_issues``'s
    ``"off_diagonal_calibrated"``), without the clean labels.

    ``probs[i, j]``: the peers' mean last-epoch probability of class j where a peer predicted j, else 0 (the record
    keeps each peer's argmax probability only, so this is a lower bound of the mean probability). Per class j the
    threshold t_j is the mean of ``probs[:, j]`` over the samples given j (no sample given j: never confident). A
    sample is confidently of class j where ``probs[i, j] >= t_j`` (and a peer predicted j); of several such classes,
    the most probable. The confident joint C[given, confident class] counts these samples, its diagonal at least 1;
    each row is then scaled to the number of samples given that class, and the estimate is the rounded sum off the
    diagonal."""
    if labels.size == 0:
        return 0
    given = np.arange(num_classes)[:, None] == labels[None, :]  # [classes, n]
    count = given.sum(1)
    thresholds = np.where(count > 0, (probs.T * given).sum(1) / np.maximum(count, 1), 2.0)
    confident = (probs >= thresholds - 1e-6) & (probs > 0)
    several = confident.sum(1) > 1
    guess = np.where(several, probs.argmax(1), confident.argmax(1))
    some = confident.any(1)
    joint = np.zeros((num_classes, num_classes))
    np.add.at(joint, (labels[some], guess[some]), 1.0)
    np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1.0))
    calibrated = joint / joint.sum(1, keepdims=True) * count[:, None]
    return int(round(float(calibrated.sum() - np.trace(calibrated))))


def detection_metrics(score: np.ndarray, flag: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 and AUROC of the flag; AUROC, average precision and top-n P/R/F1 of the score (n = the
    true number of noisy labels). ``noisy``: the truth, over the samples whose clean label is known."""
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

    out: dict[str, float] = {"samples": int(noisy.size), "noisy": int(noisy.sum())}
    both = 0 < noisy.sum() < noisy.size
    p, r, f, _ = precision_recall_fscore_support(noisy, flag, average="binary", zero_division=0)
    out.update(flag_precision=float(p), flag_recall=float(r), flag_f1=float(f), flagged=int(flag.sum()))
    out["flag_auroc"] = float(roc_auc_score(noisy, flag)) if both else math.nan
    out["score_auroc"] = float(roc_auc_score(noisy, score)) if both else math.nan
    out["score_average_precision"] = float(average_precision_score(noisy, score)) if both else math.nan
    top = np.zeros_like(flag)
    top[np.argsort(-score, kind="stable")[: int(noisy.sum())]] = True
    p, r, f, _ = precision_recall_fscore_support(noisy, top, average="binary", zero_division=0)
    out.update(score_top_precision=float(p), score_top_recall=float(r), score_top_f1=float(f))
    return out


def score_histograms(score: np.ndarray, noisy: np.ndarray, bins: int = HIST_BINS) -> dict[str, list]:
    """Counts of the score in ``bins`` bins on [0, 1], for the clean and the noisy labels (the report's figure)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {
        "edges": edges.tolist(),
        "clean": np.histogram(score[~noisy], edges)[0].tolist(),
        "noisy": np.histogram(score[noisy], edges)[0].tolist(),
    }


@dataclass
class LabelIssues:
    """What :func:`label_issues` found and wrote."""

    csv: Path
    detection: Path
    summary: Path
    rows: int
    n_est: int
    num_train: int
    metrics: dict[str, float] | None  # None where no clean label is known
    warning: str | None = None  # :func:`flag_warning`'s


def _csv_bytes(run: TrainedRun, samples: TrainingSamples, s: Scores, top: int | None) -> tuple[bytes, int]:
    names = run.class_names
    known = samples.clean >= 0
    header = ["rank", "sample", "given_label", "given_class", "agreed_label", "agreed_class", "agreed_prob"]
    header += [f"aum_{p}" for p in run.peer_names] + [f"late_aum_{p}" for p in run.peer_names]
    header += ["disagree_epochs", "epochs_seen", "score", "flag"]
    if known.any():
        header += ["clean_label"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    rows = s.order if top is None else s.order[:top]
    for rank, i in enumerate(rows, 1):
        given, agreed = int(samples.labels[i]), int(s.agreed_label[i])
        row = [rank, samples.keys[i], given, names[given], agreed, names[agreed] if agreed >= 0 else ""]
        row += [f"{s.agreed_prob[i]:.4f}", *(f"{a:.4f}" for a in s.aum[:, i]), *(f"{a:.4f}" for a in s.late_aum[:, i])]
        row += [int(s.disagree[i]), int(s.seen[i]), f"{s.score[i]:.6f}", int(s.flag[i])]
        if known.any():
            row.append(int(samples.clean[i]))
        w.writerow(row)
    return buf.getvalue().encode(), len(rows)


def _detection_bytes(samples: TrainingSamples, flag: np.ndarray) -> bytes:
    """CIFAR-N's detection format: a boolean "is noisy" per image of the shipped training set, in its order; images
    outside the run's training split (held out for validation, digits' test part, past ``data.train_subset``,
    Food-101N's verified-val images) are False. Streamed datasets: per image of the training list as read
    (:mod:`cmd_dist.data.image_lists` gives the order)."""
    out = np.zeros(samples.shipped, dtype=bool)
    out[samples.origin] = flag
    buf = io.BytesIO()
    np.save(buf, out)
    return buf.getvalue()


def label_issues(run: TrainedRun, out: Path, top: int | None = None) -> LabelIssues:
    """Rank every training sample of ``run`` by how likely its label is wrong; write ``out`` (CSV),
    ``detection.npy`` and ``label_issues.json`` (the counts, the metrics and the score histograms) beside it,
    each atomically."""
    records = peer_records(run)
    samples = training_samples(run.cfg)
    n = samples.labels.shape[0]
    if any(r["seen"].shape[0] != n for r in records):
        raise RunError(
            f"{run.run}: the per-sample record holds {records[0]['seen'].shape[0]} training samples, the run's "
            f"dataset now {n}; the data changed since the run trained (data.root, the label files)"
        )
    s = score_samples(records, samples.labels, run.spec.num_classes)
    known = samples.clean >= 0
    metrics = hists = None
    if known.any():
        noisy = samples.labels[known] != samples.clean[known]
        metrics = detection_metrics(s.score[known], s.flag[known], noisy)
        hists = score_histograms(s.score[known], noisy)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data, rows = _csv_bytes(run, samples, s, top)
    atomic_write_bytes(out, data)
    detection = out.parent / "detection.npy"
    atomic_write_bytes(detection, _detection_bytes(samples, s.flag))
    summary = {
        "run": run.run,
        "checkpoint": run.checkpoint,
        "epoch": run.epoch,
        "num_train": n,
        "flagged": int(s.flag.sum()),
        "estimated_noise_rate": s.n_est / n if n else math.nan,
        "agreed_label_differs": s.n_disagree,
        "score": "the percentile rank of the peers' mean late-weighted AUM (epoch e of E weighted 2^(e/(E/5))), "
        "lowest first (AUM: Pleiss et al., NeurIPS 2020)",
        "threshold": "the top n_est scores, n_est = the off-diagonal of the calibrated confident joint of the peers' "
        "last probabilities (Northcutt et al., JAIR 2021)",
        "metrics": metrics,
        "score_histogram": hists,
        "csv": out.name,
    }
    summary["warning"] = warning = flag_warning(s.n_est, s.n_disagree, n)
    path = out.parent / "label_issues.json"
    atomic_write_bytes(path, json.dumps(summary, indent=1, allow_nan=True).encode())
    return LabelIssues(out, detection, path, rows, s.n_est, n, metrics, warning)


def flag_warning(n_est: int, n_disagree: int, num_train: int) -> str | None:
    """A note when the flag may not mean much: more than half of the labels estimated wrong. The confident joint
    scales each class's few confident samples up to the class's size, so peers that have learned little (e.g.
    ``cnn_small`` on a 4,000-image slice of CIFAR-100, docs/label_issues.md) get most labels flagged; the ranking
    may still be of use. None otherwise."""
    if num_train == 0 or n_est <= UNRELIABLE_RATE * num_train:
        return None
    return (
        f"{100 * n_est / num_train:.0f}% of the labels are estimated wrong (the peers' agreed label is the given one "
        f"on {100 * (1 - n_disagree / num_train):.0f}% of the training set); unless the labels really are that noisy, "
        f"the peers have not learned enough for the flag to mean much: train longer or a larger network, or rank by "
        f"the score alone"
    )


def summary_lines(run: TrainedRun, found: LabelIssues) -> list[str]:
    """What ``cmd-dist label-issues`` prints."""
    lines = [
        f"label-issues: {found.num_train:,} training labels of {run.run} ({run.checkpoint}, epoch {run.epoch}): "
        f"{found.n_est:,} flagged (estimated noise rate {100 * found.n_est / max(found.num_train, 1):.2f}%)"
    ]
    m = found.metrics
    if m is not None:
        lines.append(
            f"detection against the {m['samples']:,} known clean labels ({m['noisy']:,} wrong): flag precision "
            f"{m['flag_precision']:.3f} recall {m['flag_recall']:.3f} F1 {m['flag_f1']:.3f} AUROC {m['flag_auroc']:.3f}"
            f"; score AUROC {m['score_auroc']:.3f} average precision {m['score_average_precision']:.3f}"
        )
    if found.warning:
        lines.append(f"note: {found.warning}")
    lines.append(f"wrote {found.csv} ({found.rows:,} rows), {found.detection.name}, {found.summary.name}")
    return lines
