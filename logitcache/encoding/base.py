"""What every encoding is: fields stored per sample, options, encode, decode, KL against a student, verification.

Pure tensor code: nothing here knows about Zarr or files. Stored numbers are at temperature 1 and the temperature is
chosen at training time, unless an encoding says otherwise (``stored_temperature``, ``check_temperature``).

Device-clean: decoding makes every tensor on its inputs' device and never reads a device value on the host. What a
decode needs beyond the batch's tensors (the number of classes, the format's options, the cache's table) are host
numbers and buffers of the ``Encoding`` instance, never per-sample tensors on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from logitcache.errors import LogitcacheError

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


def dense_kl(log_p: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample ``KL(p || softmax(student / T))`` for dense teacher log-probabilities ``log_p`` (``-inf`` allowed)."""
    p = log_p.exp()
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return torch.where(p > 0, p * (log_p - log_q), p.new_zeros(())).sum(1)  # classes with p = 0 add nothing


def steps_of(values: Tensor) -> Tensor:
    """uint8 ``values`` (nondecreasing along the last axis, or positions modulo 256) as their steps from the previous
    one (the first from 0), modulo 256: how layout 2 stores what layout 1 stored as it is."""
    v = values.to(torch.int16)
    return (torch.diff(v, dim=-1, prepend=torch.zeros_like(v[..., :1])) % 256).to(torch.uint8)


class Encoding:
    """Base class. A subclass owns everything about its format: its options, its per-sample ``fields``, ``encode``
    (teacher logits -> fields), ``log_probs`` (fields -> dense log-probabilities), ``kl`` (the KD loss against student
    logits) and ``compare`` (stored against fresh targets, for ``verify``). Register it with ``@register`` and the
    store, the CLI, the loss and verify know it.

    Decoding is an instance's: ``log_probs`` and ``kl`` read the number of classes and the options from ``self`` and
    the cache's table from ``table=`` (on the batch's device), so a batch carries its stored fields alone. ``wire``
    gives the fields as they travel from the store to the loss (one format per encoding, whichever layout the store
    keeps); ``for_targets`` is the decoder of a batch that decodes alone (its defaults).
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

    def wire(self, fields: dict[str, Tensor]) -> dict[str, Tensor]:
        """A batch of stored ``fields`` as it travels to the loss: the fields in this version's newest layout (the
        same numbers; a store of an older layout is converted on the host), plus what the decode needs per sample
        that the fields do not hold (``WIRE_KEYS``). Never a dense row: expansion happens on the device, in the loss.
        Identity by default."""
        return fields

    @classmethod
    def for_targets(cls, targets: dict[str, Tensor], num_classes: int) -> "Encoding":
        """The decoder of a batch of wire ``targets`` without its cache: this encoding's defaults at ``num_classes``
        (every option that decides the decode travels with the batch). Refuses (LogitcacheError) a batch that needs
        its cache (``needs_cache``)."""
        cls.refuse_without_cache(targets)
        return cls(num_classes)

    @classmethod
    def needs_cache(cls, targets: dict[str, Tensor]) -> str:
        """Why a batch cannot decode without its cache ("" when it can)."""
        return ""

    @classmethod
    def refuse_without_cache(cls, targets: dict[str, Tensor]) -> None:
        why = cls.needs_cache(targets)
        if why:
            raise LogitcacheError(
                f"these {cls.name} targets {why}: pass the cache (lc.kd_loss(..., cache=ds) or lc.KDLoss(ds))"
            )

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

    # --- the format ----------------------------------------------------------------------------------------------
    def fields(self) -> dict[str, Field]:
        raise NotImplementedError

    def encode(self, logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The stored fields of a batch of teacher ``logits``. An encoding that keeps a table (``table_shape``) is
        also given the cache's as ``table=`` (the stored one, which the reader decodes with)."""
        raise NotImplementedError

    def log_probs(self, targets: dict[str, Tensor], temperature: float, table: Tensor | None = None) -> Tensor:
        """Dense teacher log-probabilities ``[B, C]`` at ``temperature`` from a collated batch of wire targets
        (``table``: the cache's, on the batch's device, for an encoding that keeps one)."""
        raise NotImplementedError

    # --- the loss ------------------------------------------------------------------------------------------------
    def kl(
        self,
        student_logits: Tensor,
        targets: dict[str, Tensor],
        temperature: float,
        tail: str,
        table: Tensor | None = None,
    ) -> Tensor:
        """Per-sample ``KL(teacher_T || student_T)``; dense by default (sparse encodings avoid the dense tensor)."""
        return dense_kl(self.log_probs(targets, temperature, table), student_logits, temperature)

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
