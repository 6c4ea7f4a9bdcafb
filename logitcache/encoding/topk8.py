"""``topk8``: top-k in about half of ``topk``'s bytes: 8-bit log-probabilities, the narrowest ids, a 2-byte tail."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from logitcache.errors import LogitcacheError
from logitcache.encoding.base import MIN_TAIL, Encoding, Field, Option, steps_of, torch_dtype
from logitcache.encoding.registry import MAX_TABLE_CLASSES, register
from logitcache.encoding.topk import SOFT_TAIL_BETAS, TopKEncoding, topk_kept_mass

# 1: absolute 8-bit steps below the top log-probability; 2: the differences between consecutive ones (lossless)
LAYOUT = Option(2, "topk8 / headtail: how the 8-bit log-probabilities are stored", absent=1, low=1, cli=False)


TAIL_SHAPES = ("table", "flat")
PROBE_PER_CLASS = 64
MAX_TAIL_RANK = 64
FIT_BLOCK = 8192  # probe rows per block when fitting the table


def compact_id_dtype(num_classes: int) -> np.dtype:
    """uint8 ids up to 256 classes, then int16, then int32."""
    if num_classes <= 256:
        return np.dtype("uint8")
    return np.dtype("int16") if num_classes <= 1 << 15 else np.dtype("int32")


@register
class CompactTopKEncoding(Encoding):
    """The same information as ``topk`` (k largest log-probabilities, their ids, the tail's mass and its softened
    masses at T = 2, 4, 8), stored smaller:

    - ``q`` (uint8, k - 2 values): the log-probabilities below the top one, as ``lp_j = lp_0 - q_j * scale`` with
      ``scale = (lp_0 - lp_{k-1}) / 255``: ``q_0 = 0`` and ``q_{k-1} = 255`` hold by construction and are not stored;
      the rounding error is at most ``scale / 2`` in log space. Layout 2 (the default) stores the steps
      ``q_j - q_{j-1}`` instead, the same numbers: sorted values' steps are small and compress better; stores of
      layout 1 (recorded without ``layout``) still read;
    - ``scale`` and ``tail`` (float16); ``lp_0`` itself is not stored: the k probabilities and the tail sum to one;
    - ``ids`` in the narrowest integer type (uint8 up to 256 classes);
    - ``tail_soft8`` (uint8 x 3): ``log sum_j p_j^beta`` over the unstored classes lies between ``beta * tail`` and
      ``beta * tail + (1 - beta) * log(C - k)`` (power-mean inequalities); its position in that interval, 8 bits
      (layout 2: the first position, then each one's step from the previous, modulo 256: neighbours are close).

    Decoding rebuilds a ``topk`` target and uses its tail rule and KL, so it trains like ``topk`` at any temperature.

    The unstored classes' share (``tail_shape``): ``table`` (the default) spreads the tail's softened mass over them
    in the shape the teacher usually gives them when the sample's top class is c: a C x C table of the teacher's mean
    log-probabilities per top-1 class, fitted on a probe of view 0 before the build (``probe_size``) and stored once
    per cache (``tail_table``, docs/format.md); a batch carries each sample's row index (``tail_row``, its top class)
    and the loss expands the row from the table on the device (``KDLoss`` holds it as a buffer). ``flat`` (what stores
    without the option hold) spreads it equally, which at high T teaches a shape the teacher never had. A row can
    make an unstored class likelier than the k-th stored one; the decode keeps it so, because capping it there gives
    better targets offline but trains worse students (docs: choosing an encoding).

    A row is the teacher's *usual* tail for a top class; each sample's own differs from it. ``tail_rank`` r (default
    8) stores that difference too, as r int8 coefficients (``tail_coef``, with a float16 scale) of a basis fitted on
    the same probe: the leading principal directions of the probe's deviations from their rows, kept as r more rows
    of the table. A teacher's logits are a linear map of its penultimate features, so a few directions hold most of
    what a row misses, for r + 2 more bytes per sample; how much r directions hold depends on the teacher (more
    classes and wider features need more). The fidelity figures are in benchmarks/RESULTS.md.
    """

    name = "topk8"
    summary = "top-k in 8-bit log-probs with the narrowest ids (about half of topk's bytes)"
    values = "log-probs"
    options = {
        "k": Option(10, "topk / topk8 / headtail: entries kept per sample.", low=1),
        "layout": LAYOUT,
        "tail_shape": Option(
            "table",
            "topk8: how the unstored classes share the tail's mass: table (as the teacher usually spreads it for the "
            "sample's top class; a C x C table fitted on a probe of the teacher before the build, stored once) or "
            "flat (equally).",
            absent="flat",
        ),
        "tail_rank": Option(
            8,
            "topk8 with the tail table: also store each sample's own deviation from its row, as this many int8 "
            "coefficients of a basis fitted on the same probe (tail_rank + 2 B/sample; at most C - k - 1 are used); "
            "0 keeps the row alone.",
            absent=0,
            low=0,
        ),
    }
    field_names = frozenset({"ids", "q", "scale", "tail", "tail_soft8"})
    optional_field_names = frozenset({"tail_coef", "tail_coef_scale"})
    device_side = True
    # the options' values, set by ``Encoding.__init__``
    k: int
    layout: int
    tail_shape: str
    tail_rank: int

    def validate(self) -> None:
        check_layout(self.name, self.layout)
        if not 3 <= self.k <= self.num_classes:
            raise LogitcacheError(
                f"topk8 needs k between 3 and the number of classes ({self.num_classes}), got {self.k} (use topk)"
            )
        if self.tail_shape not in TAIL_SHAPES:
            raise LogitcacheError(f"topk8: tail_shape must be one of {', '.join(TAIL_SHAPES)}, got {self.tail_shape!r}")
        if self.tail_shape == "table" and self.num_classes > MAX_TABLE_CLASSES:
            size = 2 * self.num_classes**2 / 1e9
            raise LogitcacheError(
                f"topk8: tail_shape=table keeps a {self.num_classes} x {self.num_classes} table ({size:.1f} GB), too "
                f"large above {MAX_TABLE_CLASSES} classes; use tail_shape=flat, or headtail for the tail's shape"
            )

        if self.tail_rank > MAX_TAIL_RANK:
            raise LogitcacheError(f"topk8: tail_rank must be at most {MAX_TAIL_RANK}, got {self.tail_rank}")
        # The basis describes deviations from a table row, over the C - k unstored classes less their offset: more
        # coefficients than that describe nothing, so the rank is lowered to it (and to 0 without a table).
        self.tail_rank = min(self.tail_rank, max(0, self.num_classes - self.k - 1)) if self.tail_shape == "table" else 0

    def table_shape(self) -> tuple[int, ...] | None:
        # rows 0 .. C-1: the mean row per top-1 class; then the tail basis, one row per coefficient
        return (self.num_classes + self.tail_rank, self.num_classes) if self.tail_shape == "table" else None

    def probe_size(self, num_samples: int) -> int:
        # 64 per class on average: a row's means then carry 1/8 of the per-sample spread (rarely-top classes less)
        return min(num_samples, PROBE_PER_CLASS * self.num_classes)

    def fit_table(self, log_probs: Tensor) -> Tensor:
        """Row c: the teacher's mean log-probability of every class over the probe samples whose top class is c (the
        probe's overall mean for a class that is never on top). Float16: ~0.01-nat steps, far below its spread."""
        num_classes = log_probs.shape[1]
        top1 = log_probs.argmax(1)
        # float64 sums, a block of the probe at a time: a whole float64 copy of it is 8.6 GB at 4096 classes
        blocks = list(zip(log_probs.split(FIT_BLOCK), top1.split(FIT_BLOCK)))
        sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        for lp, top in blocks:
            sums.index_add_(0, top, lp.double())
        counts = torch.bincount(top1, minlength=num_classes).double()[:, None]
        overall = (sums.sum(0) / len(log_probs))[None].expand(num_classes, -1)
        rows = torch.where(counts > 0, sums / counts.clamp(min=1), overall).to(torch.float16)
        if not self.tail_rank:
            return rows
        # The basis: the leading principal directions of the probe's deviations from their rows (each centred, as
        # the decode renormalises the tail). A teacher's logits are a linear map of its features, so a few
        # directions hold most of what the rows miss (benchmarks/RESULTS.md).
        scatter = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        for lp, top in blocks:
            dev = lp.double() - rows.double()[top]
            dev -= dev.mean(1, keepdim=True)
            scatter += dev.T @ dev
        _, vectors = torch.linalg.eigh(scatter)  # ascending eigenvalues
        basis = vectors[:, -self.tail_rank :].flip(1).T
        return torch.cat([rows, basis.to(torch.float16)])

    def wire(self, fields: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(fields)
        if self.layout == 1:  # the same numbers as layout 2 stores them
            out["q"], out["tail_soft8"] = steps_of(fields["q"]), steps_of(fields["tail_soft8"])
        if self.tail_shape == "table" and self.k < self.num_classes:
            out["tail_row"] = fields["ids"][..., 0].clone()  # ids are sorted: the first is the top class
        return out

    @classmethod
    def needs_cache(cls, targets: dict[str, Tensor]) -> str:
        return "take their tail's shape from the cache's table" if "tail_row" in targets else ""

    @classmethod
    def for_targets(cls, targets: dict[str, Tensor], num_classes: int) -> "Encoding":
        cls.refuse_without_cache(targets)  # a batch with a table's row index needs that table
        return cls(num_classes, k=targets["ids"].shape[-1], tail_shape="flat")

    def tail_shape_of(self, targets: dict[str, Tensor], table: Tensor | None) -> Tensor | None:
        """Each sample's row of the table, with its own deviation when the store keeps one (``[B, C]``, on the
        batch's device), or None for a flat tail."""
        if "tail_row" not in targets:
            return None
        if table is None:
            raise LogitcacheError("topk8 targets with a tail table decode with the cache's table; none was given")
        shape = table[targets["tail_row"].long()].float()
        if "tail_coef" in targets:
            coef = targets["tail_coef"].float() * targets["tail_coef_scale"].float()[..., None]
            shape = shape + coef @ table[self.num_classes :].float()
        return shape

    def entries(self) -> int:
        return self.k

    def fields(self) -> dict[str, Field]:
        return {
            "ids": Field((self.k,), compact_id_dtype(self.num_classes)),
            "q": Field((self.k - 2,), np.dtype("uint8")),
            "scale": Field((), np.dtype("float16")),
            "tail": Field((), np.dtype("float16")),
            "tail_soft8": Field((len(SOFT_TAIL_BETAS),), np.dtype("uint8")),
            **(
                {
                    "tail_coef": Field((self.tail_rank,), np.dtype("int8")),
                    "tail_coef_scale": Field((), np.dtype("float16")),
                }
                if self.tail_rank
                else {}
            ),
        }

    def encode(
        self, logits: Tensor, generator: torch.Generator | None = None, table: Tensor | None = None
    ) -> dict[str, Tensor]:
        full = TopKEncoding(self.num_classes, self.k, True).encode(logits)
        lp = torch.log_softmax(logits.float(), dim=-1).topk(self.k, dim=-1).values  # exact, not the float16 copy
        spread = (lp[:, :1] - lp[:, -1:]).clamp(min=1e-3)
        scale = (spread / 255).to(torch.float16).float()  # quantize with the scale the decoder will see
        q = torch.round((lp[:, :1] - lp) / scale).clamp(0, 255)
        tail = full["tail"].clamp(min=MIN_TAIL)
        rest = self.num_classes - self.k
        soft = full["tail_soft"].float()
        if rest > 0:
            betas = torch.tensor(SOFT_TAIL_BETAS, device=logits.device)
            low, width = betas * tail[:, None], (1 - betas) * math.log(rest)
            pos = torch.round((soft - low) / width * 255).clamp(0, 255)
        else:
            pos = torch.zeros_like(soft)
        q = q[:, 1 : self.k - 1]
        if self.layout == 2:  # q is nondecreasing from q_0 = 0: its steps are in [0, 255] too
            q = torch.diff(q, dim=1, prepend=torch.zeros_like(q[:, :1]))
            pos = torch.diff(pos, dim=1, prepend=torch.zeros_like(pos[:, :1])) % 256
        return {
            "ids": full["ids"].long().to(torch_dtype(compact_id_dtype(self.num_classes))),
            "q": q.to(torch.uint8),
            "scale": scale[:, 0].to(torch.float16),
            "tail": tail.to(torch.float16),
            "tail_soft8": pos.to(torch.uint8),
            **(self._tail_coefficients(logits, full["ids"].long(), table) if self.tail_rank else {}),
        }

    def _tail_coefficients(self, logits: Tensor, ids: Tensor, table: Tensor | None) -> dict[str, Tensor]:
        """Each sample's deviation from its row, as least-squares coefficients of the table's basis over the unstored
        classes (plus a free offset, which the decode's normalisation absorbs), in int8 with a per-sample scale."""
        if table is None:
            raise LogitcacheError("topk8 with tail_rank encodes against the cache's table; none was given")
        c, r = self.num_classes, self.tail_rank
        table = table.to(logits.device).float()
        rows, basis = table[:c], table[c:]
        dev = torch.log_softmax(logits.float(), dim=-1) - rows[ids[:, 0]]
        unstored = torch.ones_like(dev).scatter_(1, ids, 0.0)
        m = torch.cat([basis.T, torch.ones(c, 1, device=dev.device)], dim=1)  # [C, r + 1]
        weighted = m.T[None] * unstored[:, None, :]  # [N, r + 1, C]
        gram = weighted @ m + 1e-6 * torch.eye(r + 1, device=dev.device)
        # solve_ex: no check of the factorisation on the host, so the build's device never waits here
        coef = torch.linalg.solve_ex(gram, (weighted @ dev[..., None]))[0][:, :r, 0]
        scale = (coef.abs().amax(1) / 127).to(torch.float16)
        steps = scale.float()[:, None]
        q = torch.where(steps > 0, torch.round(coef / steps.clamp(min=1e-30)), 0.0).clamp(-127, 127)
        return {"tail_coef": q.to(torch.int8), "tail_coef_scale": scale}

    @staticmethod
    def q_values(targets: dict[str, Tensor]) -> Tensor:
        """``q_1 .. q_{k-2}`` themselves (float) from wire targets (which hold their steps)."""
        return targets["q"].float().cumsum(-1)

    def as_topk(self, targets: dict[str, Tensor], table: Tensor | None = None) -> dict[str, Tensor]:
        """The equivalent ``topk`` target dict (float log-probabilities, ids, tail, tail_soft, and the table's row
        as ``tail_shape`` when the batch has one), every tensor on the batch's device."""
        ids = targets["ids"].long()
        scale = targets["scale"].float()[..., None]
        q = self.q_values(targets)
        zeros = q.new_zeros(*q.shape[:-1], 1)
        steps = torch.cat([zeros, q, torch.full_like(zeros, 255.0)], dim=-1)  # q_0 = 0 and q_{k-1} = 255
        tail = targets["tail"].float()
        # the top k and the tail sum to one: lp_0 = log(1 - e^tail) - logsumexp(-q * scale)
        lp0 = torch.log1p(-tail.exp().clamp(max=1 - 1e-6)) - torch.logsumexp(-steps * scale, dim=-1)
        out = {"logprobs": lp0[..., None] - steps * scale, "ids": ids, "tail": tail}
        rest = self.num_classes - ids.shape[-1]
        if rest > 0:
            pos = targets["tail_soft8"].float().cumsum(-1) % 256
            # each beta a host number: no constant tensor is copied to the device in the step
            soft = [b * tail + pos[..., j] / 255 * ((1 - b) * math.log(rest)) for j, b in enumerate(SOFT_TAIL_BETAS)]
            out["tail_soft"] = torch.stack(soft, dim=-1)
        else:
            out["tail_soft"] = tail.new_full((*tail.shape, len(SOFT_TAIL_BETAS)), MIN_TAIL)
        shape = self.tail_shape_of(targets, table)
        if shape is not None:
            out["tail_shape"] = shape
        return out

    def log_probs(self, targets: dict[str, Tensor], temperature: float, table: Tensor | None = None) -> Tensor:
        return TopKEncoding.log_probs(self, self.as_topk(targets, table), temperature)  # type: ignore[arg-type]

    def kl(
        self,
        student_logits: Tensor,
        targets: dict[str, Tensor],
        temperature: float,
        tail: str,
        table: Tensor | None = None,
    ) -> Tensor:
        topk = self.as_topk(targets, table)
        return TopKEncoding.kl(self, student_logits, topk, temperature, tail)  # type: ignore[arg-type]

    def flat_tail_share(self, targets: dict[str, Tensor], temperature: float) -> float | None:
        if self.tail_shape == "table":
            return None  # the tail keeps the teacher's usual shape
        return 1.0 - topk_kept_mass(self, self.as_topk(targets), temperature)  # type: ignore[arg-type]

    def compare(self, stored: dict[str, Tensor], fresh: dict[str, Tensor], fresh_log_p: Tensor) -> tuple[float, str]:
        if not torch.equal(stored["ids"], fresh["ids"]):
            return 0.0, f"stored top-k ids {stored['ids'].tolist()} != fresh {fresh['ids'].tolist()}"
        diff = float((self.q_values(stored) - self.q_values(fresh)).abs().max()) * float(stored["scale"])
        diff = max(diff, float((stored["tail"].float() - fresh["tail"].float()).abs()))
        return diff, ""


def check_layout(name: str, layout: int, newest: int = 2) -> None:
    if not 1 <= layout <= newest:
        known = " and ".join(map(str, range(1, newest + 1))).replace(" and ", ", ", newest - 2)
        raise LogitcacheError(
            f"{name}: this version of logitcache reads layouts {known}, the store has {layout} (upgrade)"
        )
