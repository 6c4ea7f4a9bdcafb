"""Where a finished unit's teacher outputs become stored bytes: encoded, copied to the host, compressed, written.

``encode_on="device"``: the encoding (log-softmax, top-k, quantization, draws) runs on the teacher's device right
after the unit's last batch, its fields (a fraction of the logits' bytes) are copied to pinned host buffers on a side
stream while the teacher runs the next batch, and a host thread waits for that copy, compresses and writes. ``host``:
the logits come to the host and the thread encodes them too, beside the teacher (on a CPU this is what keeps the
teacher busy: ``benchmarks/bench_build.py`` measures both). ``auto``: device on an accelerator, host on a CPU.

Sampling encodings draw from a generator seeded per unit, on the CPU whichever device encodes, so a unit's bytes are
a function of its inputs on any device.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
import zarr

from logitcache import store
from logitcache.encoding import Encoding
from logitcache.config import ENCODE_ON
from logitcache.errors import LogitcacheError
from logitcache.augment.seeds import sample_seed

_ENCODE_SALT = 0x5EED_E4C0
_FINITE = "\0finite"  # a per-row flag carried with the fields, so the check costs the teacher no synchronisation


def encodes_on_device(encode_on: str, device: torch.device, enc: Encoding) -> bool:
    """Whether a build on ``device`` encodes there (``encode_on`` made concrete); an encoding that does not declare
    ``device_side`` encodes on the host, and asking for the device with one is refused."""
    if encode_on not in ENCODE_ON:
        raise LogitcacheError(f"unknown --encode-on {encode_on!r}; choose one of: {', '.join(ENCODE_ON)}")
    if encode_on == "device" and not enc.device_side:
        raise LogitcacheError(
            f"encoding {enc.name} does not declare that it encodes on any device (device_side); use --encode-on host"
        )
    return enc.device_side and (encode_on == "device" or (encode_on == "auto" and device.type != "cpu"))


class UnitWriter:
    """Turns each finished unit's logits into its stored rows, one host thread compressing and writing while the
    teacher computes. At most a few units wait (back-pressure on slow disks); a unit handed over is written even when
    the build is interrupted after it."""

    MAX_IN_FLIGHT = 4

    def __init__(
        self,
        group: zarr.Group,
        enc: Encoding,
        layout: store.Layout,
        seed: int,
        has_digests: bool,
        table: torch.Tensor | None = None,
        *,
        device: torch.device = torch.device("cpu"),
        on_device: bool = False,
    ):
        self.group, self.enc, self.layout, self.seed, self.has_digests = group, enc, layout, seed, has_digests
        self.on_device = on_device
        where = device if on_device else torch.device("cpu")
        self.table = {"table": table.to(where)} if table is not None else {}  # an encoding with a table encodes with it
        self.field_names = sorted(enc.fields())
        self.copy_stream = torch.cuda.Stream(device) if on_device and device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitcache-writer")
        self.in_flight: list[Future] = []

    def submit(self, unit: tuple[int, int], logits: torch.Tensor) -> None:
        """Hand over a unit's logits (float32, on the teacher's device); a write's error surfaces here or at flush."""
        if self.on_device:
            host, copied = self._to_host(self._encode(unit, logits))
            task = partial(self._write, unit, host, copied)
        else:
            task = partial(self._encode_and_write, unit, logits.cpu())
        self.in_flight.append(self.pool.submit(task))
        while len(self.in_flight) > self.MAX_IN_FLIGHT or (self.in_flight and self.in_flight[0].done()):
            self.in_flight.pop(0).result()

    def _encode(self, unit: tuple[int, int], logits: torch.Tensor) -> dict[str, torch.Tensor]:
        view, chunk = unit
        rng = torch.Generator().manual_seed(sample_seed(self.seed ^ _ENCODE_SALT, view, chunk))
        fields = self.enc.encode(logits, rng, **self.table)
        return {**fields, _FINITE: torch.isfinite(logits).all(dim=1)}

    def _to_host(self, fields: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """The fields on the host: on CUDA copied into pinned buffers on a side stream (the teacher's stream goes on
        with the next batch), with the event that marks the copy done; elsewhere plain copies."""
        if self.copy_stream is None:
            return {name: t.cpu() for name, t in fields.items()}, None
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.copy_stream.device))
        host = {}
        with torch.cuda.stream(self.copy_stream):
            for name, t in fields.items():
                host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host[name].copy_(t, non_blocking=True)
                t.record_stream(self.copy_stream)  # the allocator keeps t until the copy is done
        copied = torch.cuda.Event(blocking=True)  # the thread sleeps while it waits, not spins
        copied.record(self.copy_stream)
        return host, copied

    def _encode_and_write(self, unit: tuple[int, int], logits: torch.Tensor) -> None:
        self._write(unit, self._encode(unit, logits), None)

    def _write(self, unit: tuple[int, int], fields: dict[str, torch.Tensor], copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        view, chunk = unit
        start, stop = self.layout.rows(chunk)
        finite = fields.pop(_FINITE)
        if not bool(finite.all()):
            sample = start + int((~finite).nonzero()[0])
            raise LogitcacheError(
                f"the teacher produced NaN/inf for view {view}, sample {sample}; nothing was written for its chunk"
            )
        rows: dict[str, np.ndarray] = {name: t.numpy() for name, t in fields.items()}
        store.write_unit(self.group, self.field_names, view, chunk, (start, stop), rows, self.has_digests)

    def flush(self) -> None:
        while self.in_flight:
            self.in_flight.pop(0).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
