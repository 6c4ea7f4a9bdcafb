"""How a model runs: on which device, in which precision (autocast), with channels-last inputs, compiled or not.

The options GPU users expect from timm's ``--amp``, ``--channels-last`` and ``--torchcompile``, shared by the build's
teacher pass, ``verify`` and ``train``. ``auto`` precision is bf16 autocast on a CUDA device that supports it and fp32
elsewhere (on a CPU bf16 autocast is often slower: ``benchmarks/bench_build.py`` measures it).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from logitcache.errors import LogitcacheError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` made concrete for ``device``; an unknown name is refused."""
    if precision not in PRECISIONS:
        raise LogitcacheError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


@dataclass(frozen=True)
class Compute:
    """A device, a concrete precision (fp32, bf16 or fp16) and the memory format of 4-d inputs."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False

    @classmethod
    def of(cls, device: torch.device, precision: str = "auto", channels_last: bool = False) -> "Compute":
        return cls(device, resolve_precision(precision, device), channels_last)

    def autocast(self) -> AbstractContextManager:
        """Autocast to the precision (nothing for fp32): matmuls and convolutions in bf16/fp16, reductions in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def model(self, module: nn.Module) -> nn.Module:
        """``module`` on the device, channels-last when asked (its weights too, so convolutions keep that format)."""
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module  # type: ignore[call-overload]


def compiled(module: nn.Module, first_call: Callable[[nn.Module], object]) -> nn.Module:
    """``torch.compile(module)``, checked by ``first_call`` (which runs it once); where the platform cannot compile
    (no compiler, an unsupported operation), the module itself with one warning that says why."""
    try:
        candidate = cast(nn.Module, torch.compile(module))  # an OptimizedModule: a Module calling the compiled code
        first_call(candidate)
        return candidate
    except Exception as e:  # torch raises many kinds here (BackendCompilerFailed, InductorError, RuntimeError, ...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        warnings.warn(f"--compile: cannot compile on this platform ({reason}); running uncompiled", stacklevel=2)
        return module
