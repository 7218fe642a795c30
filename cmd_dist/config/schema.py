"""The run configuration's sections as dataclasses: every key, its type, its default and what it means.

A key with a fixed set of values is a ``Literal``: :func:`cmd_dist.config.load.from_dict` refuses any other value
(one line naming the key and the values allowed), and reads a YAML boolean given to a tri-state (``auto`` /
``true`` / ``false``) as ``"true"`` / ``"false"``, so ``cuda_graph: true`` and ``cuda_graph: "true"`` are the same.
The checks that involve more than one key are in :mod:`cmd_dist.config.checks`, one function per section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from cmd_dist.data.types import DatasetName

#: ``auto`` decides from the hardware the worker gets; ``true`` / ``false`` force it.
TriState = Literal["auto", "true", "false"]
TRI_STATE: tuple[str, ...] = get_args(TriState)
SplitProtocol = Literal["search", "final"]
ProgressUnit = Literal["epoch", "iteration"]
CompileMode = Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "none"]
Placement = Literal["auto", "separate", "together"]
DecodeMode = Literal["auto", "cpu", "cuda"]
FoodTrainSet = Literal["food101n", "food101"]
WebVisionSource = Literal["google", "flickr"]


@dataclass
class DataConfig:
    dataset: DatasetName = "digits"
    #: Folder holding ``cifar-100-python/`` or ``cifar-10-batches-py/`` (ignored for digits).
    root: str = "data"
    #: ``search``: 90% noisy train / 10% clean validation; ``final``: all train data, report test.
    protocol: SplitProtocol = "final"
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
    webvision_sources: list[WebVisionSource] = field(default_factory=lambda: ["google"])
    #: Streamed datasets: decoding/augmenting processes per training worker; null = usable CPUs - 1 (1..8).
    workers: int | None = None
    #: Streamed datasets: where JPEGs are decoded and cut. ``auto``: on the worker's GPU (nvJPEG, batched crops)
    #: when it trains on CUDA, else ``cpu`` (the loader processes); ``cuda`` insists on the GPU.
    decode: DecodeMode = "auto"
    #: food101n: ``food101n`` (the 310k Food-101N web images) or ``food101`` (Food-101's 75,750 training
    #: images, the CMD paper's appendix A.1 setting); both are tested on Food-101's test set.
    food_train: FoodTrainSet = "food101n"


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
    progress_unit: ProgressUnit = "iteration"
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
    fast_path: TriState = "auto"
    #: torch.compile of the peers' forward on the fast path: ``auto`` = none when the whole step is a
    #: CUDA graph (``cuda_graph``), else ``reduce-overhead`` (one graph step for all local peers).
    compile_mode: CompileMode = "auto"
    #: Capture the whole multi-peer step (forwards, CMD loss, backward, optimizer steps) as one CUDA
    #: graph: ``auto`` = on for CUDA workers that host every peer (no cross-process exchange).
    cuda_graph: TriState = "auto"
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
    placement: Placement = "auto"
    #: ``auto`` uses one GPU per worker when the cluster has them; ``true`` / ``false`` force it.
    use_gpu: TriState = "auto"
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
    sync_batchnorm: TriState = "auto"


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
