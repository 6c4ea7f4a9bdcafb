"""``full``: every logit as float16."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from logitcache.encoding.base import Encoding, Field
from logitcache.encoding.registry import register


@register
class FullEncoding(Encoding):
    """All C logits as float16: exact up to float16 rounding; 2C bytes per sample."""

    name = "full"
    summary = "all logits (float16)"
    values = "logits"
    field_names = frozenset({"logits"})
    device_side = True

    def fields(self) -> dict[str, Field]:
        return {"logits": Field((self.num_classes,), np.dtype("float16"))}

    def encode(self, logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return {"logits": logits.float().to(torch.float16)}

    def log_probs(self, targets: dict[str, Tensor], temperature: float, table: Tensor | None = None) -> Tensor:
        return torch.log_softmax(targets["logits"].float() / temperature, dim=-1)
