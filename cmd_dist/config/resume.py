"""What a resume may change: every config key classified by what changing it on ``--resume`` does to the run,
and the keys two configs differ in."""

from __future__ import annotations

from typing import Any

from cmd_dist.config.schema import Config

#: Every config key by what changing it on ``cmd-dist train --resume RUN key=value`` does to the run (a section
#: name covers its keys; the longest listed prefix wins; every top-level key is listed, a test checks it):
#: ``training``: what trains (model, data, noise, method, optimiser, schedule, epochs, seed): refused unless
#: ``--allow-changes``, which records the change and the epoch it took effect in the run folder;
#: ``free``: where and how fast it runs, what is kept, printed or compared: allowed, config.yaml takes it;
#: ``fixed``: the run folder itself, which --resume names: refused.
RESUME_KEYS: dict[str, str] = {
    "data": "training",  # the images, their split, size, classes and augmentation (data.root: the files read)
    "data.workers": "free",  # loader processes: any number gives the same batches and pixels (cmd_dist.data.streamed)
    "noise": "training",
    "method": "training",
    "train": "training",  # optimiser, lr schedule, batch, precision (fast_path: bf16); epochs also set chi (Eq. 12)
    "train.eval_batch_size": "free",  # evaluation in other batch sizes: the same accuracies
    "train.log_every": "free",  # how often the loss is printed and checked
    "train.checkpoint_every": "free",  # when checkpoints are written
    "train.compile_mode": "free",  # the same step, compiled differently
    "train.cuda_graph": "free",  # the same step, captured as a graph or not
    "peers": "training",  # architectures, names, starting weights
    "ray": "free",  # where the workers run, how many restarts, checkpoints kept (keep_checkpoints), address
    "ray.replicas_per_peer": "training",  # each replica's BatchNorm sees its slice of the batch
    "ray.sync_batchnorm": "training",  # BatchNorm statistics over all replicas or per replica
    "paper": "free",  # the paper's number the report draws beside the run
    "seed": "training",
    "output_dir": "fixed",
    "run_name": "fixed",
}


def resume_key_kind(key: str) -> str:
    """``training``, ``free`` or ``fixed`` for a dotted config key (``peers.0.arch``), by :data:`RESUME_KEYS`."""
    parts = [p for p in key.split(".") if not p.isdigit()]
    for n in range(len(parts), 0, -1):
        kind = RESUME_KEYS.get(".".join(parts[:n]))
        if kind is not None:
            return kind
    return "training"  # a key nobody classified: the safe side


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):  # peers
        out = {prefix.rstrip("."): len(tree)}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): tree}


def config_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ, dotted (``train.lr``, ``peers.1.arch``; ``peers``: the number of peers)."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in [*a, *[k for k in b if k not in a]] if a.get(k) != b.get(k)}
