"""The encodings by name. ``@register`` adds one; the store, the CLI, the loss and verify all look them up here."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from logitcache.errors import LogitcacheError
from logitcache.encoding.base import Encoding

ENCODINGS: dict[str, type[Encoding]] = {}
# what a batch of wire targets carries beyond the stored fields (``Encoding.wire``): the draws' temperature
# (``sampled``, ``headtail``) and the table's row index (``topk8`` with its tail table)
WIRE_KEYS = frozenset({"temperature", "tail_row"})


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
MAX_TABLE_CLASSES = 4096  # topk8's C x C float16 tail table: 34 MB at 4096 classes, 954 MB at 21,841
FEW_CLASSES = 32  # up to here every class is stored (``full``: 2 B per class); above, topk8 with its tail table


def auto_encoding(num_classes: int) -> str:
    """The default encoding for ``num_classes``: ``full`` where classes are few (every probability, a few dozen bytes
    per sample), ``topk8`` with its tail table and basis where they are many (the encoding the fidelity study finds
    closest to ``full`` for its bytes: docs, choosing an encoding), and ``headtail`` beyond the classes a tail table
    can hold, where sampled tail classes keep the tail's shape."""
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
    keys = set(targets) - WIRE_KEYS
    for cls in ENCODINGS.values():
        if cls.field_names <= keys <= cls.field_names | cls.optional_field_names:
            return cls
    raise LogitcacheError(f"not a logitcache target dict (fields: {sorted(keys)})")


def decoder(
    targets: dict[str, Tensor], num_classes: int | None = None, cache: Any = None
) -> tuple[Encoding, Tensor | None]:
    """The encoding that decodes a batch of wire ``targets`` and the table it decodes with (on the batch's device).

    ``cache``: an ``Encoding``, a ``Cache``, a ``CachedKDDataset`` or a ``KDLoss`` (anything with ``.encoding``, and
    ``decode_table(device)`` where a table is kept): its options and table decode the batch. Without it the batch
    decodes alone, with its encoding's defaults at ``num_classes`` (what ``encode`` with defaults makes; a batch that
    needs its cache's table is refused). Host work only: nothing is read from the batch's tensors.
    """
    if cache is None:
        cls = encoding_of(targets)
        if num_classes is None:
            num_classes = _classes_in(targets)
        return cls.for_targets(targets, num_classes), None
    cache = getattr(cache, "cache", cache)  # a CachedKDDataset: its store handle
    if isinstance(cache, Encoding):
        return cache, None
    device = next(iter(targets.values())).device
    table_of = getattr(cache, "decode_table", None)
    return cache.encoding, table_of(device) if table_of is not None else None


def _classes_in(targets: dict[str, Tensor]) -> int:
    for name in ("logits", "q"):  # full, quantized: one stored number per class
        if name in targets and targets[name].dim() == 2 and "ids" not in targets:
            return targets[name].shape[-1]
    raise LogitcacheError("how many classes these targets have is not in them: pass num_classes= or cache=")


def dense_log_probs(
    targets: dict[str, Tensor], temperature: float = 1.0, *, cache: Any = None, num_classes: int | None = None
) -> Tensor:
    """Dense teacher log-probabilities ``[B, C]`` at ``temperature``, the tail restored as the encoding defines
    (``cache`` / ``num_classes``: as for ``decoder``)."""
    encoding, table = decoder(targets, num_classes, cache)
    return encoding.log_probs(targets, temperature, table)


def to_probs(
    targets: dict[str, Tensor], temperature: float = 1.0, *, cache: Any = None, num_classes: int | None = None
) -> Tensor:
    """Dense teacher probabilities ``[B, C]`` for a (collated) batch of cached targets."""
    return dense_log_probs(targets, temperature, cache=cache, num_classes=num_classes).exp()
