"""``cmd-dist train CONFIG [key=value ...]``, ``cmd-dist tune CONFIG [...]``, ``cmd-dist submit CONFIG [...]``
and ``cmd-dist report DIR...``.

User mistakes (config, data files) print one line and exit with code 2, before Ray starts.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from cmd_dist.config import Config, ConfigError, load_config
from cmd_dist.data.prepare import check_data
from cmd_dist.errors import DataError
from cmd_dist.runs.storage import is_uri, join

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def fail(msg: str, code: int = EXIT_USAGE) -> None:
    print(f"cmd-dist: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def preflight(cfg: Config, echo: bool = True) -> None:
    """Checks that need the data: the files exist and parse, a batch fits the training set, peer weights load.

    Prints the labels trained on and their realised noise rate.
    """
    check = check_data(cfg.data, cfg.noise)
    n_train = check.num_train
    if cfg.train.batch_size > n_train:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the {n_train} training images; "
            f"use at most {n_train}"
        )
    last, replicas = n_train % cfg.train.batch_size, cfg.ray.replicas_per_peer
    if 0 < last < replicas:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} leaves a last batch of {last} of the {n_train} training images, "
            f"fewer than ray.replicas_per_peer={replicas} can split; choose another train.batch_size"
        )
    from cmd_dist.models import check_peer_weights

    check_peer_weights(cfg)
    if echo:
        print(f"cmd-dist: {check.line()}", flush=True)


def _sigterm_as_interrupt() -> None:
    """SIGTERM and SIGINT (Ctrl-C) both raise KeyboardInterrupt in the main thread: one way out, exit 130."""

    def handler(signum, frame):  # noqa: ARG001
        # A second signal while shutting down must not print a traceback over the resume hint.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        run_dir, cfg = _resume_config(args.resume, args.overrides)
    else:
        if args.config is None:
            fail("a CONFIG file is required (e.g. configs/demo.yaml), or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)
        if args.address:
            cfg.ray.address = args.address
        run_dir = None
    preflight(cfg)

    from cmd_dist.launch import launcher  # imports Ray: only after the config is known to be good

    launcher.set_console(verbose=args.verbose)
    launcher.check_placement(cfg)  # a local Ray's resources are known before it starts
    if run_dir is None:
        run_dir = launcher.resolve_run_dir(cfg)
    else:
        launcher.lock_run_dir(run_dir)
    print(f"cmd-dist: run folder {run_dir}", flush=True)
    try:
        _sigterm_as_interrupt()
        launcher.init_ray(cfg)
        _sigterm_as_interrupt()  # again: ray.init installs a SIGTERM handler of its own
        summary = launcher.train(cfg, run_dir, verbose=args.verbose)
    except KeyboardInterrupt:
        _stop_ray()
        print(f"\n{interrupted_message(run_dir, len(cfg.peers))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except launcher.RunFailed as e:
        _stop_ray()
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


def _resume_config(resume: str, overrides: list[str]) -> tuple[Path | str, Config]:
    """The run folder (a path, or a URI when output_dir was one) and its config with ``overrides`` applied."""
    import tempfile

    from cmd_dist.config import dump_yaml
    from cmd_dist.runs.storage import read_run_file, split_location, write_run_file

    run_dir: Path | str = resume.rstrip("/") if is_uri(resume) else Path(resume).expanduser().resolve()
    text = read_run_file(run_dir, "config.yaml")
    if text is None:
        fail(f"--resume {resume}: no config.yaml there; pass a run folder written by cmd-dist train")
    with tempfile.TemporaryDirectory(prefix="cmd-dist-resume-") as tmp:
        (Path(tmp) / "config.yaml").write_bytes(text)
        cfg = load_config(Path(tmp) / "config.yaml", overrides)
    cfg.output_dir, cfg.run_name = split_location(run_dir)
    if overrides:  # e.g. train.epochs=200 extends a finished run; record what now applies
        write_run_file(run_dir, "config.yaml", dump_yaml(cfg).encode())
    return run_dir, cfg


def interrupted_message(run_dir: Path | str, num_peers: int) -> str:
    """What an interrupted run kept, and the command that continues it."""
    from cmd_dist.runs.storage import newest_checkpoint_epoch

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


def _stop_ray() -> None:
    try:
        import ray

        ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmd-dist", description="Confident knowledge selection + mutual distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train N peers with CMD on Ray")
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.eta=3 train.epochs=10")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete checkpoint")
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
    from cmd_dist.launch.submit import add_parser as add_submit_parser

    add_submit_parser(sub)
    return parser


def cmd_report(args: argparse.Namespace) -> int:
    from cmd_dist.report import ReportError, write_report  # matplotlib, no Ray

    uris = [p for p in args.paths if is_uri(p)]
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


def _report_from_uris(args: argparse.Namespace, write_report, report_error) -> int:
    """The report of run or search folders behind URIs: what it reads is copied into a temporary folder; the
    report goes to ``--out``, or (one URI) back to ``URI/report/``."""
    import shutil
    import tempfile

    from cmd_dist.runs.storage import mirror_for_report, upload_folder

    tmp = Path(tempfile.mkdtemp(prefix="cmd-dist-report-"))
    try:
        paths = [mirror_for_report(p, tmp / f"in{i}") if is_uri(p) else Path(p) for i, p in enumerate(args.paths)]
        out = Path(args.out) if args.out else tmp / "report"
        try:
            report = write_report(paths, out)
        except report_error as e:
            message = str(e)
            for i, p in enumerate(args.paths):  # name the URI, not the temporary copy
                if is_uri(p):
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
    except (ConfigError, DataError) as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
