"""The on-disk cache: a Zarr v3 group, specified in docs/format.md; this package is its only writer and
reader: ``format`` (the format and its writer), ``reader`` (``Cache``), ``integrity`` (digests and damage).

Work is done in *units*: one chunk of rows of one view. A unit's arrays are written first, then its digest (a crc32
of the decoded rows), then its flag in the ``complete`` array; all are whole-chunk writes, which LocalStore makes
atomic (temp file + rename). So a unit is either marked complete with all its data present, or it is recomputed on
resume, and several processes can fill disjoint units of one store without coordination.

Zarr reads a chunk that is not there as fill values. The digest is what makes a complete unit's contents provable:
every read of a unit compares the decoded rows with it, so a deleted, emptied, truncated or swapped chunk file is an
error naming the unit, never zeros passed off as targets.
"""

from logitcache.store.format import (
    ATTR_KEY, CODECS, COMPLETE, DIGESTS, FORMAT_VERSION, LABELS, META_DIGEST, OUT_OF_SPACE, READABLE_VERSIONS, TABLE,
    Layout, check_codec, create_store, is_store, is_url, member_array, meta_layout, open_group, remove_store,
    store_attributes, table_meta, write_unit,
)  # fmt: skip
from logitcache.store.integrity import DamagedCache, repair_hint, table_digest, unit_digest
from logitcache.store.reader import Cache, open_cache

__all__ = [
    "ATTR_KEY", "CODECS", "COMPLETE", "DIGESTS", "FORMAT_VERSION", "LABELS", "META_DIGEST", "OUT_OF_SPACE",
    "READABLE_VERSIONS", "TABLE", "Layout", "check_codec", "create_store", "is_store", "is_url", "member_array",
    "meta_layout", "open_group", "remove_store", "store_attributes", "table_meta", "write_unit", "DamagedCache",
    "repair_hint", "table_digest", "unit_digest", "Cache", "open_cache",
]  # fmt: skip
