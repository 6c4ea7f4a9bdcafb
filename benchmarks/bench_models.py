"""Teachers for the benchmarks, as `file.py:function` specs (random weights: throughput does not depend on them)."""

import torch

from logitcache.models import SmallResNet


def resnet8_fmnist() -> torch.nn.Module:
    torch.manual_seed(0)
    return SmallResNet(8, 16, 1, 10).eval()


def resnet20_fmnist() -> torch.nn.Module:
    """About 3x the compute of resnet8: the 'larger teacher' of the step-overhead benchmark."""
    torch.manual_seed(0)
    return SmallResNet(20, 16, 1, 10).eval()
