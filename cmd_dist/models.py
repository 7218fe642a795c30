"""Peer architectures, chosen by name per peer (paper Sec. 5, Tables 1-6).

CIFAR ResNets are torchvision's ResNets with the CIFAR stem (3x3 conv, stride 1, no max-pool;
He et al. 2016), the form the paper's reference timings use. ShuffleNetV2 is torchvision's
x1.0 network with the same 32x32 stem change (as in Tf-KD's CIFAR code). ``cnn_small`` is a
small CNN for digits and CPU smoke runs.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm


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
    """Three conv blocks and a linear head; ~27 k parameters at width 16. Works for any input size >= 8."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

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


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialised peer network by name (seed the global RNG first for reproducibility)."""
    if arch == "resnet18":
        return _cifar_resnet(tvm.resnet18, num_classes, in_channels)
    if arch == "resnet34":
        return _cifar_resnet(tvm.resnet34, num_classes, in_channels)
    if arch == "resnet50":
        return _cifar_resnet(tvm.resnet50, num_classes, in_channels)
    if arch == "shufflenetv2":
        return _cifar_shufflenetv2(num_classes, in_channels)
    if arch == "cnn_small":
        return SmallCNN(num_classes, in_channels)
    raise ValueError(f"unknown architecture {arch!r}; choose resnet18, resnet34, resnet50, shufflenetv2 or cnn_small")
