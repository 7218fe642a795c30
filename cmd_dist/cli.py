"""``cmd-dist train CONFIG [key=value ...]``, ``cmd-dist tune CONFIG [...]``, ``cmd-dist submit CONFIG [...]``,
``cmd-dist report DIR...``, ``cmd-dist evaluate RUN [...]`` and ``cmd-dist export RUN [...]``.

User mistakes (config, data files) print one line and exit with code 2, before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmd_dist.config import Config, ConfigError, load_config
from cmd_dist.errors import CheckpointError, DataError
from cmd_dist.launch.preflight import preflight
from cmd_dist.launch.session import sigterm_as_interrupt, stop_ray
from cmd_dist.runs.fs import absolute, join

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def fail(msg: str, code: int = EXIT_USAGE) -> None:
    print(f"cmd-dist: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def cmd_train(args: argparse.Namespace) -> int:
    resume = None
    if args.resume:
        resume = _resume_config(args.resume, args.overrides, args.allow_changes)
        run_dir, cfg = resume.run_dir, resume.cfg
    else:
        if args.allow_changes:
            fail("--allow-changes applies to --resume RUN_DIR (a new run has nothing to change)")
        if args.config is None:
            fail("a CONFIG file is required (e.g. configs/demo.yaml), or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)
        run_dir = None
    if args.address:
        cfg.ray.address = args.address
    preflight(cfg)

    # These import Ray: only after the config is known to be good.
    from cmd_dist.launch.cluster import init_ray
    from cmd_dist.launch.console import set_console
    from cmd_dist.launch.failures import RunFailed
    from cmd_dist.launch.job import resolve_run_dir, train
    from cmd_dist.launch.placement import check_placement
    from cmd_dist.launch.summary import record_resume
    from cmd_dist.runs.lock import hold_run_lock

    set_console(verbose=args.verbose)
    check_placement(cfg)  # a local Ray's resources are known before it starts
    if run_dir is None:
        run_dir = resolve_run_dir(cfg)
    else:
        hold_run_lock(run_dir)
        if resume.writes:  # only now, holding the lock
            record_resume(run_dir, resume.text, resume.cfg, resume.changes, resume.done + 1)
            if resume.changes:
                print(f"cmd-dist: {resume.line()}", flush=True)
    print(f"cmd-dist: run folder {run_dir}", flush=True)
    try:
        sigterm_as_interrupt()
        init_ray(cfg)
        sigterm_as_interrupt()  # again: ray.init installs a SIGTERM handler of its own
        summary = train(cfg, run_dir, verbose=args.verbose)
    except KeyboardInterrupt:
        stop_ray()
        print(f"\n{interrupted_message(run_dir, len(cfg.peers))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunFailed as e:
        stop_ray()
        if e.detail:
            print(e.detail.rstrip(), file=sys.stderr)
        print(f"cmd-dist: error: {e}", file=sys.stderr)
        return e.code
    if summary.get("stopped"):
        print(f"cmd-dist: error: {summary['stopped']}", file=sys.stderr)
        return 1
    split = summary["eval_split"]
    for peer in summary["peers"]:
        acc = peer[f"{split}_acc"]
        print(f"final {split} accuracy  {peer['name']} ({peer['arch']}): {acc:.2f}%")
    print(f"summary: {join(run_dir, 'summary.json')}   tensorboard --logdir {join(run_dir, 'tb')} --host 127.0.0.1")
    return 0


@dataclass
class Resume:
    """What ``--resume RUN key=value ...`` continues: the run folder, its config with the overrides applied, the
    text of the config.yaml it had, the training changes allowed by ``--allow-changes`` and the epochs done."""

    run_dir: Path | str
    cfg: Config
    text: bytes
    changes: dict[str, tuple[Any, Any]]
    done: int
    writes: bool  # config.yaml changes (training changes, or keys that change nothing trained)

    def line(self) -> str:
        what = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in self.changes.items())
        return f"changed from epoch {self.done + 1} on (recorded in changes.jsonl and summary.json): {what}"


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _resume_config(resume: str, overrides: list[str], allow_changes: bool = False) -> Resume:
    """The run folder (a path, or a URI when output_dir was one) and its config with ``overrides`` applied.

    Overrides that change what trains (config.RESUME_KEYS) are refused, one line naming the key, unless
    ``allow_changes``; nothing in the run folder is written here (the caller records after taking the lock).
    """
    import tempfile

    from cmd_dist.config import config_changes, dump_yaml, parse_overrides, resume_key_kind
    from cmd_dist.runs.fs import split_location
    from cmd_dist.runs.run_folder import newest_checkpoint_epoch, read_run_file

    run_dir = absolute(resume)
    text = read_run_file(run_dir, "config.yaml")
    if text is None:
        fail(f"--resume {resume}: no config.yaml there; pass a run folder written by cmd-dist train")
    for key, _ in parse_overrides(overrides):
        if resume_key_kind(key) == "fixed":
            fail(f"{key}: --resume continues the run in {run_dir}; drop the {key}= override")
    with tempfile.TemporaryDirectory(prefix="cmd-dist-resume-") as tmp:
        (Path(tmp) / "config.yaml").write_bytes(text)
        before = load_config(Path(tmp) / "config.yaml")
        cfg = load_config(Path(tmp) / "config.yaml", overrides)
    changed = config_changes(before, cfg)
    training = {k: v for k, v in changed.items() if resume_key_kind(k) == "training"}
    hint = "start a new run (another run_name) with the new values"
    if training and not allow_changes:
        key, (old, new) = next(iter(training.items()))
        more = f" (and {len(training) - 1} more)" if len(training) > 1 else ""
        fail(
            f"{key}: {_show(old)} -> {_show(new)}{more} changes what {run_dir} trains, and a run folder keeps what "
            f"trained it; {hint}, or pass --allow-changes to record the change in the run folder"
        )
    done = max(0, newest_checkpoint_epoch(run_dir, len(before.peers))) if training else 0
    if training and cfg.train.epochs < done:
        fail(
            f"train.epochs: {cfg.train.epochs} is fewer than the {done} epochs {run_dir} has trained; a run cannot "
            f"be shortened after the fact; {hint}"
        )
    if training and cfg.train.epochs == done:
        key = next(iter(training))
        fail(
            f"{key}: {run_dir} has trained all its {done} epochs, so nothing would train with the change; "
            f"extend it with --allow-changes train.epochs=N (N > {done}), or {hint}"
        )
    cfg.output_dir, cfg.run_name = split_location(run_dir)
    before.output_dir, before.run_name = cfg.output_dir, cfg.run_name
    writes = dump_yaml(cfg) != dump_yaml(before)
    return Resume(run_dir, cfg, text, training, done, writes)


def interrupted_message(run_dir: Path | str, num_peers: int) -> str:
    """What an interrupted run kept, and the command that continues it."""
    from cmd_dist.runs.run_folder import newest_checkpoint_epoch

    try:
        newest = newest_checkpoint_epoch(run_dir, num_peers)
    except (OSError, ConfigError):
        newest = -2  # the URI cannot be read right now
    kept = (
        f"epochs 1-{newest} are checkpointed"
        if newest > 0
        else "no epoch had finished, nothing is lost"
        if newest == -1
        else "what was checkpointed is kept"
    )
    return f"cmd-dist: interrupted; {kept}. Continue with:\n  cmd-dist train --resume {run_dir}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmd-dist", description="Confident knowledge selection + mutual distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train N peers with CMD on Ray")
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.eta=3 train.epochs=10")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete checkpoint")
    t.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: let key=value change what trains (lr, epochs, ...); the run folder records the change "
        "and the epoch it took effect (changes.jsonl, summary.json; config.original.yaml keeps the first config)",
    )
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    t.add_argument(
        "--verbose", action="store_true", help="show Ray's own logs (worker set-up, reports, lost workers' tracebacks)"
    )
    t.set_defaults(func=cmd_train)
    u = sub.add_parser("tune", help="search b1, b2, eta with Ray Tune, then retrain the best and test it")
    u.add_argument("config", nargs="?", help="YAML config the trials vary (see configs/)")
    u.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. train.epochs=50")
    u.add_argument("--space", help="search-space YAML (default tune/space.yaml)")
    u.add_argument("--trials", type=int, default=None, help="number of trials (default 16; grid: the grid size)")
    u.add_argument("--max-concurrent", type=int, default=0, help="0 = as many as resources allow")
    u.add_argument("--algo", choices=["optuna", "random", "grid"], default="optuna")
    u.add_argument("--no-asha", action="store_true", help="run every trial to the end (no early stopping)")
    u.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="ASHA: epochs every trial runs before it can be stopped (default epochs/4)",
    )
    u.add_argument(
        "--reduction-factor",
        type=float,
        default=None,
        help="ASHA: keep the best 1/N of trials at each rung (default 3)",
    )
    u.add_argument("--metric", default="mean", help="trial score: mean over peers, or a peer name")
    u.add_argument("--no-final", action="store_true", help="skip the final retrain on all training data")
    u.add_argument("--resume", metavar="SEARCH_DIR", help="continue an interrupted search")
    u.add_argument("--address")
    u.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="GPUs each trial holds, shared by its peers' workers (e.g. 0.5: two trials per GPU)",
    )
    u.add_argument(
        "--verbose", action="store_true", help="show Ray's logs, Tune's trial tables and lost workers' tracebacks"
    )
    u.set_defaults(func=_cmd_tune)
    r = sub.add_parser("report", help="report.md and PNG figures from run and search folders")
    r.add_argument(
        "paths", nargs="+", metavar="RUN_OR_SEARCH_DIR", help="run folders, search folders, or folders of runs"
    )
    r.add_argument("--out", metavar="DIR", help="where report.md and the PNGs go (default: FOLDER/report)")
    r.set_defaults(func=cmd_report)
    li = sub.add_parser("label-issues", help="rank the training labels that look wrong, from a run's per-sample record")
    li.add_argument("run", metavar="RUN", help="a run folder (or URI) trained by cmd-dist train")
    li.add_argument("--out", metavar="CSV", help="the ranked CSV (default RUN/label_issues/issues.csv)")
    li.add_argument("--top", type=int, metavar="K", help="only the K most likely wrong labels in the CSV")
    li.add_argument("--checkpoint", default="last", help="last (default: the longest record), best, or an epoch")
    li.set_defaults(func=cmd_label_issues)
    from cmd_dist.launch.submit import add_parser as add_submit_parser

    add_submit_parser(sub)
    from cmd_dist.infer.commands import add_evaluate_parser, add_export_parser

    add_evaluate_parser(sub).set_defaults(func=cmd_evaluate)
    add_export_parser(sub)
    from cmd_dist.launch.predict import add_parser as add_predict_parser

    add_predict_parser(sub)
    return parser


def cmd_evaluate(args: argparse.Namespace) -> int:
    """In this process, or with ``--address`` in a Ray task on that cluster (cmd_dist/launch/evaluate.py)."""
    from cmd_dist.infer.commands import report_evaluation

    if args.config is None:
        fail("a RUN folder is required (a run folder or URI written by cmd-dist train)")
    if args.address:
        from cmd_dist.launch.evaluate import evaluate_on_cluster

        result = evaluate_on_cluster(args.address, args.config, args.checkpoint, args.split, args.overrides)
    else:
        from cmd_dist.infer.evaluate import evaluate_run

        result = evaluate_run(args.config, args.checkpoint, args.split, args.overrides)
    report_evaluation(result, args.out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cmd_dist.report import ReportError, write_report  # matplotlib, no Ray

    uris = [p for p in args.paths if not isinstance(absolute(p), Path)]  # absolute(): a str behind a URI
    if uris and not args.out and len(args.paths) > 1:
        fail(f"{uris[0]}: a report over several folders, one of them a URI, needs --out DIR (a local folder)")
    if uris:
        return _report_from_uris(args, write_report, ReportError)
    try:
        report = write_report([Path(p) for p in args.paths], Path(args.out) if args.out else None)
    except ReportError as e:
        fail(str(e))
    print(f"report: {report}")
    return 0


def cmd_label_issues(args: argparse.Namespace) -> int:
    from cmd_dist.infer.labels import label_issues, summary_lines
    from cmd_dist.infer.loading import open_trained_run

    if args.top is not None and args.top < 1:
        fail(f"--top {args.top}: give a number of rows of at least 1, or leave --top out for every sample")
    if args.out is None and not isinstance(absolute(args.run), Path):
        fail(f"{args.run}: a run behind a URI needs --out CSV (a local file)")
    run = open_trained_run(args.run, args.checkpoint)  # a user error: one line, exit 2 (main)
    try:
        found = label_issues(run, Path(args.out or Path(args.run) / "label_issues" / "issues.csv"), args.top)
    finally:
        run.close()
    print("\n".join(summary_lines(run, found)))
    return 0


def _report_from_uris(args: argparse.Namespace, write_report, report_error) -> int:
    """The report of run or search folders behind URIs: what it reads is copied into a temporary folder; the
    report goes to ``--out``, or (one URI) back to ``URI/report/``."""
    import shutil
    import tempfile

    from cmd_dist.runs.run_folder import mirror_for_report, upload_folder

    tmp = Path(tempfile.mkdtemp(prefix="cmd-dist-report-"))
    try:
        paths = [mirror_for_report(p, tmp / f"in{i}") for i, p in enumerate(args.paths)]  # a folder: itself
        out = Path(args.out) if args.out else tmp / "report"
        try:
            report = write_report(paths, out)
        except report_error as e:
            message = str(e)
            for i, p in enumerate(args.paths):  # name the URI, not the temporary copy
                if paths[i] != Path(p):
                    message = message.replace(str(paths[i]), p.rstrip("/"))
            fail(message)
        if args.out:
            print(f"report: {report}")
        else:
            target = str(join(args.paths[0], "report"))
            upload_folder(out, target)
            print(f"report: {join(target, report.name)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from tune.search import cmd_tune

    return cmd_tune(args)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, CONFIG and ``key=value`` overrides in any order (``tune CONFIG --trials 3 a=b`` included).

    argparse stops filling ``overrides`` at the first flag; the overrides after it come back as extras.
    The first positional that is not ``key=value`` is CONFIG; an unknown flag is an error, and any other
    word is kept as an override, which the config loader rejects as "not key=value".
    """
    args, extras = parser.parse_known_args(argv)
    if not hasattr(args, "overrides"):
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return args
    flags = [x for x in extras if x.startswith("-")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    positionals = [x for x in [args.config, *args.overrides, *extras] if x is not None]
    # CONFIG: the first positional that is not key=value (a file named a=b.yaml counts as a file).
    at = next((i for i, x in enumerate(positionals) if "=" not in x or Path(x).is_file()), None)
    args.config = None if at is None else positionals.pop(at)
    args.overrides = positionals  # a stray word fails there, in the config loader, as "not key=value"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError) as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
