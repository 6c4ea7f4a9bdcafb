"""Soft targets <-> compact arrays. Pure tensor code: nothing here knows about Zarr or files.

An encoding turns a batch of teacher logits ``[B, C]`` into a dict of fixed-shape arrays (the "fields" stored per
sample) and turns such a dict, as a collated batch, back into dense teacher logits. Every target dict also carries
``num_classes`` (one integer per sample) so that a batch can be decoded without the cache at hand.

Stored numbers are at temperature 1; the temperature is chosen at training time (see ``dense_log_probs``).
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


class FullEncoding:
    """All C logits as float16: exact up to float16 rounding; C * 2 bytes per sample."""

    name = "full"
    field_names = frozenset({"logits"})

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def params(self) -> dict:
        return {}

    def fields(self) -> dict[str, Field]:
        return {"logits": Field((self.num_classes,), np.dtype("float16"))}

    def encode(self, logits: Tensor) -> dict[str, Tensor]:
        return {"logits": logits.float().to(torch.float16)}

    @staticmethod
    def dense_logits(targets: dict[str, Tensor]) -> Tensor:
        return targets["logits"].float()


class TopKEncoding:
    """The k largest log-probabilities, their class ids, and the log of the leftover probability mass ("tail").

    The tail keeps the target honest: nothing is renormalised. Decoding spreads the tail mass uniformly over the
    C - k classes not stored, which restores the teacher's distribution exactly on the kept classes and in total
    mass at temperature 1. At another temperature the spread tail is an approximation (the true tail is not uniform).
    """

    name = "topk"
    field_names = frozenset({"logprobs", "ids", "tail"})

    def __init__(self, num_classes: int, k: int):
        if not 1 <= k <= num_classes:
            raise LogitcacheError(f"k must be between 1 and the number of classes ({num_classes}), got {k}")
        self.num_classes = num_classes
        self.k = k

    def params(self) -> dict:
        return {"k": self.k}

    def fields(self) -> dict[str, Field]:
        return {
            "logprobs": Field((self.k,), np.dtype("float16")),
            "ids": Field((self.k,), id_dtype(self.num_classes)),
            "tail": Field((), np.dtype("float32")),
        }

    def encode(self, logits: Tensor) -> dict[str, Tensor]:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top, ids = logp.topk(self.k, dim=-1)
        # log(1 - sum(top)) computed from the dropped entries directly: no cancellation for confident teachers.
        dropped = logp.scatter(-1, ids, float("-inf"))
        tail = torch.logsumexp(dropped, dim=-1)
        return {
            "logprobs": top.to(torch.float16),
            "ids": ids.to(torch.int16 if id_dtype(self.num_classes) == np.int16 else torch.int32),
            "tail": tail,
        }

    @staticmethod
    def dense_logits(targets: dict[str, Tensor]) -> Tensor:
        logp, ids = targets["logprobs"].float(), targets["ids"].long()
        tail = targets["tail"].float().clamp(min=MIN_TAIL)
        num_classes = int(targets["num_classes"].reshape(-1)[0])
        rest = num_classes - ids.shape[-1]
        fill = tail - math.log(rest) if rest > 0 else torch.full_like(tail, float("-inf"))
        dense = fill[..., None].expand(*ids.shape[:-1], num_classes).clone()
        return dense.scatter_(-1, ids, logp)


ENCODINGS = {"full": FullEncoding, "topk": TopKEncoding}


def make_encoding(name: str, num_classes: int, params: dict | None = None):
    params = dict(params or {})
    if name not in ENCODINGS:
        raise LogitcacheError(f"unknown encoding {name!r}; choose one of: {', '.join(ENCODINGS)}")
    return ENCODINGS[name](num_classes, **params)


def encoding_of(targets: dict[str, Tensor]):
    """The encoding class that produced a target dict, recognised by its field names."""
    keys = set(targets) - {"num_classes"}
    for cls in ENCODINGS.values():
        if keys == cls.field_names:
            return cls
    raise LogitcacheError(f"not a logitcache target dict (fields: {sorted(keys)})")


def dense_log_probs(targets: dict[str, Tensor], temperature: float = 1.0) -> Tensor:
    """Dense teacher log-probabilities ``[B, C]`` at ``temperature``, the tail restored as the encoding defines."""
    logits = encoding_of(targets).dense_logits(targets)
    return torch.log_softmax(logits / temperature, dim=-1)


def to_probs(targets: dict[str, Tensor], temperature: float = 1.0) -> Tensor:
    """Dense teacher probabilities ``[B, C]`` for a (collated) batch of cached targets."""
    return dense_log_probs(targets, temperature).exp()
