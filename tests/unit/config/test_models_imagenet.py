"""ImageNet-scale peers: stems by input size, Inception-ResNet-v2, starting from a local weights file."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from cmd_dist.config import ConfigError, load_config
from cmd_dist.models import WeightsError, build_model, load_weights, read_weights_file


def test_resnet_stem_follows_the_input_size():
    small = build_model("resnet50", 10, 3, image_size=32)
    big = build_model("resnet50", 10, 3, image_size=224)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2) and isinstance(big.maxpool, nn.MaxPool2d)
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    # The ImageNet stem has torchvision's parameter names and shapes: its ImageNet weights fit as they are.
    import torchvision

    ref = torchvision.models.resnet50(num_classes=10).state_dict()
    assert {k: v.shape for k, v in big.state_dict().items()} == {k: v.shape for k, v in ref.items()}
    assert build_model("shufflenetv2", 5, 3, image_size=96)(torch.randn(1, 3, 96, 96)).shape == (1, 5)


def test_inception_resnet_v2_from_timm():
    pytest.importorskip("timm")
    net = build_model("inception_resnet_v2", 7, 3, image_size=299)
    assert sum(p.numel() for p in net.parameters()) > 50e6  # the full network (~54 M parameters)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 75, 75)).shape == (1, 7)  # its smallest input


def _imagenet_like_file(tmp_path, classes=1000):
    """A 1000-class ResNet-18 (ImageNet stem) saved the way torchvision/timm ship weights."""
    torch.manual_seed(0)
    src = build_model("resnet18", classes, 3, image_size=224)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(src.state_dict(), path)
    return src, path


def test_weights_load_everything_but_a_classifier_of_another_class_count(tmp_path):
    src, path = _imagenet_like_file(tmp_path)
    torch.manual_seed(1)
    net = build_model("resnet18", 101, 3, image_size=224)
    fresh_fc = net.fc.weight.detach().clone()
    note = load_weights(net, path, "peers[0].weights")
    assert "fc.weight" in note and "another class count" in note
    assert torch.equal(net.conv1.weight, src.conv1.weight) and torch.equal(
        net.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var
    )
    assert torch.equal(net.fc.weight, fresh_fc)  # 101 classes: the head stays freshly initialised
    # Same class count: the head loads too. Wrapped checkpoints ("model", "state_dict", DDP prefixes) also load.
    same = build_model("resnet18", 1000, 3, image_size=224)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 90}, wrapped)
    load_weights(same, wrapped)
    assert torch.equal(same.fc.weight, src.fc.weight)


def test_safetensors_weights_load(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    src, _ = _imagenet_like_file(tmp_path, classes=10)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    net = build_model("resnet18", 10, 3, image_size=224)
    load_weights(net, path)
    assert torch.equal(net.fc.bias, src.fc.bias)


def test_weights_for_another_architecture_or_a_hostile_file_are_refused(tmp_path):
    _, path = _imagenet_like_file(tmp_path)
    with pytest.raises(WeightsError, match=r"peers\[1\].weights: .* does not fit this architecture"):
        load_weights(build_model("resnet34", 101, 3, image_size=224), path, "peers[1].weights")
    with pytest.raises(WeightsError, match="does not fit"):
        load_weights(build_model("resnet18", 101, 3, image_size=32), path)  # CIFAR stem: conv1 3x3 vs 7x7

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": Payload()}, evil)
    with pytest.raises(WeightsError, match="weights_only"):
        read_weights_file(evil)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="junk.pt"):
        read_weights_file(junk)


def test_peer_weights_config_and_preflight(tmp_path):
    from cmd_dist.launch.preflight import preflight
    from tests.image_fixtures import make_imagefolder

    _, good = _imagenet_like_file(tmp_path)
    root = make_imagefolder(tmp_path / "imgs", per_class=2, png=False)
    base = [
        "data.dataset=imagefolder",
        f"data.root={root}",
        "data.image_size=64",
        "noise.kind=none",
        "train.batch_size=4",
    ]
    nope = tmp_path / "nope.pt"
    missing = load_config(None, [*base, f"peers=[{{arch: resnet18, weights: {nope}}}, {{arch: resnet18}}]"])
    with pytest.raises(ConfigError, match=r"peers\[0\].weights: weights file .*nope.pt not found"):
        preflight(missing, echo=False)
    with pytest.raises(ConfigError, match=r"peers\[0\].weights: empty path"):
        load_config(None, ["peers=[{arch: resnet18, weights: ' '}, {arch: resnet18}]"])
    cfg = load_config(None, [*base, f"peers=[{{arch: resnet18, weights: {good}}}, {{arch: resnet18}}]"])
    preflight(cfg, echo=False)
    bad = load_config(None, [*base, f"peers=[{{arch: resnet18}}, {{arch: resnet34, weights: {good}}}]"])
    with pytest.raises(ConfigError, match=r"peers\[1\].weights"):
        preflight(bad, echo=False)


def test_engine_starts_a_peer_from_its_weights_file(tmp_path):
    from cmd_dist.train.peers import build_peer

    src, path = _imagenet_like_file(tmp_path)
    cfg = load_config(None, [f"peers=[{{arch: resnet18, weights: {path}}}, {{arch: resnet18}}]"])
    p0 = build_peer(cfg, 0, 5, 3, torch.device("cpu"), image_size=224)
    p1 = build_peer(cfg, 1, 5, 3, torch.device("cpu"), image_size=224)
    assert torch.equal(p0.model.conv1.weight, src.conv1.weight)
    assert not torch.equal(p1.model.conv1.weight, src.conv1.weight)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["peers=[{arch: inception_resnet_v2}, {arch: inception_resnet_v2}]", "data.dataset=cifar100"], "75 pixels"),
        (
            [
                "data.dataset=imagefolder",
                "data.image_size=64",
                "peers=[{arch: inception_resnet_v2}, {arch: cnn_small}]",
            ],
            "data.image_size",
        ),
    ],
)
def test_inception_needs_75_pixels(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)
