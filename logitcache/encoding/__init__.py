"""Soft targets <-> compact arrays, one module per encoding (docs/format.md describes what each stores).

An encoding turns a batch of teacher logits ``[B, C]`` into a dict of fixed-shape arrays (the "fields" stored per
sample) and such a dict, as a collated batch, back into teacher log-probabilities or a KD loss. Adding one is a new
``Encoding`` subclass decorated with ``@register`` (and imported below) plus its tests.
"""

from logitcache.encoding.base import MIN_TAIL, Encoding, Field, Option, dense_kl, id_dtype
from logitcache.encoding.registry import AUTO, ENCODINGS, WIRE_KEYS, auto_encoding, decoder, dense_log_probs
from logitcache.encoding.registry import encoding_class, encoding_of
from logitcache.encoding.registry import make_encoding, register, to_probs

# Imported for their @register; this order is the CLI's order of choices.
from logitcache.encoding.full import FullEncoding  # isort: skip
from logitcache.encoding.topk import SOFT_TAIL_BETAS, TAIL_MODES, TopKEncoding, topk_kept_mass  # isort: skip
from logitcache.encoding.sampled import SampledEncoding  # isort: skip
from logitcache.encoding.quantized import QuantizedEncoding  # isort: skip
from logitcache.encoding.topk8 import CompactTopKEncoding  # isort: skip
from logitcache.encoding.headtail import HeadTailEncoding  # isort: skip

__all__ = [
    "AUTO",
    "ENCODINGS",
    "MIN_TAIL",
    "SOFT_TAIL_BETAS",
    "TAIL_MODES",
    "CompactTopKEncoding",
    "Encoding",
    "Field",
    "FullEncoding",
    "HeadTailEncoding",
    "Option",
    "QuantizedEncoding",
    "SampledEncoding",
    "TopKEncoding",
    "WIRE_KEYS",
    "auto_encoding",
    "dense_kl",
    "decoder",
    "dense_log_probs",
    "encoding_class",
    "encoding_of",
    "id_dtype",
    "make_encoding",
    "register",
    "to_probs",
    "topk_kept_mass",
]
