"""Semantic checks of a built :class:`~cmd_dist.config.schema.Config`, one function per section: every bad value
raises :class:`ConfigError` naming its key and what is allowed. The values of a ``Literal`` key were checked when
the config was built (:mod:`cmd_dist.config.load`); what is left here are ranges, names that other layers
register (self-KD methods, objectives, noise kinds, architectures) and the rules that tie keys together.
"""

from __future__ import annotations

import importlib.util
import math

from cmd_dist.config.schema import Config, DataConfig, MethodConfig, PaperConfig, RayConfig, TrainConfig
from cmd_dist.data.human_labels import LABEL_SETS
from cmd_dist.data.noise import LABEL_NOISE_KINDS
from cmd_dist.data.types import REAL_NOISE_DATASETS, SPECS, STREAMED
from cmd_dist.errors import ConfigError
from cmd_dist.method.objectives import OBJECTIVES
from cmd_dist.method.selection import KNOWLEDGE_MODES
from cmd_dist.method.selfkd import SELF_KD_METHODS

ARCHS = ("resnet18", "resnet34", "resnet50", "shufflenetv2", "inception_resnet_v2", "cnn_small", "cnn_small_gn")
#: Smallest input size per architecture (Inception-ResNet-v2's valid convolutions).
MIN_INPUT_SIZE = {"inception_resnet_v2": 75}
#: Noise kinds that add no synthetic noise: their noise rate is measured (summary.json's noise_rate), not set.
UNSET_RATE_KINDS = ("human", "none")
#: Compile modes that capture CUDA graphs of their own (not inside the whole-step graph of cuda_graph=true).
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def validate(cfg: Config) -> None:
    """Every section's checks, in the order of the sections (fills ``peers[k].name`` and zeroes an unused
    ``noise.rate``, as resolved configs write them)."""
    check_data(cfg.data)
    check_noise(cfg)
    check_streamed(cfg)
    check_method(cfg.method)
    check_train(cfg.train)
    check_peers(cfg)
    check_ray(cfg.ray)
    check_replicas(cfg)
    check_paper(cfg.paper, len(cfg.peers))
    check_output(cfg)


def check_data(d: DataConfig) -> None:
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: {d.val_fraction} must be in (0, 1)")
    for key in ("train_subset", "test_subset"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key}: {getattr(d, key)} must be >= 0 (0 = all)")
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
    if not d.webvision_sources or len(set(d.webvision_sources)) != len(d.webvision_sources):
        raise ConfigError(f"data.webvision_sources: {d.webvision_sources} must list google and/or flickr once each")


def check_noise(cfg: Config) -> None:
    """The noise kind each dataset allows, CIFAR-N label sets."""
    d, n = cfg.data, cfg.noise
    choice("noise.kind", n.kind, LABEL_NOISE_KINDS)
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
        choice("noise.label_set", n.label_set, sets)
    elif n.label_set or n.label_file:
        key = "noise.label_set" if n.label_set else "noise.label_file"
        raise ConfigError(f"{key}: only used with noise.kind=human (CIFAR-N); remove it or set noise.kind=human")
    if d.dataset in REAL_NOISE_DATASETS and n.kind != "none":
        raise ConfigError(
            f"noise.kind: {n.kind} would add synthetic noise to {d.dataset}'s real label noise; use noise.kind=none"
        )


def check_streamed(cfg: Config) -> None:
    """GPU decoding: a streamed dataset and workers that have GPUs."""
    d = cfg.data
    if d.decode == "cuda" and d.dataset not in STREAMED:
        raise ConfigError(
            f"data.decode: cuda applies to streamed datasets; {d.dataset} is held in memory (use data.decode=auto)"
        )
    if d.decode == "cuda" and cfg.ray.use_gpu == "false":
        raise ConfigError(
            "data.decode: cuda decodes on the workers' GPUs, but ray.use_gpu=false; use data.decode=auto or cpu"
        )


def check_method(m: MethodConfig) -> None:
    choice("method.self_kd", m.self_kd, SELF_KD_METHODS)
    choice("method.knowledge", m.knowledge, KNOWLEDGE_MODES)
    choice("method.objective", m.objective, OBJECTIVES)
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


def check_train(t: TrainConfig) -> None:
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}: {getattr(t, key)} must be > 0")
    if not t.lr > 0:
        raise ConfigError(f"train.lr: {t.lr} must be > 0")
    if t.cuda_graph == "true" and t.compile_mode in GRAPH_COMPILE_MODES:
        raise ConfigError(
            f"train.compile_mode: {t.compile_mode!r} captures its own CUDA graphs inside the whole-step graph of "
            f"train.cuda_graph=true; use compile_mode=none, default or max-autotune-no-cudagraphs"
        )
    if t.checkpoint_every < 1:
        raise ConfigError(f"train.checkpoint_every: {t.checkpoint_every} must be >= 1 (epochs)")
    if sorted(t.milestones) != t.milestones or any(x <= 0 for x in t.milestones):
        raise ConfigError(f"train.milestones: {t.milestones} must be increasing positive epochs")


def check_peers(cfg: Config) -> None:
    """Enough peers, known architectures that fit the inputs, unique names (``peer<k>`` where none is given)."""
    d, m = cfg.data, cfg.method
    if len(cfg.peers) < 2 and m.objective != "tfkd_reg" and m.knowledge != "zero":
        raise ConfigError(f"peers: {len(cfg.peers)} peer(s) given; mutual distillation needs at least 2")
    if len(cfg.peers) < 1:
        raise ConfigError("peers: at least one peer is needed")
    streamed = d.dataset in STREAMED
    size = d.image_size if streamed else SPECS[d.dataset].size
    for i, peer in enumerate(cfg.peers):
        choice(f"peers[{i}].arch", peer.arch, ARCHS)
        if size < MIN_INPUT_SIZE.get(peer.arch, 0):
            fix = "data.image_size" if streamed else "a streamed dataset"
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


def check_ray(r: RayConfig) -> None:
    if r.cpus_per_worker <= 0:
        raise ConfigError(f"ray.cpus_per_worker: {r.cpus_per_worker} must be > 0")
    if not 0 < r.gpus_per_worker <= 1:
        raise ConfigError(f"ray.gpus_per_worker: {r.gpus_per_worker} must be in (0, 1]")
    if r.max_failures < 0:
        raise ConfigError(f"ray.max_failures: {r.max_failures} must be >= 0")
    if r.spread and r.placement == "together":
        raise ConfigError("ray.spread: true needs ray.placement=separate or auto (one worker per peer, one node each)")
    if r.keep_checkpoints < 1:
        raise ConfigError(f"ray.keep_checkpoints: {r.keep_checkpoints} must be >= 1")
    if r.replicas_per_peer < 1:
        raise ConfigError(f"ray.replicas_per_peer: {r.replicas_per_peer} must be >= 1")
    if r.sync_batchnorm == "true" and r.use_gpu == "false":
        raise ConfigError(
            "ray.sync_batchnorm: true needs GPUs (torch's SyncBatchNorm runs on CUDA only); use "
            "ray.sync_batchnorm=auto or a model without BatchNorm (e.g. cnn_small_gn)"
        )


def check_replicas(cfg: Config) -> None:
    """Data-parallel replicas of each peer: an objective they can follow, a batch they can share."""
    replicas = cfg.ray.replicas_per_peer
    if replicas <= 1:
        return
    if cfg.method.objective == "asyncmkd":
        raise ConfigError(
            "ray.replicas_per_peer: asyncmkd steps one peer per iteration, which DDP replicas cannot follow; "
            "use ray.replicas_per_peer=1 or another method.objective"
        )
    if cfg.train.batch_size < replicas:
        raise ConfigError(
            f"ray.replicas_per_peer: {replicas} replicas cannot share a global batch of "
            f"train.batch_size={cfg.train.batch_size}; use a batch of at least one sample per replica"
        )


def check_paper(paper: PaperConfig, num_peers: int) -> None:
    if paper.value is not None and not 0.0 <= paper.value <= 100.0:
        raise ConfigError(f"paper.value: {paper.value} must be an accuracy in % (0 to 100), or null")
    if paper.peers and len(paper.peers) != num_peers:
        raise ConfigError(f"paper.peers: {len(paper.peers)} numbers for {num_peers} peers; give one per peer")
    if any(not 0.0 <= v <= 100.0 for v in paper.peers):
        raise ConfigError(f"paper.peers: {paper.peers} must be accuracies in % (0 to 100)")
    if (paper.value is not None or paper.peers) and not paper.table.strip():
        raise ConfigError("paper.table: name where the paper reports these numbers, e.g. 'Table 1'")


def check_output(cfg: Config) -> None:
    if "://" in cfg.output_dir:
        from cmd_dist.runs.fs import check_uri  # its form only; opening it (credentials) is the launcher's

        check_uri(cfg.output_dir, "output_dir")
    if "/" in cfg.run_name or cfg.run_name in (".", ".."):
        raise ConfigError(f"run_name: {cfg.run_name!r} must be a plain folder name")
