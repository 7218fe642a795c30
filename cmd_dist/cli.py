"""``cmd-dist train CONFIG [key=value ...]``, ``cmd-dist tune CONFIG [...]`` and ``cmd-dist submit CONFIG [...]``.

User mistakes (config, data files) print one line and exit with code 2, before Ray starts.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from cmd_dist.config import Config, ConfigError, load_config
from cmd_dist.data import DataError, check_data
from cmd_dist.storage import join

EXIT_USAGE = 2


def fail(msg: str, code: int = EXIT_USAGE) -> None:
    print(f"cmd-dist: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def preflight(cfg: Config) -> None:
    """Checks that need the data: the files exist and parse, and a batch fits the training set."""
    n_train = check_data(cfg.data)
    if cfg.train.batch_size > n_train:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the {n_train} training images; "
            f"use at most {n_train}"
        )


def _sigterm_as_interrupt() -> None:
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


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

    from cmd_dist import launcher  # imports Ray: only after the config is known to be good

    if run_dir is None:
        run_dir = launcher.resolve_run_dir(cfg)
    print(f"cmd-dist: run folder {run_dir}", flush=True)
    try:
        launcher.init_ray(cfg)
        _sigterm_as_interrupt()  # after ray.init, which installs a SIGTERM handler of its own
        summary = launcher.train(cfg, run_dir)
    except KeyboardInterrupt:
        _stop_ray()
        print(
            f"\ncmd-dist: interrupted; completed epochs are checkpointed. Continue with:\n"
            f"  cmd-dist train --resume {run_dir}",
            file=sys.stderr,
        )
        return 130
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
    from cmd_dist.storage import RunStore, is_uri

    location: Path | str = resume.rstrip("/") if is_uri(resume) else Path(resume).expanduser().resolve()
    store = RunStore(location)
    text = store.read_bytes("config.yaml")
    if text is None:
        fail(f"--resume {resume}: no config.yaml there; pass a run folder written by cmd-dist train")
    with tempfile.TemporaryDirectory(prefix="cmd-resume-") as tmp:
        (Path(tmp) / "config.yaml").write_bytes(text)
        cfg = load_config(Path(tmp) / "config.yaml", overrides)
    if isinstance(location, Path):
        cfg.output_dir, cfg.run_name = str(location.parent), location.name
    else:
        cfg.output_dir, cfg.run_name = location.rsplit("/", 1)
    if overrides:  # e.g. train.epochs=200 extends a finished run; record what now applies
        store.write_bytes("config.yaml", dump_yaml(cfg).encode())
    return location, cfg


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
    u.set_defaults(func=_cmd_tune)
    from cmd_dist.submit import add_parser as add_submit_parser

    add_submit_parser(sub)
    return parser


def _cmd_tune(args: argparse.Namespace) -> int:
    from tune.search import cmd_tune

    return cmd_tune(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
