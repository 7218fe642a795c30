"""``cmd-dist tune CONFIG [key=value ...]``: search b1, b2, eta on clean validation data, retrain the best, test it.

The protocol is the paper's (appendix A.2): every trial trains all peers on 90% of the (noisy) training
set and is scored on the other 10%, kept clean, so the test set is never read while choosing; the best
setting is then retrained on all training data and tested once. Everything the user can get wrong is
checked here, before Ray starts (one line, exit 2); the Ray Tune side lives in :mod:`tune.driver`.

A search folder holds ``search.yaml`` (what is being searched: enough to ``--resume``), ``trials/``
(Ray Tune's experiment: one folder per trial with Tune's logs and that trial's cmd-dist run, tb/
included), ``results.csv`` / ``results.md``, ``best.yaml``, ``final/`` (the retrain) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from cmd_dist.config import Config, ConfigError, from_dict, load_config
from tune.results import TrialRow, best_row, ranked, write_best_yaml, write_tables
from tune.space import SearchSpace, final_config, load_space, parse_space, trial_config

ALGOS = ("optuna", "random", "grid")
DEFAULT_TRIALS = 16
DEFAULT_REDUCTION_FACTOR = 3.0
STATE_FILE = "search.yaml"
TUNE_EXPERIMENT = "trials"


@dataclass
class SearchOptions:
    """How to search; saved in search.yaml so ``--resume`` continues with the same settings."""

    trials: int
    algo: str = "optuna"
    asha: bool = True
    grace_period: int = 1
    reduction_factor: float = DEFAULT_REDUCTION_FACTOR
    #: ``mean`` (validation accuracy averaged over peers) or one peer's name.
    metric: str = "mean"
    #: 0 = as many trials at once as the cluster fits.
    max_concurrent: int = 0


@dataclass
class SearchJob:
    search_dir: Path
    #: The user's config (overrides applied, paths absolute) as a plain dict; trials vary it.
    base: dict[str, Any]
    space: SearchSpace
    options: SearchOptions
    resume: bool = False

    @property
    def config(self) -> Config:
        return from_dict(self.base)

    @property
    def peers(self) -> list[str]:
        return [p.name for p in self.config.peers]

    @property
    def score_key(self) -> str:
        return metric_key(self.options.metric)

    @property
    def experiment_dir(self) -> Path:
        return self.search_dir / TUNE_EXPERIMENT


def metric_key(metric: str) -> str:
    """The reported metric a search maximises: ``val_acc`` (mean over peers) or ``<peer>/val_acc``."""
    return "val_acc" if metric == "mean" else f"{metric}/val_acc"


# ----------------------------------------------------------------------------- checks (no Ray)


def check_options(args: argparse.Namespace, cfg: Config, space: SearchSpace) -> SearchOptions:
    """The CLI flags against the config and space; ConfigError (exit 2) names the flag and the fix."""
    peers = [p.name for p in cfg.peers]
    if args.metric != "mean" and args.metric not in peers:
        raise ConfigError(f"--metric {args.metric!r}: use 'mean' or a peer name ({', '.join(peers)})")
    if args.max_concurrent < 0:
        raise ConfigError(f"--max-concurrent {args.max_concurrent}: must be >= 0 (0 = as many as the cluster fits)")
    if args.algo == "grid":
        size = len(space.grid())
        if args.trials is not None and args.trials < size:
            raise ConfigError(
                f"--trials {args.trials}: the grid has {size} points; pass --trials {size} (or leave "
                f"it out), or use fewer 'grid' points or choices in the space"
            )
        trials = size
    else:
        trials = DEFAULT_TRIALS if args.trials is None else args.trials
    if trials < 1:
        raise ConfigError(f"--trials {trials}: must be >= 1")
    epochs = cfg.train.epochs
    grace = getattr(args, "grace_period", None)
    if grace is None:
        grace = max(1, epochs // 4)
    elif grace < 1:
        raise ConfigError(f"--grace-period {grace}: must be >= 1 epoch")
    elif not args.no_asha and grace >= epochs:
        raise ConfigError(
            f"--grace-period {grace}: must be below train.epochs ({epochs}) for ASHA to stop "
            f"anything; lower it or pass --no-asha"
        )
    rf = getattr(args, "reduction_factor", None)
    rf = DEFAULT_REDUCTION_FACTOR if rf is None else rf
    if not rf > 1:
        raise ConfigError(f"--reduction-factor {rf}: must be > 1 (ASHA keeps the best 1/rf of trials at each rung)")
    return SearchOptions(
        trials=trials,
        algo=args.algo,
        asha=not args.no_asha,
        grace_period=grace,
        reduction_factor=float(rf),
        metric=args.metric,
        max_concurrent=args.max_concurrent,
    )


def apply_gpus_per_trial(cfg: Config, gpus: float | None) -> None:
    """``--gpus-per-trial G``: every trial holds G GPUs, split evenly over its workers (fractions share a GPU)."""
    if gpus is None:
        return
    if cfg.ray.placement == "auto":  # G is split over a worker per peer (not auto's GPU-count-based grouping)
        cfg.ray.placement = "separate"
    workers = len(cfg.peers) if cfg.ray.placement == "separate" else 1
    if not gpus > 0:
        raise ConfigError(f"--gpus-per-trial {gpus:g}: must be > 0 (leave it out for CPU trials)")
    per_worker = gpus / workers
    if per_worker > 1:
        raise ConfigError(
            f"--gpus-per-trial {gpus:g}: a trial has {workers} worker(s), each can hold at most 1 GPU; "
            f"use at most {workers}"
        )
    cfg.ray.use_gpu, cfg.ray.gpus_per_worker = "true", per_worker


def _absolute_paths(cfg: Config) -> None:
    """Ray workers do not run in the caller's directory: make output_dir and data.root absolute."""
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    if cfg.data.dataset != "digits":
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())


def prepare(args: argparse.Namespace) -> SearchJob:
    """Parse and check everything (config, space, flags, search folder) without starting Ray."""
    if args.resume:
        return _prepare_resume(args)
    if args.config is None:
        raise ConfigError("a CONFIG file is required (e.g. configs/demo.yaml), or --resume SEARCH_DIR")
    cfg = load_config(args.config, args.overrides)
    if args.address:
        cfg.ray.address = args.address
    if "://" in cfg.output_dir:
        raise ConfigError(
            f"output_dir: {cfg.output_dir!r}: cmd-dist tune writes its search folder (Tune's experiment, every "
            f"trial's run folder) to a folder, on a cluster one every node mounts at the same path; filesystem "
            f"URIs are for cmd-dist train and submit"
        )
    apply_gpus_per_trial(cfg, getattr(args, "gpus_per_trial", None))
    _absolute_paths(cfg)
    base = cfg.to_dict()
    space = load_space(args.space, base)
    options = check_options(args, cfg, space)
    search_dir = Path(cfg.output_dir) / (cfg.run_name or time.strftime("tune-%Y%m%d-%H%M%S"))
    if (search_dir / STATE_FILE).exists() or (search_dir / TUNE_EXPERIMENT).exists():
        raise ConfigError(
            f"{search_dir} already holds a search; continue it with --resume {search_dir}, or set another run_name"
        )
    return SearchJob(search_dir, base, space, options)


def _prepare_resume(args: argparse.Namespace) -> SearchJob:
    search_dir = Path(args.resume).expanduser().resolve()
    state_path = search_dir / STATE_FILE
    if not state_path.is_file():
        raise ConfigError(f"--resume {args.resume}: no {STATE_FILE} there; pass a folder written by cmd-dist tune")
    if args.config is not None or args.overrides:
        raise ConfigError("--resume continues a saved search with its own config; drop CONFIG and key=value")
    changed = [
        flag
        for flag, value in (
            ("--space", args.space),
            ("--trials", args.trials),
            ("--grace-period", args.grace_period),
            ("--reduction-factor", args.reduction_factor),
        )
        if value is not None
    ]
    if changed:
        raise ConfigError(f"--resume continues a saved search with its saved space and options; drop {changed[0]}")
    state = yaml.safe_load(state_path.read_text())
    try:
        cfg = from_dict(state["config"])
        base = cfg.to_dict()
        space = parse_space(state["space"], base, where=f"{state_path} space")
        options = SearchOptions(**state["options"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"--resume {args.resume}: {state_path} is incomplete or damaged ({e})") from None
    if args.address:
        base["ray"]["address"] = args.address
    if getattr(args, "gpus_per_trial", None) is not None:
        raise ConfigError("--resume continues a saved search with its saved resources; drop --gpus-per-trial")
    return SearchJob(search_dir, base, space, options, resume=True)


def save_state(job: SearchJob) -> None:
    job.search_dir.mkdir(parents=True, exist_ok=True)
    state = {"config": job.base, "space": job.space.to_dict(), "options": asdict(job.options)}
    tmp = job.search_dir / (STATE_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(state, sort_keys=False))
    os.replace(tmp, job.search_dir / STATE_FILE)


# ----------------------------------------------------------------------------- command


def cmd_tune(args: argparse.Namespace) -> int:
    """Check, search (Ray Tune), write the table and best.yaml, retrain the best on all data and test it."""
    from cmd_dist.checkpoint import RunFolderBusy, RunLock
    from cmd_dist.cli import _sigterm_as_interrupt, _stop_ray, preflight

    job = prepare(args)
    # The trials' data: the search protocol reads the training file only, never the test file.
    preflight(trial_config(job.base, {}))
    try:
        lock = RunLock(job.search_dir).acquire()  # held until this process exits
    except RunFolderBusy as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"output_dir: cannot write the search folder {job.search_dir} ({e.strerror or e})") from None
    save_state(job)
    opts = job.options
    print(f"cmd-dist: search folder {job.search_dir}", flush=True)
    print(
        f"searching {', '.join(p.key + ' ~ ' + p.describe() for p in job.space.params)}; {opts.trials} trials, "
        f"{opts.algo}{', ASHA' if opts.asha else ''}, score {job.score_key} on the clean validation split",
        flush=True,
    )

    from cmd_dist import launcher
    from tune import driver  # imports Ray: only after everything above is known to be good

    verbose = bool(getattr(args, "verbose", False))
    launcher.set_console(verbose=verbose)
    try:
        _sigterm_as_interrupt()
        launcher.init_ray(job.config)
        _sigterm_as_interrupt()  # again: ray.init installs a SIGTERM handler of its own
        outcome = driver.run_search(job, verbose=verbose)
    except KeyboardInterrupt:
        _stop_ray()
        return _interrupted(job)
    if outcome.unfinished:
        return _interrupted(job)

    rows = outcome.rows
    csv_path, md_path = write_tables(rows, job.space.keys, job.peers, job.search_dir)
    counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(r.status for r in rows)}
    print(
        f"\nsearch done in {outcome.wall_s:.0f} s: {len(rows)} trials ("
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + ")"
    )
    print(md_path.read_text(), end="")
    best = best_row(rows)
    if best is None:
        print(
            f"cmd-dist: error: no trial reported a validation accuracy; see the error column of {csv_path}",
            file=sys.stderr,
        )
        return 1
    final_cfg = final_config(outcome.trial_base, best.params)
    final_cfg.output_dir, final_cfg.run_name = str(job.search_dir), ""
    best_path = write_best_yaml(final_cfg, best, job.score_key, job.search_dir)
    print(
        f"best trial {best.trial}: {job.score_key} {best.score:.2f}% with "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    )
    print(f"best config: {best_path}   table: {csv_path}")

    final = None
    if not args.no_final:
        final_cfg.run_name = "final"
        preflight(final_cfg)  # the search is over: now, and only now, the test split is read
        try:
            final = driver.final_retrain(final_cfg, job.search_dir / "final", verbose=args.verbose)
        except KeyboardInterrupt:
            _stop_ray()
            return _interrupted(job)
        except launcher.RunFailed as e:
            if e.detail:
                print(e.detail.rstrip(), file=sys.stderr)
            print(f"cmd-dist: error: final retrain: {e}", file=sys.stderr)
            return e.code
        if final.get("stopped"):
            print(f"cmd-dist: error: final retrain: {final['stopped']}", file=sys.stderr)
    _write_summary(job, rows, best, final)
    print(comparison(best, final, job.peers, job.config.data.val_fraction))
    print(f"tensorboard --logdir {job.search_dir} --host 127.0.0.1")
    lock.release()
    return 1 if final and final.get("stopped") else 0


def comparison(best: TrialRow, final: dict[str, Any] | None, peers: list[str], val_fraction: float) -> str:
    """The search's validation accuracy beside the retrained model's test accuracy, per peer and mean."""
    head = f"{'':<12}{f'search (val, {1 - val_fraction:.0%} train)':>26}"
    head += f"{'final (test, all train)':>26}" if final else ""
    lines = [head]
    tests = {p["name"]: p.get("test_acc") for p in final["peers"]} if final else {}
    for name in peers:
        line = f"{name:<12}{_pct(best.peer_acc.get(name)):>26}"
        lines.append(line + (f"{_pct(tests.get(name)):>26}" if final else ""))
    mean = f"{'mean':<12}{_pct(best.mean_acc):>26}"
    lines.append(mean + (f"{_pct(final.get('mean_test_acc')):>26}" if final else ""))
    if final:
        lines.append(f"final run: {final['run_dir']}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}%"


def _write_summary(job: SearchJob, rows: list[TrialRow], best: TrialRow, final: dict[str, Any] | None) -> None:
    summary = {
        "search_dir": str(job.search_dir),
        "score": job.score_key,
        "options": asdict(job.options),
        "trials": [asdict(r) for r in ranked(rows)],
        "best": asdict(best),
        "final": final,
    }
    (job.search_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def _interrupted(job: SearchJob) -> int:
    print(
        f"\ncmd-dist: search interrupted; finished trials and checkpoints are kept. Continue with:\n"
        f"  cmd-dist tune --resume {job.search_dir}",
        file=sys.stderr,
    )
    return 130
