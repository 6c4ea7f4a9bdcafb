"""The store's format and its writer: constants, the unit layout, codec chains, creating a store and writing a unit
(docs/format.md). A unit's arrays are written first, then its digest, then its flag in ``complete``: all whole-chunk
writes, which LocalStore makes atomic, so a unit is either complete with all its data or recomputed on resume, and
several processes fill disjoint units of one store without coordination."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from logitcache.encoding import Field, id_dtype
from logitcache.errors import LogitcacheError
from logitcache.store.meta import DIGEST_KEY, CacheMeta, TableRecord
from logitcache.store.integrity import table_digest, unit_digest

# 2: top-k stores tail_soft. 3: per-unit digests, chunks always written, a digest of the metadata.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ATTR_KEY = "logitcache"
COMPLETE = "complete"
DIGESTS = "digests"
LABELS = "labels"
TABLE = "tail_table"
META_DIGEST = DIGEST_KEY
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
CODECS = ("blosc-lz4", "zstd", "none")


def check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise LogitcacheError(f"unknown codec {codec!r}; choose one of: {', '.join(CODECS)}")


def _compressors(codec: str, itemsize: int) -> list:
    # crc32c last: a damaged chunk fails loudly on read instead of decoding to wrong targets.
    if codec == "blosc-lz4":
        shuffle = BloscShuffle.bitshuffle if itemsize <= 2 else BloscShuffle.shuffle
        return [BloscCodec(cname="lz4", clevel=5, shuffle=shuffle, typesize=itemsize), Crc32cCodec()]
    if codec == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    check_codec(codec)
    return [Crc32cCodec()]


@dataclass(frozen=True)
class Layout:
    num_views: int
    num_samples: int
    chunk_rows: int

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_rows)

    def rows(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_samples)


def is_url(path: str | os.PathLike) -> bool:
    """Remote stores are fsspec URLs (``s3://...``, ``gs://...``, ``memory://...``); options such as an S3
    endpoint come from fsspec's environment configuration (e.g. ``FSSPEC_S3_ENDPOINT_URL``)."""
    return "://" in str(path)


# zarr's access modes: read, read/write, create or open, overwrite, create (fail if present)
Mode = Literal["r", "r+", "a", "w", "w-"]


def open_group(path: str | os.PathLike, mode: Mode) -> zarr.Group:
    return zarr.open_group(str(path), mode=mode)


def member_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a store's group (a missing one raises KeyError, as ``group[name]`` does); a member that
    is a group instead is a LogitcacheError: the store is damaged or foreign."""
    member = group[name]
    if not isinstance(member, zarr.Array):
        raise LogitcacheError(f"{group.store_path}: '{name}' is a group, not an array; the store is damaged or foreign")
    return member


def store_attributes(group: zarr.Group) -> dict[str, Any]:
    """A copy of the store's logitcache attributes (``ATTR_KEY``, a missing one raises KeyError); a value that is not
    a JSON object is a LogitcacheError: the store is damaged or foreign."""
    attrs = group.attrs[ATTR_KEY]
    if not isinstance(attrs, Mapping):
        raise LogitcacheError(
            f"{group.store_path}: the '{ATTR_KEY}' attribute is not a JSON object; the store is damaged"
        )
    return dict(attrs)


def is_store(path: str | os.PathLike) -> bool:
    try:
        group = open_group(path, mode="r")
    except Exception:
        return False
    return ATTR_KEY in group.attrs


def remove_store(path: str | os.PathLike) -> None:
    """Delete a cache; refuses anything that is not one, so ``--overwrite`` cannot wipe an unrelated folder."""
    if is_url(path):
        if is_store(path):
            open_group(path, mode="w")  # mode "w" clears the remote prefix
        return
    p = Path(path)
    if not p.exists():
        return
    if p.is_dir() and not any(p.iterdir()):
        return
    if not is_store(p):
        raise LogitcacheError(f"{p} exists and is not a logitcache store; refusing to overwrite it")
    shutil.rmtree(p)


def create_store(
    path: str | os.PathLike,
    meta: CacheMeta,
    fields: dict[str, Field],
    codec: str,
    labels: np.ndarray,
    table: np.ndarray | None = None,
) -> zarr.Group:
    """A new, empty store (units to be written by ``write_unit``); ``table``: the encoding's per-cache table, whose
    digest ``meta`` records (``table_meta``)."""
    layout = meta_layout(meta)
    try:
        group = open_group(path, mode="w")
    except OSError as e:
        raise LogitcacheError(f"cannot create the cache at {path}: {e.strerror or e}") from None
    inner = meta.inner_chunk_rows
    for name, field in fields.items():
        group.create_array(
            name,
            shape=(layout.num_views, layout.num_samples, *field.shape),
            # sharded: a unit is one shard object of inner chunks (still one writer per object); else one chunk
            chunks=(1, inner or layout.chunk_rows, *field.shape),
            shards=(1, layout.chunk_rows, *field.shape) if inner else None,
            dtype=field.dtype,
            compressors=_compressors(codec, field.dtype.itemsize),
            fill_value=0,
            dimension_names=("view", "sample", *[f"dim{i}" for i in range(len(field.shape))]),
            config={"write_empty_chunks": True},  # every unit's chunk exists, zeros included
        )
    group.create_array(
        DIGESTS,
        shape=(layout.num_views, layout.num_chunks),
        chunks=(1, 1),
        dtype="uint32",
        compressors=[Crc32cCodec()],
        fill_value=0,
        dimension_names=("view", "chunk"),
        config={"write_empty_chunks": True},
    )
    group.create_array(
        COMPLETE,
        shape=(layout.num_views, layout.num_chunks),
        chunks=(1, 1),
        dtype="uint8",
        compressors=[Crc32cCodec()],
        fill_value=0,
        dimension_names=("view", "chunk"),
    )
    group.create_array(
        LABELS,
        data=labels.astype(id_dtype(meta.num_classes)),
        chunks=(layout.chunk_rows,),
        compressors=_compressors(codec, 2),
        dimension_names=("sample",),
    )
    if table is not None:
        group.create_array(TABLE, data=table, chunks=table.shape, compressors=_compressors(codec, table.dtype.itemsize))
    # Attributes last: a store without them is not a cache, so a crash during creation leaves nothing "valid".
    group.attrs[ATTR_KEY] = meta.attribute()
    return group


def table_meta(table: np.ndarray, probe: int) -> TableRecord:
    """What the attributes record about an encoding's table: its probe and its digest."""
    return TableRecord(TABLE, probe, table_digest(table))


def meta_layout(meta: CacheMeta) -> Layout:
    return Layout(meta.num_views, meta.num_samples, meta.chunk_rows)


def write_unit(
    group: zarr.Group,
    field_names: list[str],
    view: int,
    chunk: int,
    rows: tuple[int, int],
    data: dict[str, np.ndarray],
    digests: bool = True,
) -> None:
    """One unit: its rows in every field array, then its digest (``digests``: false only when resuming a store of
    version 2 or older, which has none), then its completion flag."""
    start, stop = rows
    for name in field_names:
        member_array(group, name)[view, start:stop] = data[name]
    if digests:
        rows_as_stored = {name: np.asarray(data[name], dtype=member_array(group, name).dtype) for name in field_names}
        member_array(group, DIGESTS)[view, chunk] = unit_digest(rows_as_stored)
    member_array(group, COMPLETE)[view, chunk] = 1
