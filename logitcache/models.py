"""Built-in small networks for 28x28 / 32x32 images: a CIFAR-style ResNet family (He et al. 2016, section 4.2).

``small-resnet{depth}[-w{width}]``: depth = 6n + 2 (8, 14, 20, 32, ...), stage widths (w, 2w, 4w), default w = 16.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

_NAME = re.compile(r"small-resnet(\d+)(?:-w(\d+))?$")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, depth: int = 20, width: int = 16, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 >= 8, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(n):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_resnet(name: str, num_classes: int, in_channels: int) -> SmallResNet | None:
    """The network for a ``small-resnet...`` name, or None if ``name`` is not one."""
    m = _NAME.match(name)
    if not m:
        return None
    return SmallResNet(int(m.group(1)), int(m.group(2) or 16), in_channels, num_classes)


class Ensemble(nn.Module):
    """Several teachers as one: the log of their mean probability (a sequence of runs provides the members for free).

    Averaging probabilities rather than logits keeps the ensemble's confidence honest when members disagree.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([torch.log_softmax(m(x).float(), dim=-1) for m in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))
