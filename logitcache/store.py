"""The on-disk cache: a Zarr v3 group. The format is specified in FORMAT.md; this module is its only writer and reader.

Work is done in *units*: one chunk of rows of one view. A unit's arrays are written first and then its flag in the
``complete`` array is set; both are whole-chunk writes, which LocalStore makes atomic (temp file + rename). So a unit
is either marked complete with all its data present, or it is recomputed on resume, and several processes can fill
disjoint units of one store without coordination.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from .encoding import Field, id_dtype, make_encoding
from .errors import LogitcacheError

FORMAT_VERSION = 2  # 2: top-k stores tail_soft; version 1 stores (without it) are still read
READABLE_VERSIONS = (1, 2)
ATTR_KEY = "logitcache"
COMPLETE = "complete"
LABELS = "labels"
CODECS = ("blosc-lz4", "zstd", "none")


def _compressors(codec: str, itemsize: int) -> list:
    # crc32c last: a damaged chunk fails loudly on read instead of decoding to wrong targets.
    if codec == "blosc-lz4":
        shuffle = BloscShuffle.bitshuffle if itemsize <= 2 else BloscShuffle.shuffle
        return [BloscCodec(cname="lz4", clevel=5, shuffle=shuffle, typesize=itemsize), Crc32cCodec()]
    if codec == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if codec == "none":
        return [Crc32cCodec()]
    raise LogitcacheError(f"unknown codec {codec!r}; choose one of: {', '.join(CODECS)}")


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


def open_group(path: str | os.PathLike, mode: str) -> zarr.Group:
    return zarr.open_group(str(path), mode=mode)


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
    path: str | os.PathLike, meta: dict[str, Any], fields: dict[str, Field], codec: str, labels: np.ndarray
) -> zarr.Group:
    layout = Layout(meta["num_views"], meta["num_samples"], meta["chunk_rows"])
    try:
        group = open_group(path, mode="w")
    except OSError as e:
        raise LogitcacheError(f"cannot create the cache at {path}: {e.strerror or e}") from None
    for name, field in fields.items():
        group.create_array(
            name,
            shape=(layout.num_views, layout.num_samples, *field.shape),
            chunks=(1, layout.chunk_rows, *field.shape),
            dtype=field.dtype,
            compressors=_compressors(codec, field.dtype.itemsize),
            fill_value=0,
            dimension_names=("view", "sample", *[f"dim{i}" for i in range(len(field.shape))]),
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
        data=labels.astype(id_dtype(meta["num_classes"])),
        chunks=(layout.chunk_rows,),
        compressors=_compressors(codec, 2),
        dimension_names=("sample",),
    )
    # Attributes last: a store without them is not a cache, so a crash during creation leaves nothing "valid".
    group.attrs[ATTR_KEY] = meta
    return group


def write_unit(
    group: zarr.Group, field_names: list[str], view: int, chunk: int, rows: tuple[int, int], data: dict[str, np.ndarray]
) -> None:
    start, stop = rows
    for name in field_names:
        group[name][view, start:stop] = data[name]
    group[COMPLETE][view, chunk] = 1


class Cache:
    """A read handle on a logitcache store. Reads whole chunks; decode with ``logitcache.to_probs``/``kd_loss``."""

    def __init__(self, path: str | os.PathLike, group: zarr.Group):
        self.path = str(path)
        self.group = group
        self.meta: dict[str, Any] = dict(group.attrs[ATTR_KEY])
        self.layout = Layout(self.meta["num_views"], self.meta["num_samples"], self.meta["chunk_rows"])
        self.encoder = make_encoding(
            self.meta["encoding"]["name"], self.meta["num_classes"], self.meta["encoding"]["params"]
        )
        self.field_names = sorted(self.encoder.fields())
        members = set(group.array_keys())
        missing = [n for n in (*self.field_names, COMPLETE, LABELS) if n not in members]
        if missing:
            raise LogitcacheError(f"{path} is damaged or from another version: missing array(s) {', '.join(missing)}")
        self._arrays = {name: group[name] for name in self.field_names}

    num_samples = property(lambda self: self.layout.num_samples)
    num_views = property(lambda self: self.layout.num_views)
    num_classes = property(lambda self: self.meta["num_classes"])
    chunk_rows = property(lambda self: self.layout.chunk_rows)
    encoding = property(lambda self: self.meta["encoding"]["name"])
    encoding_params = property(lambda self: dict(self.meta["encoding"]["params"]))

    def completion(self) -> np.ndarray:
        """``[views, chunks]`` booleans: which units are complete."""
        return self.group[COMPLETE][...].astype(bool)

    @property
    def is_complete(self) -> bool:
        return bool(self.completion().all())

    def require_complete(self) -> None:
        done = self.completion()
        if not done.all():
            raise LogitcacheError(
                f"cache {self.path} is incomplete ({int(done.sum())}/{done.size} chunks); "
                "finish it with `logitcache build ... --resume`"
            )

    def read(self, view: int, start: int = 0, stop: int | None = None) -> dict[str, torch.Tensor]:
        """Targets of samples ``[start, stop)`` of ``view``; aligned ranges read whole chunks only."""
        if not 0 <= view < self.num_views:
            raise LogitcacheError(f"view {view} out of range: the cache holds {self.num_views} views")
        stop = self.num_samples if stop is None else stop
        out = {
            name: torch.from_numpy(np.ascontiguousarray(arr[view, start:stop])) for name, arr in self._arrays.items()
        }
        for name, value in self.encoder.constants().items():
            out[name] = torch.full(
                (stop - start,), value, dtype=torch.int64 if isinstance(value, int) else torch.float32
            )
        return out

    def labels(self) -> torch.Tensor:
        """The dataset labels recorded at build time (``[N]``)."""
        return torch.from_numpy(self.group[LABELS][...].astype(np.int64))

    def read_chunk(self, view: int, chunk: int) -> dict[str, torch.Tensor]:
        return self.read(view, *self.layout.rows(chunk))

    def __getstate__(self) -> dict:
        # Travels as its path: each process (DataLoader workers under spawn) opens its own handle, because
        # remote filesystems (fsspec, s3fs) are not fork- or pickle-safe.
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], open_group(state["path"], mode="r"))

    def reopened(self) -> "Cache":
        return Cache(self.path, open_group(self.path, mode="r"))

    def __repr__(self) -> str:
        return (
            f"Cache({self.path!r}, encoding={self.encoding}{self.encoding_params}, views={self.num_views}, "
            f"samples={self.num_samples}, classes={self.num_classes})"
        )


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a cache written by ``build_cache``; a clear error if the path is not one."""
    if not is_url(path) and not Path(path).exists():
        raise LogitcacheError(f"no cache at {path}: the path does not exist")
    try:
        group = open_group(path, mode="r")
    except Exception as e:
        raise LogitcacheError(
            f"{path} is not a Zarr group, so not a logitcache store "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if ATTR_KEY not in group.attrs:
        raise LogitcacheError(f"{path} is a Zarr group without logitcache metadata (an unfinished or foreign store)")
    version = group.attrs[ATTR_KEY].get("format_version")
    if version not in READABLE_VERSIONS:
        raise LogitcacheError(
            f"{path} has format version {version}; this logitcache reads versions "
            + ", ".join(map(str, READABLE_VERSIONS))
        )
    return Cache(path, group)
