"""Training checkpoints: everything a run needs to continue after its last finished epoch, in one safetensors file.

``checkpoint.safetensors`` holds the model weights (``model/<name>``), the optimizer's per-parameter tensors
(``optim/<param index>/<key>``) and torch's CPU RNG state (``rng/torch``); its string metadata holds the epoch, step,
wall time and every metrics row so far. One file, replaced atomically after each epoch, so weights, optimizer and
metrics can never disagree about where the run stopped. No pickle: safetensors stores tensors and strings only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from logitcache.errors import LogitcacheError

CHECKPOINT_FILE = "checkpoint.safetensors"


@dataclass
class RunState:
    """Where a run stands after its last finished epoch."""

    epoch: int = 0
    step: int = 0
    wall: float = 0.0
    teacher_forwards: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    scaler: dict[str, Any] = field(default_factory=dict)  # fp16's gradient scaler, so that a resume continues it


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState) -> None:
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    extra: dict[str, dict[str, Any]] = {}
    for index, per_param in optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                extra.setdefault(str(index), {})[key] = value
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # every device's generator, by index
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = rng
    meta = {
        "epoch": str(state.epoch),
        "step": str(state.step),
        "wall": repr(state.wall),
        "teacher_forwards": str(state.teacher_forwards),
        "metrics": json.dumps(state.metrics),
        "optim_extra": json.dumps(extra),
        "scaler": json.dumps(state.scaler),
    }
    tmp = run_dir / (CHECKPOINT_FILE + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, run_dir / CHECKPOINT_FILE)


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> RunState:
    """Restore model, optimizer and RNG from ``run_dir``; a fresh ``RunState`` if the run never finished an epoch."""
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        return RunState()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise LogitcacheError(f"{path} is damaged ({type(e).__name__}: {e}); start the run again with --overwrite")
    model.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in json.loads(meta["optim_extra"]).items()}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    # load_state_dict moves each state tensor to its parameter's device
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[f"rng/cuda/{i}"] for i in range(len(tensors)) if f"rng/cuda/{i}" in tensors]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    return RunState(
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        wall=float(meta["wall"]),
        teacher_forwards=int(meta["teacher_forwards"]),
        metrics=json.loads(meta["metrics"]),
        scaler=json.loads(meta.get("scaler", "{}")),
    )
