"""``sampled``: S draws from the teacher, stored as ids and counts (random-sampling KD)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from logitcache.errors import LogitcacheError
from logitcache.encoding.base import (
    Encoding,
    Field,
    Option,
    id_dtype,
    inverse_cdf,
    torch_dtype,
    torch_id_dtype,
    uniforms,
)
from logitcache.encoding.registry import register


# shared by the encodings that store draws (one --tau flag)
TAU = Option(
    1.0,
    "sampled / headtail: the temperature the draws follow (sampled: training must use the same; headtail: any "
    "works, the one you train with gives the least noisy targets).",
)


@register
class SampledEncoding(Encoding):
    """Random-sampling KD (Anshumann et al., ACL 2025): S draws with replacement from the teacher's distribution at
    temperature ``tau``, stored as distinct ids with their counts (``S`` slots, unused slots have count 0).

    ``counts / S`` is an unbiased estimate of the teacher's distribution at ``tau`` (so its cross-entropy gradient is
    unbiased too); it is only defined at ``tau``, so training at another temperature is refused.
    """

    name = "sampled"
    summary = "S draws from the teacher at temperature tau, as ids + counts (unbiased)"
    values = "sample counts"
    options = {
        "samples": Option(50, "sampled: draws S per sample.", low=1),
        "tau": TAU,
    }
    field_names = frozenset({"ids", "counts"})
    deterministic = False
    device_side = True
    # the options' values, set by ``Encoding.__init__``
    samples: int
    tau: float

    def validate(self) -> None:
        if self.tau <= 0:
            raise LogitcacheError(f"the sampling temperature must be > 0, got {self.tau:g}")

    @property
    def stored_temperature(self) -> float:
        return self.tau

    def check_temperature(self, temperature: float) -> None:
        _refuse_other_temperature(self.tau, temperature)

    def wire(self, fields: dict[str, Tensor]) -> dict[str, Tensor]:
        # the draws' temperature travels with the batch, so that a batch decoded without its cache is still checked
        rows = len(fields["ids"])
        return {**fields, "temperature": fields["ids"].new_full((rows,), self.tau, dtype=torch.float32)}

    @classmethod
    def for_targets(cls, targets: dict[str, Tensor], num_classes: int) -> "Encoding":
        """Reads the batch's ``temperature`` on the host: a decode without the cache pays one read of it per call
        (``KDLoss`` knows it from the cache instead)."""
        tau = float(targets["temperature"].reshape(-1)[0]) if "temperature" in targets else TAU.default
        return cls(num_classes, samples=targets["ids"].shape[-1], tau=tau)

    def slots(self) -> int:
        return min(self.samples, self.num_classes)

    def entries(self) -> int:
        return self.slots()

    def _count_dtype(self) -> np.dtype:
        return np.dtype("uint8") if self.samples < 256 else np.dtype("int32")

    def fields(self) -> dict[str, Field]:
        return {
            "ids": Field((self.slots(),), id_dtype(self.num_classes)),
            "counts": Field((self.slots(),), self._count_dtype()),
        }

    def encode(self, logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        probs = torch.softmax(logits.float() / self.tau, dim=-1)
        draws = inverse_cdf(probs, uniforms(generator, (probs.shape[0], self.samples), probs.device))
        counts = torch.zeros(probs.shape, dtype=torch.int32, device=probs.device).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=torch.int32)
        )
        # every drawn class (at most S <= slots), then ordered most drawn first, ties in increasing class order: a key
        # unique per slot, so the order is the same on any device (topk's order of ties is not)
        top, ids = counts.topk(self.slots(), dim=-1)
        order = (top.long() * (self.num_classes + 1) + (self.num_classes - ids)).argsort(dim=-1, descending=True)
        top, ids = top.gather(1, order), ids.gather(1, order)
        ids = torch.where(top > 0, ids, 0)  # unused slots: id 0, count 0 (compresses to nothing)
        return {"ids": ids.to(torch_id_dtype(self.num_classes)), "counts": top.to(torch_dtype(self._count_dtype()))}

    def probs(self, targets: dict[str, Tensor]) -> Tensor:
        counts = targets["counts"].float()
        dense = counts.new_zeros(*counts.shape[:-1], self.num_classes)
        dense.scatter_add_(-1, targets["ids"].long(), counts)
        return dense / counts.sum(-1, keepdim=True)

    def log_probs(self, targets: dict[str, Tensor], temperature: float, table: Tensor | None = None) -> Tensor:
        self.check_temperature(temperature)
        return self.probs(targets).log()

    def kl(
        self,
        student_logits: Tensor,
        targets: dict[str, Tensor],
        temperature: float,
        tail: str,
        table: Tensor | None = None,
    ) -> Tensor:
        self.check_temperature(temperature)
        counts = targets["counts"].float()
        p = counts / counts.sum(1, keepdim=True)
        log_q = student_logits.float() / temperature
        log_q = log_q.gather(1, targets["ids"].long()) - torch.logsumexp(log_q, dim=1, keepdim=True)
        # unused slots have p = 0 and contribute nothing; p log p uses xlogy so 0 log 0 = 0
        return (torch.special.xlogy(p, p) - p * log_q).sum(1)

    def compare(self, stored: dict[str, Tensor], fresh: dict[str, Tensor], fresh_log_p: Tensor) -> tuple[float, str]:
        # Draws differ from run to run by design; a drawn class the fresh teacher finds essentially impossible means
        # another teacher or another image.
        worst = float(fresh_log_p[stored["ids"][stored["counts"] > 0].long()].min())
        return 0.0, (f"a stored draw has fresh probability e^{worst:.1f}" if worst < -14 else "")


def _refuse_other_temperature(tau: float, temperature: float) -> None:
    if abs(tau - temperature) > 1e-6:
        raise LogitcacheError(
            f"this cache holds samples drawn at temperature {tau:g}; a sampled target is only unbiased at that "
            f"temperature, so it cannot be used at temperature {temperature:g} (train with --temperature {tau:g}, "
            "or rebuild)"
        )
