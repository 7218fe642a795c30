"""Peer architectures, chosen by name per peer (paper Sec. 5, Tables 1-6 and Table 4).

On small images (below 64 pixels: CIFAR, digits) the ResNets are torchvision's ResNets with the
CIFAR stem (3x3 conv, stride 1, no max-pool; He et al. 2016), the form the paper's reference
timings use; ShuffleNetV2 is torchvision's x1.0 network with the same stem change (as in Tf-KD's
CIFAR code). On ImageNet-sized images (streamed datasets) they keep the ImageNet stem (7x7 conv,
stride 2, max-pool), so ImageNet weights load unchanged: Food-101N's ResNet-50 (Table 4).
``inception_resnet_v2`` (Szegedy et al. 2017; mini-WebVision in Table 4) is timm's implementation,
whose parameter names match the published ImageNet weights. ``cnn_small`` is a small CNN for digits
and CPU smoke runs; ``cnn_small_gn`` the same with GroupNorm (batch-independent, for replicas on CPU).

``peers[k].weights`` starts a peer from a local weights file (``torch.load(weights_only=True)`` or
safetensors); a classifier of another class count is left freshly initialised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from cmd_dist.errors import ConfigError, first_line

#: Below this input size the CIFAR stem is used (a 7x7/2 conv + max-pool would leave 8x8 -> 2x2).
IMAGENET_STEM_MIN_SIZE = 64


class WeightsError(ValueError):
    """A peer weights file that cannot be used (one-line message naming the key and the file)."""


def _cifar_resnet(builder, num_classes: int, in_channels: int) -> nn.Module:
    net = builder(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def _cifar_shufflenetv2(num_classes: int, in_channels: int) -> nn.Module:
    net = tvm.shufflenet_v2_x1_0(num_classes=num_classes)
    out = net.conv1[0].out_channels
    net.conv1[0] = nn.Conv2d(in_channels, out, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; ~27 k parameters at width 16. Works for any input size >= 8.

    ``norm="group"`` (arch ``cnn_small_gn``) uses GroupNorm, which normalises each sample on its own:
    the network's output then does not depend on how a batch is split, so data-parallel replicas on CPU
    (where torch has no SyncBatchNorm) train exactly like one worker with the whole batch.
    """

    def __init__(self, num_classes: int, in_channels: int, width: int = 16, norm: str = "batch") -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            layer = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(min(8, cout), cout)
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), layer, nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(in_channels, width),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _imagenet_resnet(builder, num_classes: int, in_channels: int) -> nn.Module:
    net = builder(num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def _inception_resnet_v2(num_classes: int, in_channels: int) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError("inception_resnet_v2 needs the timm package: pip install timm") from None
    return timm.create_model("inception_resnet_v2", pretrained=False, num_classes=num_classes, in_chans=in_channels)


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """A freshly initialised peer network by name (seed the global RNG first for reproducibility).

    ``image_size`` picks the ResNet/ShuffleNet stem: CIFAR's below 64 pixels, ImageNet's from 64 on.
    """
    small = image_size < IMAGENET_STEM_MIN_SIZE
    resnets = {"resnet18": tvm.resnet18, "resnet34": tvm.resnet34, "resnet50": tvm.resnet50}
    if arch in resnets:
        if small:
            return _cifar_resnet(resnets[arch], num_classes, in_channels)
        return _imagenet_resnet(resnets[arch], num_classes, in_channels)
    if arch == "shufflenetv2":
        if small:
            return _cifar_shufflenetv2(num_classes, in_channels)
        net = tvm.shufflenet_v2_x1_0(num_classes=num_classes)
        if in_channels != 3:
            net.conv1[0] = nn.Conv2d(in_channels, net.conv1[0].out_channels, 3, stride=2, padding=1, bias=False)
        return net
    if arch == "inception_resnet_v2":
        return _inception_resnet_v2(num_classes, in_channels)
    if arch == "cnn_small":
        return SmallCNN(num_classes, in_channels)
    if arch == "cnn_small_gn":
        return SmallCNN(num_classes, in_channels, norm="group")
    raise ValueError(
        f"unknown architecture {arch!r}; choose resnet18, resnet34, resnet50, shufflenetv2, inception_resnet_v2, "
        f"cnn_small or cnn_small_gn"
    )


def _classifier_names(model: nn.Module) -> set[str]:
    """Parameter names of the final classifier (the last nn.Linear), which may differ in class count."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return {f"{last}.weight", f"{last}.bias"} if last is not None else set()


def read_weights_file(path: str | Path, key: str = "weights") -> dict[str, torch.Tensor]:
    """A state dict from a local file: ``torch.load(weights_only=True)`` (plain or wrapped) or safetensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{key}: weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - refused pickles, truncated files, other formats
        raise WeightsError(
            f"{key}: {path} is not a weights file that torch.load(weights_only=True) can read ({first_line(e)[:120]})"
        ) from None
    if isinstance(obj, dict):  # checkpoints wrap the state dict: ours ("model"), timm/torchvision ("state_dict")
        for wrapper in ("model", "state_dict", "model_state_dict", "net"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{key}: {path} does not hold a state dict of tensors")
    out = {}
    for name, tensor in obj.items():
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
            if name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = tensor
    return out


def load_weights(model: nn.Module, path: str | Path, key: str = "weights") -> str:
    """Load a weights file into ``model``; every tensor must fit except the classifier (another class count).

    Returns a one-line note of what was loaded; raises WeightsError naming the key otherwise.
    """
    state = read_weights_file(path, key)
    own = model.state_dict()
    head = _classifier_names(model)
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked") and k not in head]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or missing or [k for k in wrong if k not in head]:
        detail = (
            f"{len(missing)} tensors missing (e.g. {missing[0]})"
            if missing
            else f"{len(unexpected)} unknown tensors (e.g. {unexpected[0]})"
            if unexpected
            else f"shape mismatch at {[k for k in wrong if k not in head][0]}"
        )
        raise WeightsError(f"{key}: {path} does not fit this architecture: {detail}")
    kept = {k: v for k, v in state.items() if k in own and k not in wrong}
    model.load_state_dict(kept, strict=False)
    note = f"loaded {len(kept)} tensors from {path}"
    if wrong:
        note += f"; kept a fresh classifier ({', '.join(sorted(wrong))}: another class count)"
    return note


def check_peer_weights(cfg) -> None:
    """Preflight: every ``peers[k].weights`` file loads into its architecture (ConfigError otherwise)."""
    from cmd_dist.data.labels import dataset_spec
    from cmd_dist.data.types import STREAMED

    for k, peer in enumerate(cfg.peers):
        if not peer.weights:
            continue
        if cfg.data.dataset in STREAMED:
            num_classes, channels, size = 0, 3, cfg.data.image_size
        else:
            spec = dataset_spec(cfg.data, cfg.noise)
            num_classes, channels, size = spec.num_classes, spec.channels, spec.size
        if not num_classes:
            from cmd_dist.data.streamed import build_streamed

            num_classes = build_streamed(cfg.data, cfg.noise, workers=0).spec.num_classes
        try:
            load_weights(build_model(peer.arch, num_classes, channels, size), peer.weights, f"peers[{k}].weights")
        except WeightsError as e:
            raise ConfigError(str(e)) from None
