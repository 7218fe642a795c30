"""Run outputs written by rank 0: metrics.jsonl, TensorBoard event files and the epoch line.

TensorBoard layout: one writer per peer (``tb/<peer name>/``) so the peers' curves overlay under
the same tags, plus ``tb/exchange/`` for the knowledge exchange as a whole (paper Figure 2).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from cmd_dist.config import Config


def truncate_jsonl(path: Path, keep_before_epoch: int) -> None:
    """Drop rows of epochs >= keep_before_epoch (1-based epochs), so a resumed run never duplicates."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= keep_before_epoch:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short (e.g. the disk filled up while it was written)
    path.write_text("".join(line + "\n" for line in kept))


#: The per-peer entropy-quantile keys of metrics.jsonl rows (trainer.ENTROPY_QUANTILES), read by the report.
ENTROPY_QUANTILE_KEYS = ("entropy_q10", "entropy_q25", "entropy_q50", "entropy_q75", "entropy_q90")


def write_hparams(writer: SummaryWriter, hparams: dict[str, Any], metric_tags: list[str]) -> None:
    """TensorBoard HParams for one run folder: its values (e.g. a Tune trial's b1, b2, eta) and the
    scalar tags that run logs (``val/acc``), so the HParams tab compares trials side by side."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    values = {k: v if isinstance(v, (bool, str, int, float)) else str(v) for k, v in hparams.items()}
    experiment, session_start, _ = hparams_summary(values, {tag: 0.0 for tag in metric_tags})
    writer.file_writer.add_summary(experiment)
    writer.file_writer.add_summary(session_start)
    writer.flush()


class Monitor:
    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        start_epoch: int,
        echo: bool = True,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.metrics_path = self.run_dir / "metrics.jsonl"
        truncate_jsonl(self.metrics_path, start_epoch)
        tb = self.run_dir / "tb"
        # purge_step drops events a previous, interrupted attempt wrote past the resumed epoch.
        self.writers = {p.name: SummaryWriter(str(tb / p.name), purge_step=start_epoch + 1) for p in cfg.peers}
        self.exchange_writer = SummaryWriter(str(tb / "exchange"), purge_step=start_epoch + 1)
        if hparams:
            split = "test" if cfg.data.protocol == "final" else "val"
            for w in self.writers.values():
                write_hparams(w, hparams, [f"{split}/acc", "train/acc_clean_labels"])

    def log_epoch(self, epoch: int, rows: dict[int, dict[str, float]], res: Any, metrics: dict[str, Any]) -> None:
        step = epoch + 1
        names = [p.name for p in self.cfg.peers]
        split = metrics["eval_split"]
        lines = []
        for k, row in sorted(rows.items()):
            name = names[k]
            w = self.writers[name]
            w.add_scalar("train/loss", row["train_loss"], step)
            w.add_scalar("train/self_kd_loss", row["train_self_loss"], step)
            w.add_scalar("train/peer_loss", row["train_peer_loss"], step)
            w.add_scalar("train/acc_noisy_labels", row["train_acc_noisy"], step)
            w.add_scalar("train/acc_clean_labels", row["train_acc_clean"], step)
            w.add_scalar(f"{split}/acc", row["eval_acc"], step)
            for other in filter(None, str(metrics.get("extra_eval_sets", "")).split(",")):
                w.add_scalar(f"{other}/acc", row[f"{other}_acc"], step)
            w.add_scalar("train/lr", row["lr"], step)
            w.add_scalar("self_kd/epsilon_mean", row["epsilon_mean"], step)
            # The selection explained: where the peer's entropies lie relative to chi (Eq. 8-9, 12).
            for key, value in row.items():
                if key.startswith("entropy_q") or key == "entropy_mean":
                    w.add_scalar(f"knowledge/{key}", value, step)
            hist = getattr(res, "hists", {}).get(k)
            if hist:
                _add_entropy_histogram(w, hist, self.cfg, step)
            if not math.isnan(row["certainty_r"]):
                w.add_scalar("self_kd/certainty_r", row["certainty_r"], step)
            if not math.isnan(res.chi) and not math.isinf(res.chi):
                w.add_scalar("knowledge/chi", res.chi, step)
            into = {}
            for j, count in enumerate(res.distilled):
                if j != k:
                    w.add_scalar(f"knowledge/distilled_from_{names[j]}", count, step)
                    into[names[j]] = count
            w.add_scalar("throughput/images_per_s", res.images / max(res.seconds, 1e-9), step)
            w.flush()
            record = {
                "epoch": step,
                "time": time.time(),  # wall clock at logging: epoch wall time = difference of consecutive rows
                "peer": name,
                "arch": self.cfg.peers[k].arch,
                "eval_split": split,
                "chi": res.chi,
                "distilled_from": into,
                **row,
            }
            lines.append(json.dumps(record, allow_nan=True))
        if res.distilled:
            n = len(names)
            # Figure 2: labels distilled between peers, summed over directions (each j reaches n-1 peers).
            total = sum(c * (n - 1) for c in res.distilled)
            self.exchange_writer.add_scalar("knowledge/total_distilled", total, step)
            for j, count in enumerate(res.distilled):
                for k in range(n):
                    if k != j:
                        self.exchange_writer.add_scalar(f"knowledge/{names[j]}_to_{names[k]}", count, step)
            self.exchange_writer.flush()
        with open(self.metrics_path, "a") as f:
            f.write("".join(line + "\n" for line in lines))
        if self.echo:
            print(epoch_line(self.cfg, step, rows, res, split), flush=True)

    def close(self) -> None:
        for w in [*self.writers.values(), self.exchange_writer]:
            w.close()


def _add_entropy_histogram(w: SummaryWriter, counts: list[float], cfg: Config, step: int) -> None:
    """``knowledge/entropy`` histogram: the epoch's per-sample H(p), binned on [0, H(u)]."""
    from cmd_dist.method.selfkd import uniform_entropy

    n = sum(counts)
    if n <= 0:
        return
    h_u = uniform_entropy(_num_classes(cfg))
    width = h_u / len(counts)
    limits = [width * (i + 1) for i in range(len(counts))]
    centers = [width * (i + 0.5) for i in range(len(counts))]
    w.add_histogram_raw(
        "knowledge/entropy",
        min=0.0,
        max=h_u,
        num=n,
        sum=sum(c * x for c, x in zip(counts, centers)),
        sum_squares=sum(c * x * x for c, x in zip(counts, centers)),
        bucket_limits=limits,
        bucket_counts=counts,
        global_step=step,
    )


def _num_classes(cfg: Config) -> int:
    from cmd_dist.data.types import SPECS

    return SPECS[cfg.data.dataset].num_classes if cfg.data.dataset in SPECS else 2


def epoch_line(cfg: Config, step: int, rows: dict[int, dict[str, float]], res: Any, split: str) -> str:
    names = [p.name for p in cfg.peers]
    accs = " ".join(f"{names[k]} {split} {r['eval_acc']:.2f}%" for k, r in sorted(rows.items()))
    parts = [f"epoch {step}/{cfg.train.epochs}", accs]
    if not math.isnan(res.chi):
        parts.append(f"chi {res.chi:.3f}")
        n = len(names)
        if n == 2:
            parts.append(
                f"distilled {names[0]}->{names[1]} {res.distilled[0]:.0f} {names[1]}->{names[0]} {res.distilled[1]:.0f}"
            )
        else:
            parts.append("distilled from " + " ".join(f"{names[j]} {c:.0f}" for j, c in enumerate(res.distilled)))
    parts.append(f"{res.images / max(res.seconds, 1e-9):,.0f} img/s per peer")
    return " | ".join(parts)
