"""``cmd-dist tune CONFIG [key=value ...]``: search b1, b2, eta on clean validation data, retrain the best, test it.

The protocol is the paper's (appendix A.2): every trial trains all peers on 90% of the (noisy) training
set and is scored on the other 10%, kept clean, so the test set is never read while choosing; the best
setting is then retrained on all training data and tested once. Everything the user can get wrong is
checked here, before Ray starts (one line, exit 2); the Ray Tune side lives in :mod:`tune.driver`.

A search folder holds ``search.yaml`` (what is being searched: enough to ``--resume``), ``trials/``
(Ray Tune's experiment: one folder per trial with Tune's logs and that trial's cmd-dist run, tb/
included), ``results.csv`` / ``results.md``, ``best.yaml``, ``final/`` (the retrain) and ``summary.json``.

The search folder may be behind a filesystem URI (``output_dir=s3://bucket/runs``, see
:mod:`cmd_dist.runs.storage`): Tune keeps its experiment there through pyarrow, every trial is a cmd-dist run on
the URI (its workers stage and upload as ``cmd-dist train`` does), and the driver writes the search's own files
in a staging folder of its own and uploads them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from cmd_dist.config import Config, ConfigError, from_dict, load_config
from cmd_dist.errors import RunFolderBusy, first_line
from cmd_dist.launch.preflight import preflight
from cmd_dist.launch.session import sigterm_as_interrupt, stop_ray
from cmd_dist.runs.fs import absolute, join, open_folder
from cmd_dist.runs.lock import lock_run
from cmd_dist.runs.run_folder import read_run_file, write_run_file
from cmd_dist.runs.storage import RunStore
from tune.job import DEFAULT_REDUCTION_FACTOR, STATE_FILE, TUNE_EXPERIMENT, SearchJob, SearchOptions
from tune.results import TrialRow, best_row, labels_distilled, ranked, write_best_yaml, write_tables
from tune.space import SearchSpace, final_config, load_space, parse_space, trial_config

ALGOS = ("optuna", "random", "grid")
DEFAULT_TRIALS = 16
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


def check_gpus_per_trial(gpus: float | None, nodes: list[dict[str, float]]) -> None:
    """``--gpus-per-trial G`` on a cluster with fewer than G GPUs: one line naming the flag (not the ray.use_gpu
    it sets), before the search folder is written."""
    if gpus is None:
        return
    total = sum(float(n.get("GPU", 0.0)) for n in nodes)
    if total <= 0:
        raise ConfigError(f"--gpus-per-trial {gpus:g}: the Ray cluster has no GPU; leave the flag out for CPU trials")
    if gpus > total + 1e-9:
        raise ConfigError(f"--gpus-per-trial {gpus:g}: the Ray cluster has {total:g} GPU(s); use at most {total:g}")


#: Searched keys that act only through the labels the peers distil from each other (chi of Eq. 12).
DISTILLATION_KEYS = ("method.eta", "method.b2")


def nothing_distilled_warning(job: SearchJob, rows: list[TrialRow], read: Any = read_run_file) -> str | None:
    """A warning when the search varied eta or b2 but no trial distilled a single label: chi (Eq. 12) never fell
    below the peers' entropies in the trials' epochs, so those keys changed nothing."""
    cfg = job.config
    searched = [k for k in DISTILLATION_KEYS if k in job.space.keys]
    if not searched or cfg.method.objective != "cmd" or cfg.method.knowledge not in ("cmd-s", "cmd-p"):
        return None
    counts = []
    for row in rows:
        if row.run_dir:
            try:
                counts.append(labels_distilled(read(row.run_dir, "metrics.jsonl")))
            except OSError:
                counts.append(None)
    known = [c for c in counts if c is not None]
    if not known or any(c > 0 for c in known):
        return None
    return (
        f"cmd-dist: warning: no trial distilled a single label between peers (chi of Eq. 12 never fell below "
        f"their entropies in {cfg.train.epochs} epochs), so {' and '.join(searched)} were searched for nothing; "
        f"search with more epochs (train.epochs=N) or a lower method.eta"
    )


def _absolute_paths(cfg: Config) -> None:
    """Ray workers do not run in the caller's directory: make output_dir (a folder) and data.root absolute."""
    cfg.output_dir = str(absolute(cfg.output_dir))
    open_folder(cfg.output_dir)  # an unknown scheme, a URI pyarrow cannot open: one line, before Ray
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
    apply_gpus_per_trial(cfg, getattr(args, "gpus_per_trial", None))
    _absolute_paths(cfg)
    base = cfg.to_dict()
    space = load_space(args.space, base)
    options = check_options(args, cfg, space)
    search_dir = join(cfg.output_dir, cfg.run_name or time.strftime("tune-%Y%m%d-%H%M%S"))
    if holds_search(search_dir):
        raise ConfigError(
            f"{search_dir} already holds a search; continue it with --resume {search_dir}, or set another run_name"
        )
    return SearchJob(search_dir, base, space, options)


def holds_search(search_dir: Path | str) -> bool:
    """A search was started there (its state file or Tune's experiment exists), a folder or a URI."""
    folder = open_folder(search_dir)
    try:
        return folder.is_file(STATE_FILE) or folder.is_dir(TUNE_EXPERIMENT)
    except OSError as e:
        raise ConfigError(
            f"output_dir: cannot read {search_dir} ({first_line(e)}); check the URI and this "
            f"machine's credentials for it"
        ) from None


def _prepare_resume(args: argparse.Namespace) -> SearchJob:
    search_dir = absolute(args.resume)
    try:
        state_text = open_folder(search_dir, key="--resume").read_bytes(STATE_FILE)
    except OSError as e:
        raise ConfigError(f"--resume {args.resume}: cannot read it ({first_line(e)})") from None
    state_path = join(search_dir, STATE_FILE)
    if state_text is None:
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
    try:
        state = yaml.safe_load(state_text)
        if not isinstance(state, dict):
            raise TypeError("not a mapping")
        cfg = from_dict(state["config"])
        base = cfg.to_dict()
        space = parse_space(state["space"], base, where=f"{state_path} space")
        options = SearchOptions(**state["options"])
    except (KeyError, TypeError, yaml.YAMLError) as e:
        raise ConfigError(f"--resume {args.resume}: {state_path} is incomplete or damaged ({first_line(e)})") from None
    if args.address:
        base["ray"]["address"] = args.address
    if getattr(args, "gpus_per_trial", None) is not None:
        raise ConfigError("--resume continues a saved search with its saved resources; drop --gpus-per-trial")
    return SearchJob(search_dir, base, space, options, resume=True)


def save_state(job: SearchJob) -> None:
    """search.yaml, written atomically (a folder) or as one object (a URI)."""
    state = {"config": job.base, "space": job.space.to_dict(), "options": asdict(job.options)}
    write_run_file(job.search_dir, STATE_FILE, yaml.safe_dump(state, sort_keys=False).encode())


def lock_search(search_dir: Path | str) -> Any:
    """The search folder's lock, held until :func:`cmd_tune` ends: a folder's ``flock``, or a URI's best-effort
    heartbeat lock (:class:`~cmd_dist.runs.lock.UriRunLock`;
    the trials' run folders on the URI are covered by it)."""
    try:
        return lock_run(search_dir)
    except RunFolderBusy as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        why = getattr(e, "strerror", None) or first_line(e)
        raise ConfigError(f"output_dir: cannot write the search folder {search_dir} ({why})") from None


# ----------------------------------------------------------------------------- command


def cmd_tune(args: argparse.Namespace) -> int:
    """Check, search (Ray Tune), write the table and best.yaml, retrain the best on all data and test it."""
    job = prepare(args)
    # The trials' data: the search protocol reads the training file only, never the test file.
    preflight(trial_config(job.base, {}))
    gpus = getattr(args, "gpus_per_trial", None)
    if gpus is not None:  # checked before the search folder exists, so a refused search leaves nothing behind
        from cmd_dist.launch.cluster import cluster_nodes, init_ray, local_node, ray_address
        from cmd_dist.launch.console import set_console

        if ray_address(job.config) is None:
            nodes = local_node()  # what a fresh local Ray will have
        else:
            set_console(verbose=bool(getattr(args, "verbose", False)))
            init_ray(job.config)
            nodes = cluster_nodes()
        check_gpus_per_trial(gpus, nodes)
    lock = lock_search(job.search_dir)
    # The driver's own files (tables, best.yaml, summary): written here, then uploaded when behind a URI.
    store = RunStore.open(job.search_dir)
    try:
        return _search_and_retrain(args, job, store)
    finally:
        store.close()
        lock.release()  # a URI's lock is an object: left behind, it would refuse --resume for a while


def _search_and_retrain(args: argparse.Namespace, job: SearchJob, store: RunStore) -> int:
    save_state(job)
    opts = job.options
    print(f"cmd-dist: search folder {job.search_dir}", flush=True)
    print(
        f"searching {', '.join(p.key + ' ~ ' + p.describe() for p in job.space.params)}; {opts.trials} trials, "
        f"{opts.algo}{', ASHA' if opts.asha else ''}, score {job.score_key} on the clean validation split",
        flush=True,
    )

    # These import Ray: only after everything above is known to be good.
    from cmd_dist.launch.cluster import init_ray
    from cmd_dist.launch.console import set_console
    from cmd_dist.launch.failures import RunFailed
    from tune import driver

    verbose = bool(getattr(args, "verbose", False))
    set_console(verbose=verbose)
    try:
        sigterm_as_interrupt()
        init_ray(job.config)
        sigterm_as_interrupt()  # again: ray.init installs a SIGTERM handler of its own
        outcome = driver.run_search(job, verbose=verbose)
    except KeyboardInterrupt:
        stop_ray()
        return _interrupted(job)
    if outcome.unfinished:
        return _interrupted(job)

    rows = outcome.rows
    csv_path, md_path = write_tables(rows, job.space.keys, job.peers, store.dir)
    store.upload(csv_path.name, md_path.name)
    counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(r.status for r in rows)}
    print(
        f"\nsearch done in {outcome.wall_s:.0f} s: {len(rows)} trials ("
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + ")"
    )
    print(md_path.read_text(), end="")
    warning = nothing_distilled_warning(job, rows)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    best = best_row(rows)
    if best is None:
        print(
            f"cmd-dist: error: no trial reported a validation accuracy; see the error column of "
            f"{store.shown(csv_path.name)}",
            file=sys.stderr,
        )
        return 1
    final_cfg = final_config(outcome.trial_base, best.params)
    final_cfg.output_dir, final_cfg.run_name = str(job.search_dir), ""
    best_path = write_best_yaml(final_cfg, best, job.score_key, store.dir, shown=store.shown())
    store.upload(best_path.name)
    print(
        f"best trial {best.trial}: {job.score_key} {best.score:.2f}% with "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    )
    print(f"best config: {store.shown(best_path.name)}   table: {store.shown(csv_path.name)}")

    final = None
    if not args.no_final:
        final_cfg.run_name = "final"
        preflight(final_cfg)  # the search is over: now, and only now, the test split is read
        try:
            final = driver.final_retrain(final_cfg, join(job.search_dir, "final"), verbose=args.verbose)
        except KeyboardInterrupt:
            stop_ray()
            return _interrupted(job)
        except RunFailed as e:
            if e.detail:
                print(e.detail.rstrip(), file=sys.stderr)
            print(f"cmd-dist: error: final retrain: {e}", file=sys.stderr)
            return e.code
        if final.get("stopped"):
            print(f"cmd-dist: error: final retrain: {final['stopped']}", file=sys.stderr)
    _write_summary(job, rows, best, final)
    print(comparison(best, final, job.peers, job.config.data.val_fraction))
    print(f"tensorboard --logdir {job.search_dir} --host 127.0.0.1")
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
    write_run_file(job.search_dir, "summary.json", json.dumps(summary, indent=2).encode())


def _interrupted(job: SearchJob) -> int:
    print(
        f"\ncmd-dist: search interrupted; finished trials and checkpoints are kept. Continue with:\n"
        f"  cmd-dist tune --resume {job.search_dir}",
        file=sys.stderr,
    )
    return 130
