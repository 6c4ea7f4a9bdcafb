"""torch.distributed glue: logitcache runs under `torchrun` with no launcher of its own.

Ranks share one counter in the process group's key-value store to claim work units, so a rank that finishes early
takes the next unit instead of idling (dynamic balancing, whatever the units' costs).
"""

from __future__ import annotations

import os
from typing import Iterator, TypeVar

import torch
import torch.distributed as dist

from logitcache.errors import LogitcacheError

T = TypeVar("T")


def init_from_env(device: str | torch.device = "auto") -> bool:
    """Join the process group `torchrun` describes in the environment; False if none. ``device`` is the one this
    process computes on (as ``resolve_device`` reads it): on a CUDA device, that device becomes the current one and
    the group gets NCCL for tensors on it beside gloo; on the CPU the group is gloo alone and CUDA is never touched, so
    that ``--device cpu`` runs any number of processes on a machine with fewer GPUs (or none)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(default_backend(dev.type == "cuda"))
    return True


def local_rank() -> int | None:
    """This process's index on its machine under torchrun (``LOCAL_RANK``); None outside torchrun."""
    value = os.environ.get("LOCAL_RANK", "").strip()
    return int(value) if value else None


def resolve_device(device: str | torch.device) -> torch.device:
    """The device ``device`` names, with an index when it is CUDA: ``auto`` is CUDA when present, else the CPU; a bare
    ``cuda`` is this process's own GPU under torchrun (``cuda:LOCAL_RANK``), else the current one. An index given
    explicitly (``cuda:0``) is kept. A CUDA device that is not there is a ``LogitcacheError``."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LogitcacheError("--device cuda was asked for but CUDA is not available on this machine")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LogitcacheError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type != "cuda" or dev.index is not None:
        return dev
    local = local_rank()
    if local is None:
        return torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if local >= count:
        raise LogitcacheError(
            f"this process is LOCAL_RANK {local} under torchrun and sees {count} CUDA device(s), so it has no GPU of "
            "its own: start at most that many processes per machine (--nproc-per-node), run on the CPU "
            "(--device cpu), or name the device (cuda:0) where each process sees only its own GPU"
        )
    return torch.device("cuda", local)


def default_backend(cuda: bool) -> str:
    # NCCL only takes CUDA tensors; the small control messages below (flags, counters, metric sums) live on the CPU,
    # so on GPU machines they travel over a gloo leg of the same group while DDP's gradients use NCCL.
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def control_device(backend: str) -> torch.device:
    """Where a control tensor must live for ``backend`` (as `dist.get_backend()` spells it): the CPU when the group
    has a CPU leg, else the current CUDA device (a user's own ``init_process_group("nccl")``)."""
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _control_tensor(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
    backend = str(dist.get_backend())
    if backend == "undefined":  # a group started without naming one: its config names its legs ("cpu:gloo,...")
        backend = str(dist.get_backend_config())
    return torch.tensor(values, dtype=dtype, device=control_device(backend))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def agree(ok: bool) -> bool:
    """True on every rank if ``ok`` is True on rank 0 (rank 0 decides; no pickling of Python objects)."""
    if not is_distributed():
        return ok
    flag = _control_tensor([1 if ok else 0], torch.int64)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def all_min(value: int) -> int:
    """The smallest ``value`` over all ranks: a decision every rank must share (the most cautious one wins)."""
    if not is_distributed():
        return value
    t = _control_tensor([value], torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_sum(*values: float) -> list[float]:
    if not is_distributed():
        return list(values)
    t = _control_tensor(list(values), torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts them at the start of each forward
    and each rank then updates them with its own batch, so after training they differ slightly between ranks; the
    model every rank evaluates must be the one rank 0 saves."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def claim(items: list[T], name: str) -> Iterator[T]:
    """Yield the items this rank should process. Single process: all of them in order. Distributed: each item goes
    to exactly one rank, claimed through an atomic counter in the process group's store when it is needed."""
    if not is_distributed():
        yield from items
        return
    key = _control_tensor([int(torch.randint(0, 2**62, ()))], torch.int64)  # fresh key per call, shared from rank 0
    dist.broadcast(key, src=0)
    store = dist.distributed_c10d._get_default_store()
    counter = f"logitcache/{name}/{int(key.item())}"
    while True:
        i = store.add(counter, 1) - 1
        if i >= len(items):
            return
        yield items[i]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
