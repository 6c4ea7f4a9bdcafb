"""What every encoding is: fields stored per sample, options, encode, decode, KL against a student, verification.

Pure tensor code: nothing here knows about Zarr or files. Stored numbers are at temperature 1 and the temperature is
chosen at training time, unless an encoding says otherwise (``stored_temperature``, ``check_temperature``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LogitcacheError

# Floor for a log leftover mass: keeps exp/log finite when a teacher puts (numerically) all mass in the stored entries.
MIN_TAIL = -80.0


@dataclass(frozen=True)
class Field:
    shape: tuple[int, ...]  # per-sample shape
    dtype: np.dtype


@dataclass(frozen=True)
class Option:
    """One build option of an encoding: the CLI's ``--NAME`` flag and ``build_cache``'s keyword are derived from it."""

    default: Any
    help: str
    absent: Any = None  # the value a store written before this option existed implies (None: the default)
    low: float | None = None  # smallest allowed value
    flags: str | None = None  # CLI flag declaration when not --NAME (e.g. "--soft-tail/--flat-tail")
    cli: bool = True  # False: recorded and settable from Python, but no flag (a storage detail, not a user's choice)


def id_dtype(num_classes: int) -> np.dtype:
    """The narrowest integer type that holds every class id (ids are most of a sparse cache's bytes)."""
    return np.dtype("int16") if num_classes <= 1 << 15 else np.dtype("int32")


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a NumPy dtype (the one conversion the encodings and the reader share)."""
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


def torch_id_dtype(num_classes: int) -> torch.dtype:
    return torch_dtype(id_dtype(num_classes))


def num_classes_of(targets: dict[str, Tensor]) -> int:
    return int(targets["num_classes"].reshape(-1)[0])


def uniforms(generator: torch.Generator | None, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Uniform numbers in [0, 1) for a sampling encoding, drawn on the generator's device (the CPU for the build's
    per-unit generators) and moved to ``device``: the same numbers whichever device encodes."""
    u = torch.rand(shape, generator=generator, device=generator.device if generator else None)
    if device.type == "cuda" and u.device.type == "cpu":
        return u.pin_memory().to(device, non_blocking=True)  # no stall of the teacher's stream
    return u.to(device)


def inverse_cdf(probs: Tensor, points: Tensor) -> Tensor:
    """The class at each of ``points`` (``[B, S]``, in [0, 1)) on the cumulative distribution of ``probs`` (``[B, C]``)
    in float64, so that a device's summation order moves a draw only when a point lies within ~1e-16 of a boundary."""
    cdf = probs.double().cumsum(-1)
    at = torch.searchsorted(cdf, points.double() * cdf[:, -1:], right=True)
    return at.clamp(max=probs.shape[-1] - 1)


class Encoding:
    """Base class. A subclass owns everything about its format: its options, its per-sample ``fields``, ``encode``
    (teacher logits -> fields), ``log_probs`` (fields -> dense log-probabilities), ``kl`` (the KD loss against student
    logits) and ``compare`` (stored against fresh targets, for ``verify``). Register it with ``@register`` and the
    store, the CLI, the loss and verify know it.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one sentence for --help
    values: ClassVar[str] = ""  # what the stored numbers are (recorded in the store's attributes)
    options: ClassVar[dict[str, Option]] = {}
    field_names: ClassVar[frozenset[str]] = frozenset()
    optional_field_names: ClassVar[frozenset[str]] = frozenset()  # fields a newer store adds; older stores lack them
    # Decoding is deterministic, so verify can require KL(fresh || stored) to equal the encoding's own loss.
    deterministic: ClassVar[bool] = True
    # ``encode`` runs on the logits' device and gives the same result on any device (up to float rounding): every
    # tensor it makes is on ``logits.device`` and its random numbers come from ``uniforms``. The build then encodes
    # on the teacher's accelerator; an encoding without this guarantee is encoded on the CPU.
    device_side: ClassVar[bool] = False

    def __init__(self, num_classes: int, *positional: Any, **options: Any):
        if len(positional) > len(self.options):
            raise TypeError(f"{type(self).__name__} takes at most {len(self.options)} options, got {len(positional)}")
        options = {**dict(zip(self.options, positional)), **options}  # positional: in declaration order
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) or "none"
            raise LogitcacheError(f"encoding {self.name} has no option {', '.join(unknown)} (its options: {takes})")
        self.num_classes = num_classes
        for key, opt in self.options.items():
            value: Any = options.get(key, opt.default)  # converted to the default's type below
            value = type(opt.default)(value) if value is not None else value
            if opt.low is not None and value < opt.low:
                raise LogitcacheError(f"{self.name}: {key} must be >= {opt.low:g}, got {value}")
            setattr(self, key, value)
        self.validate()

    @classmethod
    def from_store(cls, num_classes: int, params: dict) -> "Encoding":
        """The encoding as recorded in a store's attributes; options it predates take their ``absent`` value."""
        filled = {k: (o.absent if o.absent is not None else o.default) for k, o in cls.options.items()}
        return cls(num_classes, **{**filled, **params})

    def validate(self) -> None:
        """Checks between options and the number of classes (raise LogitcacheError)."""

    def params(self) -> dict:
        return {key: getattr(self, key) for key in self.options}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, {self.params()})"

    # --- temperature -------------------------------------------------------------------------------------------
    @property
    def stored_temperature(self) -> float:
        """The temperature of the stored numbers (recorded in the store)."""
        return 1.0

    def check_temperature(self, temperature: float) -> None:
        """Refuse (LogitcacheError) a training temperature these targets cannot serve."""

    def constants(self) -> dict[str, float]:
        """Per-sample constants added to every target dict at read time, so a batch decodes without the cache."""
        return {"num_classes": self.num_classes}

    def entries(self) -> int:
        """Numbers kept per sample (for bytes-per-entry figures)."""
        return self.num_classes

    # --- a table stored once per cache (optional) ----------------------------------------------------------------
    def table_shape(self) -> tuple[int, ...] | None:
        """Shape of the table this encoding keeps once per cache (fitted on a probe of the teacher before the build;
        the ``tail_table`` array of docs/format.md), or None: most encodings keep everything per sample."""
        return None

    def probe_size(self, num_samples: int) -> int:
        """How many samples of view 0 the table is fitted on."""
        return 0

    def fit_table(self, log_probs: Tensor) -> Tensor:
        """The table from the teacher's log-probabilities ``[P, C]`` on the probe."""
        raise NotImplementedError

    def per_sample(self, fields: dict[str, Tensor], table: Tensor | None) -> dict[str, Tensor]:
        """What the reader adds to a batch of stored ``fields`` from the cache's table, so that the batch decodes
        alone (none by default)."""
        return {}

    # --- the format ----------------------------------------------------------------------------------------------
    def fields(self) -> dict[str, Field]:
        raise NotImplementedError

    def encode(self, logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The stored fields of a batch of teacher ``logits``. An encoding that keeps a table (``table_shape``) is
        also given the cache's as ``table=`` (the stored one, which the reader decodes with)."""
        raise NotImplementedError

    @staticmethod
    def log_probs(targets: dict[str, Tensor], temperature: float) -> Tensor:
        """Dense teacher log-probabilities ``[B, C]`` at ``temperature`` from a collated batch of targets."""
        raise NotImplementedError

    # --- the loss ------------------------------------------------------------------------------------------------
    @classmethod
    def kl(cls, student_logits: Tensor, targets: dict[str, Tensor], temperature: float, tail: str) -> Tensor:
        """Per-sample ``KL(teacher_T || student_T)``; dense by default (sparse encodings avoid the dense tensor)."""
        log_p = cls.log_probs(targets, temperature)
        log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(1)

    def flat_tail_share(self, targets: dict[str, Tensor], temperature: float) -> float | None:
        """Mean share of the softened target that decoding spreads evenly over unstored classes (their shape lost);
        None for encodings that keep every class's own mass."""
        return None

    # --- verification --------------------------------------------------------------------------------------------
    def compare(self, stored: dict[str, Tensor], fresh: dict[str, Tensor], fresh_log_p: Tensor) -> tuple[float, str]:
        """One sample's stored target against the one encoded from a fresh teacher pass: ``(largest difference of
        a stored number, "")`` or ``(difference, why they cannot be the same teacher's)``."""
        diff = max(
            (
                float((stored[k].float() - fresh[k].float()).abs().max())
                for k in self.fields()
                if stored[k].is_floating_point()
            ),
            default=0.0,
        )
        return diff, ""
