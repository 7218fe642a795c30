"""The command lines of ``cmd-dist evaluate`` and ``cmd-dist export``: their arguments, and what they print and write.

Ray-free like the rest of the layer: ``evaluate --address`` is dispatched by :mod:`cmd_dist.cli` to
:mod:`cmd_dist.launch.evaluate`, which runs :func:`cmd_dist.infer.evaluate.evaluate_run` in a Ray task; everything
else runs here, in this process. User mistakes raise the shared error types, which the CLI prints as one line
(exit 2).
"""

from __future__ import annotations

import argparse
from typing import Any

from cmd_dist.infer.evaluate import format_table, write_json
from cmd_dist.infer.export import ENSEMBLE, FORMATS, check_format, export_run
from cmd_dist.infer.loading import CHECKPOINT_CHOICES, open_trained_run

CHECKPOINT_HELP = f"which checkpoint: {CHECKPOINT_CHOICES} (default best: best_checkpoint/)"


def add_evaluate_parser(sub: Any) -> argparse.ArgumentParser:
    """``evaluate RUN [--checkpoint] [--split] [--out] [--address] [key=value ...]`` (RUN is parsed as ``config``:
    :func:`cmd_dist.cli.parse_args` takes the first word that is not key=value, in any order with the flags)."""
    e = sub.add_parser("evaluate", help="score every peer of a run and their ensemble on a split")
    e.add_argument("config", nargs="?", metavar="RUN", help="a run folder (or URI) written by cmd-dist train")
    e.add_argument(
        "overrides", nargs="*", help="where to read the data, e.g. data.root=/other/folder (same classes as the run)"
    )
    e.add_argument("--checkpoint", default="best", help=CHECKPOINT_HELP)
    e.add_argument(
        "--split",
        default=None,
        help="test, val or train (default: the split the run evaluated on: val in protocol search, test in final)",
    )
    e.add_argument("--out", metavar="FILE.json", help="write every number (per-class accuracy too) as JSON here")
    e.add_argument("--address", help="evaluate in a Ray task on this cluster (RUN and data.root must be visible there)")
    return e


def add_export_parser(sub: Any) -> argparse.ArgumentParser:
    x = sub.add_parser("export", help="write a peer or the peers' ensemble as TorchScript, ONNX or safetensors")
    x.add_argument("run", metavar="RUN", help="a run folder (or URI) written by cmd-dist train")
    x.add_argument("--checkpoint", default="best", help=CHECKPOINT_HELP)
    x.add_argument("--format", required=True, metavar="FORMAT", help=f"one of {', '.join(FORMATS)}")
    x.add_argument("--peer", default=ENSEMBLE, help="a peer's name, or ensemble (default: the mean of all peers)")
    x.add_argument("--out", metavar="PATH", help="the file to write (default: RUNNAME-PEER-CHECKPOINT.EXT here)")
    x.set_defaults(func=cmd_export)
    return x


def report_evaluation(result: dict, out: str | None) -> None:
    """The table on the console; the JSON to ``out`` (atomically)."""
    print(format_table(result))
    if out:
        print(f"results: {write_json(result, out)}")


def cmd_export(args: argparse.Namespace) -> int:
    check_format(args.format)  # before the checkpoint is read
    trained = open_trained_run(args.run, args.checkpoint)
    try:
        files = export_run(trained, args.format, args.peer, args.out)
    finally:
        trained.close()
    what = "ensemble of " + ", ".join(trained.peer_names) if args.peer == ENSEMBLE else f"peer {args.peer}"
    print(f"exported {what} ({trained.checkpoint}, epoch {trained.epoch}) as {args.format}: {files[0]}")
    for extra in files[1:]:
        print(f"description: {extra}")
    return 0
