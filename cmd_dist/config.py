"""Typed run configuration: defaults in code, one YAML per experiment, ``key=value`` overrides.

Every user mistake raises :class:`ConfigError` with a one-line message that names the key, the bad
value and what is allowed; the CLI prints it and exits with code 2 before Ray starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cmd_dist.data.human_labels import LABEL_SETS
from cmd_dist.data.noise import LABEL_NOISE_KINDS
from cmd_dist.errors import ConfigError
from cmd_dist.method.objectives import OBJECTIVES
from cmd_dist.method.selection import KNOWLEDGE_MODES
from cmd_dist.method.selfkd import SELF_KD_METHODS

DATASETS = ("cifar100", "cifar10", "digits", "webvision", "food101n", "imagefolder")
#: Streamed from disk (cmd_dist.data.streamed); the others are loaded into device memory.
STREAMED_DATASETS = ("webvision", "food101n", "imagefolder")
#: Datasets whose labels carry real noise: no synthetic noise on top.
REAL_NOISE_DATASETS = ("webvision", "food101n")
IN_MEMORY_SIZES = {"cifar100": 32, "cifar10": 32, "digits": 8}
PROTOCOLS = ("search", "final")
ARCHS = ("resnet18", "resnet34", "resnet50", "shufflenetv2", "inception_resnet_v2", "cnn_small", "cnn_small_gn")
#: Smallest input size per architecture (Inception-ResNet-v2's valid convolutions), see models.MIN_INPUT_SIZE.
MIN_INPUT_SIZE = {"inception_resnet_v2": 75}
FOOD_TRAIN_SETS = ("food101n", "food101")
PLACEMENTS = ("auto", "separate", "together")
PROGRESS_UNITS = ("epoch", "iteration")
DECODE_MODES = ("auto", "cpu", "cuda")


@dataclass
class DataConfig:
    dataset: str = "digits"
    #: Folder holding ``cifar-100-python/`` or ``cifar-10-batches-py/`` (ignored for digits).
    root: str = "data"
    #: ``search``: 90% noisy train / 10% clean validation; ``final``: all train data, report test.
    protocol: str = "final"
    val_fraction: float = 0.1
    #: Use only the first N training / test images (0 = all): for smoke tests and CI slices.
    train_subset: int = 0
    test_subset: int = 0
    augment: bool = True
    #: Streamed datasets: side of the square crops fed to the peers (random-resized crop when training,
    #: resize to image_size/0.875 + centre crop when evaluating).
    image_size: int = 224
    #: webvision: train on the first N classes (0 = 50, the "Mini" setting); other datasets: 0 (from the files).
    num_classes: int = 0
    #: webvision: training lists read, ``train_filelist_<source>.txt``: ``[google]`` (the "Mini" setting) or
    #: ``[google, flickr]`` (all of WebVision 1.0).
    webvision_sources: list[str] = field(default_factory=lambda: ["google"])
    #: Streamed datasets: decoding/augmenting processes per training worker; null = usable CPUs - 1 (1..8).
    workers: int | None = None
    #: Streamed datasets: where JPEGs are decoded and cut. ``auto``: on the worker's GPU (nvJPEG, batched crops)
    #: when it trains on CUDA, else ``cpu`` (the loader processes); ``cuda`` insists on the GPU.
    decode: str = "auto"
    #: food101n: ``food101n`` (the 310k Food-101N web images) or ``food101`` (Food-101's 75,750 training
    #: images, the CMD paper's appendix A.1 setting); both are tested on Food-101's test set.
    food_train: str = "food101n"


@dataclass
class NoiseConfig:
    #: ``symmetric`` / ``pairflip`` (synthetic, Sec. 5.1), ``human`` (CIFAR-N) or ``none`` (labels as shipped).
    kind: str = "symmetric"
    rate: float = 0.4
    seed: int = 0
    #: kind=human: CIFAR-10N ``aggre``, ``worst``, ``random1``-``random3``; CIFAR-100N ``noisy_fine``,
    #: ``noisy_coarse`` (the 20 superclasses).
    label_set: str = ""
    #: kind=human: the CIFAR-N file; null = ``<data.root>/cifar-n/CIFAR-10_human.pt`` (or ``CIFAR-100_human.pt``).
    label_file: str | None = None


@dataclass
class MethodConfig:
    #: Table 2 self-KD method producing each peer's refined label.
    self_kd: str = "mconf"
    #: Sec. 4.2 knowledge mode: zero / all / cmd-s / cmd-p.
    knowledge: str = "cmd-p"
    #: ``cmd`` (Eq. 10-11) or a baseline: syncmkd (Eq. 3), asyncmkd (Eq. 2), kdcl, tfkd_reg.
    objective: str = "cmd"
    eta: float = 4.0
    b1: float = 16.0
    b2: float = -8.0
    rho: float = 0.5
    #: Fixed trust of LS / CP / Boot-soft (Table 2); null = the method's default (LS 0.1, CP 0.1, Boot-soft 0.05).
    epsilon: float | None = None
    #: t/Gamma of ProSelfLC's g(t) (Eq. 5) counted in iterations (the authors' ProSelfLC experiments)
    #: or epochs.
    progress_unit: str = "iteration"
    #: Own refined label keeps the gradient of the peer's own prediction (authors' ProSelfLC code):
    #: loss (1-eps) H(q,p) + eps H(p). ``false`` detaches it (ablation: (1-eps) CE). See docs/method.md.
    target_grad: bool = True
    #: A peer's refined label q~_j sends gradient into peer j through the p_j inside it when another
    #: peer distils it (appendix C detaches nothing). ``false`` makes peers' labels constants.
    peer_target_grad: bool = True
    #: Weight of the KD term in the baselines (eps of Eq. 1-3, KDCL, Tf-KD_reg).
    kd_weight: float = 0.5


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: Step schedule: lr * gamma at each milestone epoch (ResNet-34: [50, 80], 0.1).
    milestones: list[int] = field(default_factory=lambda: [50, 80])
    gamma: float = 0.1
    eval_batch_size: int = 1024
    #: Print the loss and check it every N steps (a host sync; 0 = only at epoch end).
    log_every: int = 50
    #: GPU fast path: bf16 autocast, channels_last and torch.compile of each peer's network.
    #: ``auto`` = on when the worker has a CUDA device, ``true`` / ``false`` force it.
    fast_path: str = "auto"
    #: torch.compile of the peers' forward on the fast path: ``auto`` = none when the whole step is a
    #: CUDA graph (``cuda_graph``), else ``reduce-overhead`` (one graph step for all local peers).
    compile_mode: str = "auto"
    #: Capture the whole multi-peer step (forwards, CMD loss, backward, optimizer steps) as one CUDA
    #: graph: ``auto`` = on for CUDA workers that host every peer (no cross-process exchange).
    cuda_graph: str = "auto"
    #: Write a checkpoint every N epochs (and after the last); the best-eval weights are kept in
    #: memory and written with the next checkpoint.
    checkpoint_every: int = 1


@dataclass
class PeerConfig:
    arch: str = "cnn_small"
    name: str = ""
    #: Local weights file to start from (torch.load weights_only=True, or .safetensors); the classifier
    #: is kept fresh when its class count differs (e.g. ImageNet weights for Food-101N).
    weights: str | None = None


@dataclass
class RayConfig:
    #: Ray cluster address (also RAY_ADDRESS); null starts a local Ray (the embedded default).
    address: str | None = None
    #: ``separate``: one Ray Train worker per peer; ``together``: all peers in one worker; ``auto``:
    #: separate unless the cluster has GPUs but fewer than peers, then the peers share the GPUs that exist
    #: as few workers as GPUs (one GPU: ``together``, the whole multi-peer step as one CUDA graph; measured
    #: faster than fractional-GPU workers exchanging through gloo, see the README's Performance section).
    placement: str = "auto"
    #: ``auto`` uses one GPU per worker when the cluster has them; ``true`` / ``false`` force it.
    use_gpu: str = "auto"
    cpus_per_worker: float = 1.0
    #: GPUs per worker when GPUs are used; below 1 lets peers' workers share a GPU (then gloo, since
    #: NCCL cannot run two ranks on one device).
    gpus_per_worker: float = 1.0
    #: Worker-group restarts from the last checkpoint after a worker dies (Ray FailureConfig).
    max_failures: int = 3
    #: Checkpoints kept (the latest N) besides the best by validation accuracy.
    keep_checkpoints: int = 2
    #: Put every worker on a different node (Ray's STRICT_SPREAD placement); false packs them (PACK).
    spread: bool = False
    #: Data-parallel replicas of every peer (a peer larger than one GPU): each peer's worker becomes R
    #: workers that average gradients with DDP, each replica takes its slice of the global batch
    #: (``train.batch_size``) and exchanges knowledge with the other peers' replicas of the same slice.
    replicas_per_peer: int = 1
    #: BatchNorm across a peer's replicas: ``auto`` = SyncBatchNorm on GPU when replicas_per_peer > 1,
    #: plain per-replica BatchNorm on CPU (torch's SyncBatchNorm needs a GPU); ``true`` / ``false`` force it.
    sync_batchnorm: str = "auto"


@dataclass
class PaperConfig:
    """The paper's result this config reproduces (``cmd-dist report`` draws it beside the run's curve)."""

    #: Where the paper reports it, e.g. ``Table 1``; empty = not a paper setting.
    table: str = ""
    #: The paper's final test accuracy in % (mean of the peers), or null when it states none.
    value: float | None = None
    #: Per-peer numbers, in the order of ``peers``, where the paper reports each network (Table 6).
    peers: list[float] = field(default_factory=list)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peers: list[PeerConfig] = field(default_factory=lambda: [PeerConfig(), PeerConfig()])
    ray: RayConfig = field(default_factory=RayConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)
    seed: int = 0
    output_dir: str = "runs"
    #: Run folder name under output_dir; empty = a time stamp. A finished or interrupted run with
    #: the same name resumes.
    run_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- what a resume may change

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


# ----------------------------------------------------------------------------- parsing

_FLOAT_RE = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|\.?inf)$", re.IGNORECASE)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads 1e-3 and 5e-4 (no dot) and inf as strings; they are numbers here.
            if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
                return float(value.strip().lower().replace(".inf", "inf"))
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool) and key.endswith(("use_gpu", "fast_path", "cuda_graph", "sync_batchnorm")):
            return "true" if value else "false"
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            allowed = ", ".join(prefix + n for n in names)
            raise ConfigError(f"unknown config key {prefix + str(key)!r}; allowed: {allowed}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])} has no item {part!r}")
            node = node[int(part)]
        else:
            if part not in node or not isinstance(node[part], (dict, list)):
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} in override {dotted!r}")
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {dotted!r}: no item {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line naming the line and column of a YAML syntax error and what is wrong there."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``key=value`` strings to (key, value) pairs; values are parsed as YAML (``peers=[{arch: x}]``)."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. method.eta=3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    return pairs


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file < overrides, then validation. Raises ConfigError on any mistake."""
    tree = Config().to_dict()
    loaded: dict[str, Any] = {}
    if path is not None:
        shown, text = _config_text(path)
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {shown!r} is not valid YAML: {yaml_problem(e)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {shown!r} must hold a mapping of keys")
        tree = _merge(tree, loaded)
    parsed = parse_overrides(overrides or [])
    for key, value in parsed:
        _set_path(tree, key, value)
    cfg = from_dict(tree)
    _check_rate_used(
        cfg, tree["noise"].get("rate"), _noise_layer(loaded, parsed, "rate"), _noise_layer(loaded, parsed, "kind")
    )
    return cfg


def _config_text(path: str | Path) -> tuple[str, str]:
    """(the name to show, the text) of a config file: a local file, or a filesystem URI (e.g. a search's
    ``s3://bucket/runs/tune-.../best.yaml``, read through pyarrow)."""
    if "://" in str(path):
        from cmd_dist.runs.fs import Remote, open_filesystem, split_location

        uri = str(path)
        parent, name = split_location(uri)
        fs, root = open_filesystem(parent, key=f"config file {uri!r}")
        try:
            data = Remote(fs, root, parent).read_bytes(name)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"config file {uri!r}: cannot read it ({first})") from None
        if data is None:
            raise ConfigError(f"config file {uri!r} not found")
        return uri, data.decode(errors="replace")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    return str(p), p.read_text()


def from_dict(tree: dict[str, Any]) -> Config:
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def validate(cfg: Config) -> None:
    """Semantic checks: every bad value names its key and what is allowed."""
    d, m, t = cfg.data, cfg.method, cfg.train
    _choice("data.dataset", d.dataset, DATASETS)
    _choice("data.protocol", d.protocol, PROTOCOLS)
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: {d.val_fraction} must be in (0, 1)")
    for key in ("train_subset", "test_subset"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key}: {getattr(d, key)} must be >= 0 (0 = all)")
    _validate_data(cfg)
    _choice("method.self_kd", m.self_kd, SELF_KD_METHODS)
    _choice("method.knowledge", m.knowledge, KNOWLEDGE_MODES)
    _choice("method.objective", m.objective, OBJECTIVES)
    _choice("method.progress_unit", m.progress_unit, PROGRESS_UNITS)
    if m.eta == 0 or math.isnan(m.eta):
        raise ConfigError(
            f"method.eta: {m.eta} is not allowed (chi = H(u)/eta); use eta=inf or knowledge=zero for no knowledge"
        )
    if m.knowledge == "cmd-s" and m.b2 != 0:
        raise ConfigError(f"method.b2: {m.b2} must be 0 with method.knowledge=cmd-s (static chi); use knowledge=cmd-p")
    if m.knowledge == "cmd-p" and m.b2 == 0:
        raise ConfigError("method.b2: 0 makes chi static; use a non-zero b2 with cmd-p, or knowledge=cmd-s")
    if m.epsilon is not None and not 0.0 <= m.epsilon <= 1.0:
        raise ConfigError(f"method.epsilon: {m.epsilon} must be in [0, 1]")
    if not 0.0 <= m.kd_weight <= 1.0:
        raise ConfigError(f"method.kd_weight: {m.kd_weight} must be in [0, 1]")
    if t.epochs <= 0:
        raise ConfigError(f"train.epochs: {t.epochs} must be > 0")
    if t.batch_size <= 0:
        raise ConfigError(f"train.batch_size: {t.batch_size} must be > 0")
    if t.eval_batch_size <= 0:
        raise ConfigError(f"train.eval_batch_size: {t.eval_batch_size} must be > 0")
    if not t.lr > 0:
        raise ConfigError(f"train.lr: {t.lr} must be > 0")
    _choice("train.fast_path", str(t.fast_path).lower(), ("auto", "true", "false"))
    _choice(
        "train.compile_mode",
        t.compile_mode,
        ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "none"),
    )
    _choice("train.cuda_graph", str(t.cuda_graph).lower(), ("auto", "true", "false"))
    if str(t.cuda_graph).lower() == "true" and t.compile_mode in ("reduce-overhead", "max-autotune"):
        raise ConfigError(
            f"train.compile_mode: {t.compile_mode!r} captures its own CUDA graphs inside the whole-step graph of "
            f"train.cuda_graph=true; use compile_mode=none, default or max-autotune-no-cudagraphs"
        )
    if t.checkpoint_every < 1:
        raise ConfigError(f"train.checkpoint_every: {t.checkpoint_every} must be >= 1 (epochs)")
    if sorted(t.milestones) != t.milestones or any(x <= 0 for x in t.milestones):
        raise ConfigError(f"train.milestones: {t.milestones} must be increasing positive epochs")
    if len(cfg.peers) < 2 and m.objective != "tfkd_reg" and m.knowledge != "zero":
        raise ConfigError(f"peers: {len(cfg.peers)} peer(s) given; mutual distillation needs at least 2")
    if len(cfg.peers) < 1:
        raise ConfigError("peers: at least one peer is needed")
    size = d.image_size if d.dataset in STREAMED_DATASETS else IN_MEMORY_SIZES[d.dataset]
    for i, peer in enumerate(cfg.peers):
        _choice(f"peers[{i}].arch", peer.arch, ARCHS)
        if size < MIN_INPUT_SIZE.get(peer.arch, 0):
            fix = "data.image_size" if d.dataset in STREAMED_DATASETS else "a streamed dataset"
            raise ConfigError(
                f"peers[{i}].arch: {peer.arch} needs inputs of at least {MIN_INPUT_SIZE[peer.arch]} pixels, "
                f"{d.dataset} gives {size}; use {fix} >= {MIN_INPUT_SIZE[peer.arch]} or another arch"
            )
        if peer.arch == "inception_resnet_v2" and importlib.util.find_spec("timm") is None:
            raise ConfigError(f"peers[{i}].arch: inception_resnet_v2 needs the timm package (pip install timm)")
        if peer.weights is not None and not peer.weights.strip():
            raise ConfigError(f"peers[{i}].weights: empty path; give a local weights file or null")
        if not peer.name:
            peer.name = f"peer{i}"
    names = [p.name for p in cfg.peers]
    if len(set(names)) != len(names):
        raise ConfigError(f"peers: names must be unique, got {names}")
    _choice("ray.placement", cfg.ray.placement, PLACEMENTS)
    _choice("ray.use_gpu", str(cfg.ray.use_gpu).lower(), ("auto", "true", "false"))
    if cfg.ray.cpus_per_worker <= 0:
        raise ConfigError(f"ray.cpus_per_worker: {cfg.ray.cpus_per_worker} must be > 0")
    if not 0 < cfg.ray.gpus_per_worker <= 1:
        raise ConfigError(f"ray.gpus_per_worker: {cfg.ray.gpus_per_worker} must be in (0, 1]")
    if cfg.ray.max_failures < 0:
        raise ConfigError(f"ray.max_failures: {cfg.ray.max_failures} must be >= 0")
    if cfg.ray.spread and cfg.ray.placement == "together":
        raise ConfigError("ray.spread: true needs ray.placement=separate or auto (one worker per peer, one node each)")
    if cfg.ray.keep_checkpoints < 1:
        raise ConfigError(f"ray.keep_checkpoints: {cfg.ray.keep_checkpoints} must be >= 1")
    if cfg.ray.replicas_per_peer < 1:
        raise ConfigError(f"ray.replicas_per_peer: {cfg.ray.replicas_per_peer} must be >= 1")
    _choice("ray.sync_batchnorm", str(cfg.ray.sync_batchnorm).lower(), ("auto", "true", "false"))
    if str(cfg.ray.sync_batchnorm).lower() == "true" and str(cfg.ray.use_gpu).lower() == "false":
        raise ConfigError(
            "ray.sync_batchnorm: true needs GPUs (torch's SyncBatchNorm runs on CUDA only); use "
            "ray.sync_batchnorm=auto or a model without BatchNorm (e.g. cnn_small_gn)"
        )
    if cfg.ray.replicas_per_peer > 1:
        if cfg.method.objective == "asyncmkd":
            raise ConfigError(
                "ray.replicas_per_peer: asyncmkd steps one peer per iteration, which DDP replicas cannot follow; "
                "use ray.replicas_per_peer=1 or another method.objective"
            )
        if cfg.train.batch_size < cfg.ray.replicas_per_peer:
            raise ConfigError(
                f"ray.replicas_per_peer: {cfg.ray.replicas_per_peer} replicas cannot share a global batch of "
                f"train.batch_size={cfg.train.batch_size}; use a batch of at least one sample per replica"
            )
    paper = cfg.paper
    if paper.value is not None and not 0.0 <= paper.value <= 100.0:
        raise ConfigError(f"paper.value: {paper.value} must be an accuracy in % (0 to 100), or null")
    if paper.peers and len(paper.peers) != len(cfg.peers):
        raise ConfigError(f"paper.peers: {len(paper.peers)} numbers for {len(cfg.peers)} peers; give one per peer")
    if any(not 0.0 <= v <= 100.0 for v in paper.peers):
        raise ConfigError(f"paper.peers: {paper.peers} must be accuracies in % (0 to 100)")
    if (paper.value is not None or paper.peers) and not paper.table.strip():
        raise ConfigError("paper.table: name where the paper reports these numbers, e.g. 'Table 1'")
    if "://" in cfg.output_dir:
        from cmd_dist.runs.fs import check_uri  # its form only; opening it (credentials) is the launcher's

        check_uri(cfg.output_dir, "output_dir")
    if "/" in cfg.run_name or cfg.run_name in (".", ".."):
        raise ConfigError(f"run_name: {cfg.run_name!r} must be a plain folder name")


#: Noise kinds that add no synthetic noise: their noise rate is measured (summary.json's noise_rate), not set.
UNSET_RATE_KINDS = ("human", "none")


def _noise_layer(loaded: dict[str, Any], parsed: list[tuple[str, Any]], key: str) -> int:
    """The last layer that set ``noise.<key>``: 0 the defaults, 1 the config file, 2 an override."""
    if any(k == f"noise.{key}" for k, _ in parsed):
        return 2
    noise = loaded.get("noise")
    if key == "rate" and isinstance(noise, dict) and set(noise) >= {f.name for f in dataclasses.fields(NoiseConfig)}:
        return 0  # a resolved config.yaml (every noise key), e.g. an older run's with kind human and rate 0.4
    return 1 if isinstance(noise, dict) and key in noise else 0


def _check_rate_used(cfg: Config, rate: Any, rate_layer: int, kind_layer: int) -> None:
    """``noise.rate`` given with (or after) a ``noise.kind`` that adds no synthetic noise: an error (a CIFAR-N
    label set fixes its own rate). A rate from an earlier layer (``demo.yaml``'s 0.4, then ``noise.kind=none``)
    is dropped, and 0 is accepted, as resolved configs write it."""
    if rate_layer and rate_layer >= kind_layer and cfg.noise.kind in UNSET_RATE_KINDS and rate != 0:
        raise ConfigError(
            f"noise.rate: {rate} is not used with noise.kind={cfg.noise.kind} (no synthetic noise: the realised "
            f"rate is measured and written to summary.json); remove noise.rate"
        )


def _validate_data(cfg: Config) -> None:
    """Dataset-dependent keys: streamed-data settings, the noise kind each dataset allows, CIFAR-N label sets."""
    d, n = cfg.data, cfg.noise
    _choice("noise.kind", n.kind, LABEL_NOISE_KINDS)
    if not 0.0 <= n.rate < 1.0:
        raise ConfigError(f"noise.rate: {n.rate} must be in [0, 1)")
    if n.kind in UNSET_RATE_KINDS:
        n.rate = 0.0  # no synthetic noise; a resolved config.yaml says so instead of the unused default 0.4
    if n.kind == "human":
        if d.dataset not in LABEL_SETS:
            raise ConfigError(
                f"noise.kind: human (CIFAR-N) exists for cifar10 and cifar100, not data.dataset={d.dataset}"
            )
        sets = tuple(LABEL_SETS[d.dataset])
        if not n.label_set:
            raise ConfigError(f"noise.label_set: required with noise.kind=human; one of {', '.join(sets)}")
        _choice("noise.label_set", n.label_set, sets)
    elif n.label_set or n.label_file:
        key = "noise.label_set" if n.label_set else "noise.label_file"
        raise ConfigError(f"{key}: only used with noise.kind=human (CIFAR-N); remove it or set noise.kind=human")
    if d.dataset in REAL_NOISE_DATASETS and n.kind != "none":
        raise ConfigError(
            f"noise.kind: {n.kind} would add synthetic noise to {d.dataset}'s real label noise; use noise.kind=none"
        )
    if d.image_size < 32 or d.image_size > 1024:
        raise ConfigError(f"data.image_size: {d.image_size} must be in [32, 1024]")
    if d.dataset == "webvision":
        if not 0 <= d.num_classes <= 1000:
            raise ConfigError(f"data.num_classes: {d.num_classes} must be in [1, 1000] for webvision (0 = 50)")
    elif d.num_classes:
        raise ConfigError(
            f"data.num_classes: {d.num_classes} applies to webvision only; {d.dataset} takes its classes from its "
            f"files (use 0)"
        )
    if d.workers is not None and d.workers < 0:
        raise ConfigError(f"data.workers: {d.workers} must be >= 0 (0 = decode in the training process) or null")
    _choice("data.decode", d.decode, DECODE_MODES)
    if d.decode == "cuda" and d.dataset not in STREAMED_DATASETS:
        raise ConfigError(
            f"data.decode: cuda applies to streamed datasets; {d.dataset} is held in memory (use data.decode=auto)"
        )
    if d.decode == "cuda" and str(cfg.ray.use_gpu).lower() == "false":
        raise ConfigError(
            "data.decode: cuda decodes on the workers' GPUs, but ray.use_gpu=false; use data.decode=auto or cpu"
        )
    _choice("data.food_train", d.food_train, FOOD_TRAIN_SETS)
    if not d.webvision_sources or len(set(d.webvision_sources)) != len(d.webvision_sources):
        raise ConfigError(f"data.webvision_sources: {d.webvision_sources} must list google and/or flickr once each")
    for source in d.webvision_sources:
        _choice("data.webvision_sources", source, ("google", "flickr"))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
