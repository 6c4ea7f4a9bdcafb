"""Soft targets <-> compact arrays. Pure tensor code: nothing here knows about Zarr or files.

An encoding turns a batch of teacher logits ``[B, C]`` into a dict of fixed-shape arrays (the "fields" stored per
sample) and turns such a dict, as a collated batch, back into dense teacher log-probabilities. Every target dict also
carries the encoding's per-sample constants (``num_classes``; ``temperature`` for ``sampled``) so that a batch can be
decoded without the cache at hand.

Stored numbers are at temperature 1 and the temperature is chosen at training time, except for ``sampled``, whose
samples were drawn at a build-time temperature that training must use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import LogitcacheError

# Floor for the log leftover mass: keeps exp/log finite when a teacher puts (numerically) all mass in the top k.
MIN_TAIL = -80.0


@dataclass(frozen=True)
class Field:
    shape: tuple[int, ...]  # per-sample shape
    dtype: np.dtype


def id_dtype(num_classes: int) -> np.dtype:
    """The narrowest integer type that holds every class id (ids are most of a sparse cache's bytes)."""
    if num_classes <= 1 << 15:
        return np.dtype("int16")
    return np.dtype("int32")


class Encoding:
    """Base: ``fields`` (what is stored per sample), ``encode`` (logits -> fields), ``log_probs`` (fields -> dense)."""

    name = ""
    field_names: frozenset[str] = frozenset()
    optional_field_names: frozenset[str] = frozenset()  # fields a newer store adds; older stores lack them

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def params(self) -> dict:
        return {}

    def constants(self) -> dict[str, float]:
        """Per-sample constants added to every target dict at read time."""
        return {"num_classes": self.num_classes}

    def fields(self) -> dict[str, Field]:
        raise NotImplementedError

    def encode(self, logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    @staticmethod
    def log_probs(targets: dict[str, Tensor], temperature: float) -> Tensor:
        raise NotImplementedError

    def entries(self) -> int:
        """Numbers kept per sample (for bytes-per-entry figures)."""
        return self.num_classes


class FullEncoding(Encoding):
    """All C logits as float16: exact up to float16 rounding; 2C bytes per sample."""

    name = "full"
    field_names = frozenset({"logits"})

    def fields(self) -> dict[str, Field]:
        return {"logits": Field((self.num_classes,), np.dtype("float16"))}

    def encode(self, logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return {"logits": logits.float().to(torch.float16)}

    @staticmethod
    def log_probs(targets: dict[str, Tensor], temperature: float) -> Tensor:
        return torch.log_softmax(targets["logits"].float() / temperature, dim=-1)


# Inverse temperatures at which the tail's softened mass is stored (``tail_soft``): T = 8, 4 and 2. With the exact
# ends (beta = 1: ``tail``; beta = 0: log of the number of unstored classes) any training temperature interpolates.
SOFT_TAIL_BETAS = (0.125, 0.25, 0.5)


class TopKEncoding(Encoding):
    """The k largest log-probabilities, their class ids, and the log of the leftover probability mass ("tail").

    The tail keeps the target honest: nothing is renormalised. Softening by a temperature T changes the tail's share
    in a way its total mass alone cannot tell (a flat tail softens to far more mass than a peaked one), so the store
    also keeps ``tail_soft``: ``log sum_j p_j^(1/T)`` over the unstored classes at T = 2, 4, 8. Decoding at T
    interpolates it (exact at T = 1, 2, 4, 8 and as T -> inf) and spreads it equally over the C - k unstored classes.
    Caches written before ``tail_soft`` existed (``soft_tail: false``) use the flat spread of ``tail`` at every T.
    """

    name = "topk"
    field_names = frozenset({"logprobs", "ids", "tail"})
    optional_field_names = frozenset({"tail_soft"})

    def __init__(self, num_classes: int, k: int, soft_tail: bool = False):
        super().__init__(num_classes)
        if not 1 <= k <= num_classes:
            raise LogitcacheError(f"k must be between 1 and the number of classes ({num_classes}), got {k}")
        self.k, self.soft_tail = k, soft_tail

    def params(self) -> dict:
        return {"k": self.k, "soft_tail": self.soft_tail}

    def entries(self) -> int:
        return self.k

    def fields(self) -> dict[str, Field]:
        fields = {
            "logprobs": Field((self.k,), np.dtype("float16")),
            "ids": Field((self.k,), id_dtype(self.num_classes)),
            "tail": Field((), np.dtype("float32")),
        }
        if self.soft_tail:
            fields["tail_soft"] = Field((len(SOFT_TAIL_BETAS),), np.dtype("float16"))  # T = 8, 4, 2
        return fields

    def encode(self, logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top, ids = logp.topk(self.k, dim=-1)
        # log(1 - sum(top)) computed from the dropped entries directly: no cancellation for confident teachers.
        dropped = logp.scatter(-1, ids, float("-inf"))
        out = {
            "logprobs": top.to(torch.float16),
            "ids": ids.to(_torch_id_dtype(self.num_classes)),
            "tail": torch.logsumexp(dropped, dim=-1),
        }
        if self.soft_tail:
            soft = [torch.logsumexp(beta * dropped, dim=-1) for beta in SOFT_TAIL_BETAS]
            out["tail_soft"] = torch.stack(soft, dim=-1).clamp(min=MIN_TAIL).to(torch.float16)
        return out

    @staticmethod
    def softened_tail(targets: dict[str, Tensor], rest: int, temperature: float) -> Tensor:
        """``log sum_j p_j^(1/T)`` over the ``rest`` unstored classes, per sample: the tail's weight next to the
        stored ``logprobs / T`` before normalisation."""
        tail = targets["tail"].float().clamp(min=MIN_TAIL)
        if "tail_soft" not in targets:  # older cache: assume a flat tail (exact at T = 1, too much mass above)
            return tail / temperature + math.log(rest) * (1 - 1 / temperature)
        betas = (0.0, *SOFT_TAIL_BETAS, 1.0)
        points = [torch.full_like(tail, math.log(rest)), *targets["tail_soft"].float().unbind(-1), tail]
        beta = 1.0 / temperature
        # log sum p^beta is convex in beta: the chord between stored points is a close upper bound; beyond
        # beta = 1 (T < 1) the last chord is extended.
        i = len(betas) - 2 if beta >= 1 else max(j for j in range(len(betas) - 1) if betas[j] <= beta)
        w = (beta - betas[i]) / (betas[i + 1] - betas[i])
        return ((1 - w) * points[i] + w * points[i + 1]).clamp(min=MIN_TAIL)

    @staticmethod
    def log_probs(targets: dict[str, Tensor], temperature: float) -> Tensor:
        logp, ids = targets["logprobs"].float(), targets["ids"].long()
        num_classes = int(targets["num_classes"].reshape(-1)[0])
        rest = num_classes - ids.shape[-1]
        if rest == 0:
            fill = torch.full_like(logp[..., 0], float("-inf"))
        else:
            fill = TopKEncoding.softened_tail(targets, rest, temperature) - math.log(rest)
        dense = fill[..., None].expand(*ids.shape[:-1], num_classes).clone().scatter_(-1, ids, logp / temperature)
        return torch.log_softmax(dense, dim=-1)


class SampledEncoding(Encoding):
    """Random-sampling KD (Anshumann et al., ACL 2025): S draws with replacement from the teacher's distribution at
    temperature ``tau``, stored as distinct ids with their counts (``S`` slots, unused slots have count 0).

    ``counts / S`` is an unbiased estimate of the teacher's distribution at ``tau`` (so its cross-entropy gradient is
    unbiased too); it is only defined at ``tau``, so training at another temperature is refused.
    """

    name = "sampled"
    field_names = frozenset({"ids", "counts"})

    def __init__(self, num_classes: int, samples: int = 50, tau: float = 1.0):
        super().__init__(num_classes)
        if samples < 1:
            raise LogitcacheError(f"the number of samples S must be >= 1, got {samples}")
        if tau <= 0:
            raise LogitcacheError(f"the sampling temperature must be > 0, got {tau}")
        self.samples, self.tau = samples, float(tau)

    def params(self) -> dict:
        return {"samples": self.samples, "tau": self.tau}

    def constants(self) -> dict[str, float]:
        return {"num_classes": self.num_classes, "temperature": self.tau}

    def slots(self) -> int:
        return min(self.samples, self.num_classes)

    def entries(self) -> int:
        return self.slots()

    def fields(self) -> dict[str, Field]:
        count_dtype = np.dtype("uint8") if self.samples < 256 else np.dtype("int32")
        return {
            "ids": Field((self.slots(),), id_dtype(self.num_classes)),
            "counts": Field((self.slots(),), count_dtype),
        }

    def encode(self, logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        probs = torch.softmax(logits.float() / self.tau, dim=-1)
        draws = torch.multinomial(probs, self.samples, replacement=True, generator=generator)
        counts = torch.zeros(probs.shape, dtype=torch.int32).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=torch.int32)
        )
        top, ids = counts.topk(self.slots(), dim=-1)
        ids = torch.where(top > 0, ids, 0)  # unused slots: id 0, count 0 (compresses to nothing)
        count_dtype = torch.uint8 if self.samples < 256 else torch.int32
        return {"ids": ids.to(_torch_id_dtype(self.num_classes)), "counts": top.to(count_dtype)}

    @staticmethod
    def check_temperature(targets: dict[str, Tensor], temperature: float) -> None:
        tau = float(targets["temperature"].reshape(-1)[0])
        if abs(tau - temperature) > 1e-6:
            raise LogitcacheError(
                f"this cache holds samples drawn at temperature {tau:g}; a sampled target is only "
                f"unbiased at that temperature, so it cannot be used at temperature {temperature:g} "
                f"(train with --temperature {tau:g}, or rebuild)"
            )

    @staticmethod
    def probs(targets: dict[str, Tensor]) -> Tensor:
        counts = targets["counts"].float()
        num_classes = int(targets["num_classes"].reshape(-1)[0])
        dense = torch.zeros(*counts.shape[:-1], num_classes)
        dense.scatter_add_(-1, targets["ids"].long(), counts)
        return dense / counts.sum(-1, keepdim=True)

    @staticmethod
    def log_probs(targets: dict[str, Tensor], temperature: float) -> Tensor:
        SampledEncoding.check_temperature(targets, temperature)
        return SampledEncoding.probs(targets).log()


class QuantizedEncoding(Encoding):
    """All C log-probabilities in 8 bits: ``logp ~= -q * scale`` with one float32 ``scale`` per sample.

    Log-probabilities below ``-floor`` are clipped to it (probabilities under e^-floor carry no signal); the error is
    at most ``scale / 2 <= floor / 510`` in log space, i.e. a relative error of at most ~2% per probability at the
    default floor of 20. C + 4 bytes per sample; decoding renormalises the rounded distribution.
    """

    name = "quantized"
    field_names = frozenset({"q", "scale"})

    def __init__(self, num_classes: int, floor: float = 20.0):
        super().__init__(num_classes)
        if floor <= 0:
            raise LogitcacheError(f"the quantization floor must be > 0, got {floor}")
        self.floor = float(floor)

    def params(self) -> dict:
        return {"floor": self.floor}

    def fields(self) -> dict[str, Field]:
        return {"q": Field((self.num_classes,), np.dtype("uint8")), "scale": Field((), np.dtype("float32"))}

    def encode(self, logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        logp = torch.log_softmax(logits.float(), dim=-1).clamp(min=-self.floor)
        scale = (-logp.min(dim=-1).values).clamp(min=1e-6) / 255
        q = torch.round(-logp / scale[:, None]).clamp(0, 255).to(torch.uint8)
        return {"q": q, "scale": scale}

    @staticmethod
    def log_probs(targets: dict[str, Tensor], temperature: float) -> Tensor:
        logp = -targets["q"].float() * targets["scale"].float()[..., None]
        return torch.log_softmax(logp / temperature, dim=-1)


def _torch_id_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if id_dtype(num_classes) == np.int16 else torch.int32


ENCODINGS: dict[str, type[Encoding]] = {
    "full": FullEncoding,
    "topk": TopKEncoding,
    "sampled": SampledEncoding,
    "quantized": QuantizedEncoding,
}
CONSTANT_KEYS = frozenset({"num_classes", "temperature"})


def make_encoding(name: str, num_classes: int, params: dict | None = None) -> Encoding:
    if name not in ENCODINGS:
        raise LogitcacheError(f"unknown encoding {name!r}; choose one of: {', '.join(ENCODINGS)}")
    return ENCODINGS[name](num_classes, **dict(params or {}))


def encoding_of(targets: dict[str, Tensor]) -> type[Encoding]:
    """The encoding class that produced a target dict, recognised by its field names."""
    keys = set(targets) - CONSTANT_KEYS
    for cls in ENCODINGS.values():
        if cls.field_names <= keys <= cls.field_names | cls.optional_field_names:
            return cls
    raise LogitcacheError(f"not a logitcache target dict (fields: {sorted(keys)})")


def dense_log_probs(targets: dict[str, Tensor], temperature: float = 1.0) -> Tensor:
    """Dense teacher log-probabilities ``[B, C]`` at ``temperature``, the tail restored as the encoding defines."""
    return encoding_of(targets).log_probs(targets, temperature)


def topk_kept_mass(targets: dict[str, Tensor], temperature: float) -> float:
    """Mean share of the softened teacher distribution held by a top-k batch's stored entries (the rest is tail)."""
    ids = targets["ids"].long()
    return float(TopKEncoding.log_probs(targets, temperature).exp().gather(-1, ids).sum(-1).mean())


def to_probs(targets: dict[str, Tensor], temperature: float = 1.0) -> Tensor:
    """Dense teacher probabilities ``[B, C]`` for a (collated) batch of cached targets."""
    return dense_log_probs(targets, temperature).exp()
