"""A run's summary (``summary.json``) and what ``--resume --allow-changes`` changed (``changes.jsonl``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cmd_dist.config import Config, dump_yaml
from cmd_dist.launch.revision import git_revision
from cmd_dist.runs.run_folder import read_run_file, write_run_file


def _finite_or_none(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and x == x and abs(x) != float("inf") else None


def summarize(cfg: Config, metrics: dict[str, Any], run_dir: Path | str, wall_s: float) -> dict[str, Any]:
    split = metrics.get("eval_split", "test" if cfg.data.protocol == "final" else "val")
    peers = []
    extra = [name for name in str(metrics.get("extra_eval_sets", "")).split(",") if name]
    for p in cfg.peers:
        acc = metrics.get(f"{p.name}/{split}_acc")
        best = metrics.get(f"{p.name}/best_{split}_acc")
        peers.append(
            {
                "name": p.name,
                "arch": p.arch,
                "test_acc": acc if split == "test" else None,
                "val_acc": acc if split == "val" else None,
                "best_val_acc": best if split == "val" else None,
                # Final protocol: the best epoch's test accuracy is shown, never used for selection.
                "best_test_acc": best if split == "test" else None,
                "best_epoch": metrics.get(f"{p.name}/best_epoch"),
                "train_acc_clean": _finite_or_none(metrics.get(f"{p.name}/train_acc_clean")),  # None: no clean labels
                "train_acc_noisy": metrics.get(f"{p.name}/train_acc_noisy"),
                # Scored beside the eval split, never used to select (mini-WebVision: WebVision's val set).
                "other_acc": {name: metrics.get(f"{p.name}/{name}_acc") for name in extra},
            }
        )
    summary = {
        "run_dir": str(run_dir),
        "protocol": cfg.data.protocol,
        "eval_split": split,
        "epochs_run": metrics.get("epoch", 0),
        "epochs": cfg.train.epochs,
        "peers": peers,
        f"mean_{split}_acc": metrics.get(f"{split}_acc"),
        "wall_s": round(wall_s, 1),
        "stopped": metrics.get("nonfinite"),
        "splits_read": metrics.get("splits_read"),
        # Realised fraction of training labels != clean labels (null where no clean label is known).
        "noise_rate": _finite_or_none(metrics.get("noise_rate")),
        "skipped_images": metrics.get("skipped_images", 0),
        # What --resume --allow-changes changed, and from which epoch (changes.jsonl; config.original.yaml).
        "changes": read_changes(run_dir),
    }
    write_run_file(run_dir, "summary.json", json.dumps(summary, indent=2).encode())
    return summary


CHANGES_FILE = "changes.jsonl"
ORIGINAL_CONFIG = "config.original.yaml"


def record_resume(
    run_dir: Path | str, old_text: bytes, cfg: Config, changes: dict[str, tuple[Any, Any]], from_epoch: int
) -> None:
    """Write a resumed run's config.yaml; training changes (``--allow-changes``) are recorded first.

    The first change keeps the config the run started with as ``config.original.yaml``; each resume with
    changes appends one line to ``changes.jsonl`` (the keys' old and new values and the first epoch trained
    with them), which summary.json repeats under ``changes``. train.epochs also moves Eq. 12's chi schedule
    and ProSelfLC's t/Gamma (both fractions of train.epochs): the line says so.
    """
    if changes:
        if read_run_file(run_dir, ORIGINAL_CONFIG) is None:
            write_run_file(run_dir, ORIGINAL_CONFIG, old_text)
        entry: dict[str, Any] = {
            "from_epoch": from_epoch,
            "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_rev": git_revision(),
        }
        if "train.epochs" in changes and from_epoch > 1:
            old, new = changes["train.epochs"]
            entry["note"] = (
                f"schedules that follow train.epochs (Eq. 12's chi, ProSelfLC's t/Gamma) changed at epoch "
                f"{from_epoch}: epochs 1-{from_epoch - 1} followed {old} epochs, later ones follow {new}"
            )
        history = read_run_file(run_dir, CHANGES_FILE) or b""
        if history and not history.endswith(b"\n"):
            history += b"\n"
        write_run_file(run_dir, CHANGES_FILE, history + (json.dumps(entry) + "\n").encode())
    write_run_file(run_dir, "config.yaml", dump_yaml(cfg).encode())
    if changes:  # the summary of the run so far now says what the run is (it is rewritten when training ends)
        try:
            summary = json.loads(read_run_file(run_dir, "summary.json") or b"null")
        except ValueError:
            summary = None
        if isinstance(summary, dict):
            summary["epochs"] = cfg.train.epochs
            summary["changes"] = read_changes(run_dir)
            write_run_file(run_dir, "summary.json", json.dumps(summary, indent=2).encode())


def read_changes(run_dir: Path | str) -> list[dict[str, Any]]:
    """The run's ``changes.jsonl`` entries, oldest first ([] when nothing was ever changed)."""
    out = []
    for line in (read_run_file(run_dir, CHANGES_FILE) or b"").decode(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short
        if isinstance(entry, dict):
            out.append(entry)
    return out
