"""The encodings by name. ``@register`` adds one; the store, the CLI, the loss and verify all look them up here."""

from __future__ import annotations

from torch import Tensor

from ..errors import LogitcacheError
from .base import Encoding

ENCODINGS: dict[str, type[Encoding]] = {}
# what the reader adds to every target dict beyond the stored fields, so that batches decode alone: per-sample
# constants (an encoding's format details included) and rows of the cache's table (``Encoding.per_sample``)
CONSTANT_KEYS = frozenset({"num_classes", "temperature", "layout", "tail_shape"})


def register(cls: type[Encoding]) -> type[Encoding]:
    if cls.name in ENCODINGS:
        raise ValueError(f"encoding {cls.name!r} is registered twice")
    ENCODINGS[cls.name] = cls
    return cls


def encoding_class(name: str) -> type[Encoding]:
    if name not in ENCODINGS:
        raise LogitcacheError(f"unknown encoding {name!r}; choose one of: {', '.join(ENCODINGS)}")
    return ENCODINGS[name]


AUTO = "auto"
FEW_CLASSES = 32  # up to here every class is stored (``full``: 2 B per class); above, topk8 with its tail table


def auto_encoding(num_classes: int) -> str:
    """The default encoding for ``num_classes``: ``full`` where classes are few (every probability, a few dozen bytes
    per sample), ``topk8`` with its tail table and basis where they are many (the encoding the fidelity study finds
    closest to ``full`` for its bytes: docs, choosing an encoding), and ``headtail`` beyond the classes a tail table
    can hold, where sampled tail classes keep the tail's shape."""
    from .topk8 import MAX_TABLE_CLASSES

    if num_classes <= FEW_CLASSES:
        return "full"
    return "topk8" if num_classes <= MAX_TABLE_CLASSES else "headtail"


def make_encoding(name: str, num_classes: int, options: dict | None = None) -> Encoding:
    """A new encoding for a build; options not given take their defaults, ``k`` never above what the classes allow
    (``num_classes``; ``headtail``, which needs a tail, ``num_classes - 1``). ``name="auto"`` chooses by the number
    of classes (``auto_encoding``).

    Options of the *other* registered encodings are ignored, so one set of options can serve a loop over encodings
    (the CLI refuses them instead, as there they are a user's mistake); a name no encoding knows is an error.
    """
    options = dict(options or {})
    if name == AUTO:
        name = auto_encoding(num_classes)
    known = {key for cls in ENCODINGS.values() for key in cls.options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise LogitcacheError(f"no encoding has the option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    cls = encoding_class(name)
    if "k" in cls.options and "k" not in options:  # the default k fits the classes
        options["k"] = min(cls.options["k"].default, num_classes - (name == "headtail"))
    return cls(num_classes, **{k: v for k, v in options.items() if k in cls.options})


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


def to_probs(targets: dict[str, Tensor], temperature: float = 1.0) -> Tensor:
    """Dense teacher probabilities ``[B, C]`` for a (collated) batch of cached targets."""
    return dense_log_probs(targets, temperature).exp()
