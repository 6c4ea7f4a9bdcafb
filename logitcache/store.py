"""The on-disk cache: a Zarr v3 group, specified in docs/format.md; this module is its only writer and reader.

Work is done in *units*: one chunk of rows of one view. A unit's arrays are written first, then its digest (a crc32
of the decoded rows), then its flag in the ``complete`` array; all are whole-chunk writes, which LocalStore makes
atomic (temp file + rename). So a unit is either marked complete with all its data present, or it is recomputed on
resume, and several processes can fill disjoint units of one store without coordination.

Zarr reads a chunk that is not there as fill values. The digest is what makes a complete unit's contents provable:
every read of a unit compares the decoded rows with it, so a deleted, emptied, truncated or swapped chunk file is an
error naming the unit, never zeros passed off as targets.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import zlib
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec
from zarr.core.sync import sync  # zarr's own bridge from blocking code to its event loop (every Array method uses it)

from .encoding import Encoding, Field, encoding_class, id_dtype
from .errors import LogitcacheError
from .meta import DIGEST_KEY, CacheMeta, TableRecord, json_digest
from .mix import Mix

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


def table_digest(table: np.ndarray) -> str:
    """sha256 of a table's bytes (native little-endian, C order): what the attributes record and reads check."""
    return hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest()


def table_meta(table: np.ndarray, probe: int) -> TableRecord:
    """What the attributes record about an encoding's table: its probe and its digest."""
    return TableRecord(TABLE, probe, table_digest(table))


def meta_layout(meta: CacheMeta) -> Layout:
    return Layout(meta.num_views, meta.num_samples, meta.chunk_rows)


def unit_digest(rows: dict[str, np.ndarray]) -> int:
    """crc32 of a unit's decoded rows, field by field in name order (what `write_unit` records and reads check)."""
    crc = 0
    for name in sorted(rows):
        crc = zlib.crc32(np.ascontiguousarray(rows[name]).view(np.uint8).reshape(-1), crc)
    return crc


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
        group[name][view, start:stop] = data[name]
    if digests:
        rows_as_stored = {name: np.asarray(data[name], dtype=group[name].dtype) for name in field_names}
        group[DIGESTS][view, chunk] = unit_digest(rows_as_stored)
    group[COMPLETE][view, chunk] = 1


class DamagedCache(LogitcacheError):
    """A complete unit whose stored bytes are not what the build wrote: never trained on. ``why`` is the reason
    alone (the message adds where and what to run); constructible from the message only, as DataLoader re-raises it."""

    def __init__(self, message: str, why: str = ""):
        super().__init__(message)
        self.why = why or message


def repair_hint(path: str) -> str:
    return (
        f"repair it with the same `logitcache build` command plus --resume --repair (recomputes only the damaged "
        f"chunks), or list every damaged chunk with `logitcache verify {path} --storage-only`"
    )


class Cache:
    """A read handle on a logitcache store. Reads whole chunks; decode with ``logitcache.to_probs``/``kd_loss``.

    Every read of a unit is checked: a checksum failure, a missing chunk file or contents that differ from the
    digest recorded at build time raise ``DamagedCache`` naming the array, view, chunk and samples.
    """

    def __init__(self, path: str | os.PathLike, group: zarr.Group):
        self.path = str(path)
        self.group = group
        attrs = dict(group.attrs[ATTR_KEY])
        self._check_metadata_digest(attrs)  # before anything is read from the metadata
        self.meta = CacheMeta.from_json(attrs, str(path))
        self.layout = meta_layout(self.meta)
        self.encoding: Encoding = encoding_class(self.meta.encoding.name).from_store(
            self.meta.num_classes, self.meta.encoding.params
        )
        self.field_names = sorted(self.encoding.fields())
        members = set(group.array_keys())
        missing = [n for n in (*self.field_names, COMPLETE, LABELS) if n not in members]
        if missing:
            raise LogitcacheError(f"{path} is damaged or from another version: missing array(s) {', '.join(missing)}")
        self._arrays = {name: group[name] for name in self.field_names}
        self.has_digests = DIGESTS in members
        self._digests: dict[int, np.ndarray] = {}
        self._table: torch.Tensor | None = None
        self._validate(members)

    def _check_metadata_digest(self, attrs: dict[str, Any]) -> None:
        version = attrs.get("format_version", 0)
        recorded = attrs.get(META_DIGEST)
        if (isinstance(version, int) and version >= 3 or recorded is not None) and recorded != json_digest(attrs):
            raise LogitcacheError(
                f"{self.path}: the cache's metadata (Zarr attributes) were edited after the build, so nothing in it "
                "can be trusted; rebuild it with `logitcache build ... --overwrite`"
            )

    def _validate(self, members: set[str]) -> None:
        """The attributes must describe these arrays: an edited attribute or a mixed-up store is refused here."""
        if self.meta.format_version >= 3 and not self.has_digests:
            raise LogitcacheError(f"{self.path} is damaged: the '{DIGESTS}' array is missing; rebuild with --overwrite")
        fields = self.encoding.fields()
        v, n, rows, chunks = self.num_views, self.num_samples, self.chunk_rows, self.layout.num_chunks
        inner = self.meta.inner_chunk_rows
        expected = {
            name: ((v, n, *f.shape), (1, inner or rows, *f.shape), f.dtype, (1, rows, *f.shape) if inner else None)
            for name, f in fields.items()
        }
        expected[COMPLETE] = ((v, chunks), (1, 1), np.dtype("uint8"), None)
        expected[LABELS] = ((n,), (rows,), None, None)
        if self.has_digests:
            expected[DIGESTS] = ((v, chunks), (1, 1), np.dtype("uint32"), None)
        table = self.encoding.table_shape()
        if table is not None:
            if TABLE not in members or self.meta.table is None:
                raise LogitcacheError(
                    f"{self.path} is damaged: its encoding keeps a table ('{TABLE}') and the store has none recorded "
                    "or stored; rebuild it with `logitcache build ... --overwrite`"
                )
            expected[TABLE] = (table, table, np.dtype("float16"), None)
        for name, (shape, chunk_shape, dtype, shard_shape) in expected.items():
            arr = self.group[name]
            problems = []
            if tuple(arr.shape) != shape:
                problems.append(f"shape {tuple(arr.shape)}, expected {shape}")
            if tuple(arr.chunks) != chunk_shape:
                problems.append(f"chunks {tuple(arr.chunks)}, expected {chunk_shape}")
            if (tuple(arr.shards) if arr.shards else None) != shard_shape:
                problems.append(f"shards {arr.shards}, expected {shard_shape}")
            if dtype is not None and arr.dtype != dtype:
                problems.append(f"dtype {arr.dtype}, expected {dtype}")
            if problems:
                raise LogitcacheError(
                    f"{self.path}: array '{name}' does not match the cache's metadata ({'; '.join(problems)}): "
                    "the attributes or the arrays were changed after the build; rebuild with --overwrite"
                )

    num_samples = property(lambda self: self.layout.num_samples)
    num_views = property(lambda self: self.layout.num_views)
    num_classes = property(lambda self: self.meta.num_classes)
    chunk_rows = property(lambda self: self.layout.chunk_rows)

    def completion(self) -> np.ndarray:
        """``[views, chunks]`` booleans: which units are complete (a flag that cannot be read counts as not)."""
        flags = self.group[COMPLETE]
        try:
            return flags[...].astype(bool)
        except Exception:  # one damaged flag chunk: find it unit by unit, and treat it as unfinished work
            done = np.zeros(flags.shape, dtype=bool)
            for v, c in np.ndindex(*flags.shape):
                try:
                    done[v, c] = bool(flags[v, c])
                except Exception:
                    pass
            return done

    @property
    def is_complete(self) -> bool:
        return bool(self.completion().all())

    def require_complete(self) -> None:
        done = self.completion()
        if not done.all():
            v, c = (int(i) for i in np.argwhere(~done)[0])
            raise LogitcacheError(
                f"cache {self.path} is incomplete ({int(done.sum())}/{done.size} chunks; first missing: view {v}, "
                f"chunk {c}); finish it with `logitcache build ... --resume`"
            )

    def read_chunk(self, view: int, chunk: int) -> dict[str, torch.Tensor]:
        """The targets of one unit, checked against its digest."""
        return self.read(view, *self.layout.rows(chunk))

    def read(
        self, view: int, start: int = 0, stop: int | None = None, fields_only: bool = False
    ) -> dict[str, torch.Tensor]:
        """Targets of samples ``[start, stop)`` of ``view``: the whole chunks that hold them are read (one Zarr call
        per field, which fetches chunks concurrently) and each is checked against its digest. The one way targets
        are read from the store. ``fields_only``: the stored fields alone (what the view buffers and the ring hold;
        ``with_constants`` completes a batch of them)."""
        if not 0 <= view < self.num_views:
            raise LogitcacheError(f"view {view} out of range: the cache holds {self.num_views} views")
        stop = self.num_samples if stop is None else stop
        first, last = start // self.chunk_rows, max(start, stop - 1) // self.chunk_rows
        lo, hi = self.layout.rows(first)[0], self.layout.rows(last)[1]
        rows: dict[str, np.ndarray] = {}
        for name, arr in self._arrays.items():
            try:
                rows[name] = np.ascontiguousarray(arr[view, lo:hi])
            except Exception as e:  # zarr raises plain ValueErrors for crc32c or decompression failures
                if first == last:
                    raise self._damaged(name, view, first, f"it cannot be decoded ({_first_line(e)})") from None
                for c in range(first, last + 1):  # find and name the damaged unit
                    self.read_chunk(view, c)
                raise
        if self.has_digests:
            for c in range(first, last + 1):
                a, b = (r - lo for r in self.layout.rows(c))
                self._check_digest(view, c, {name: x[a:b] for name, x in rows.items()})
        out = {name: torch.from_numpy(x[start - lo : stop - lo]) for name, x in rows.items()}
        return out if fields_only else self.with_constants(out)

    def read_chunks(self, view: int, chunks: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """The stored fields of whole units ``chunks`` of ``view`` (scattered, any order; ``with_constants`` completes
        them), each checked against its digest, all fetched and decoded concurrently: the ring reads a window of
        shuffled units this way (one call per unit and field costs several times more)."""
        if not 0 <= view < self.num_views:
            raise LogitcacheError(f"view {view} out of range: the cache holds {self.num_views} views")
        spans = [self.layout.rows(c) for c in chunks]

        async def every_unit():
            reads = [arr.async_array.getitem((view, slice(a, b))) for arr in self._arrays.values() for a, b in spans]
            return await asyncio.gather(*reads, return_exceptions=True)

        results = sync(every_unit())
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:  # zarr's plain errors for crc32c or decompression failures: find and name the unit
            for c in chunks:
                self.read_chunk(view, c)
            raise failed
        out = []
        for j, (c, (a, b)) in enumerate(zip(chunks, spans)):
            rows = {name: np.ascontiguousarray(results[i * len(spans) + j]) for i, name in enumerate(self._arrays)}
            if self.has_digests:
                self._check_digest(view, c, rows)
            out.append({name: torch.from_numpy(x) for name, x in rows.items()})
        return out

    def with_constants(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch of stored ``fields`` as a target dict: with the encoding's per-sample constants and its rows of the
        cache's table (``Encoding.per_sample``), so that it decodes alone. Every read path ends here."""
        rows = len(next(iter(fields.values())))
        constants = {
            name: torch.full((rows,), value, dtype=torch.int64 if isinstance(value, int) else torch.float32)
            for name, value in self.encoding.constants().items()
        }
        return {**fields, **constants, **self.encoding.per_sample(fields, self.table())}

    def table(self) -> torch.Tensor | None:
        """The encoding's per-cache table (None when it keeps none), checked against its digest once per handle."""
        if self._table is None and self.encoding.table_shape() is not None:
            try:
                table = np.ascontiguousarray(self.group[TABLE][...])
                differs = self.meta.table is None or table_digest(table) != self.meta.table.sha256
                why = "its contents differ from the digest recorded at build time" if differs else ""
            except Exception as e:  # a crc32c or decompression failure (a missing chunk file reads as zeros: digest)
                why = f"it cannot be decoded ({_first_line(e)})"
            if why:
                raise DamagedCache(
                    f"cache {self.path} is damaged: array '{TABLE}' (the encoding's table, which every target decodes "
                    f"with): {why}; rebuild it with `logitcache build ... --overwrite`",
                    why=f"array '{TABLE}': {why}",
                )
            self._table = torch.from_numpy(table)
        return self._table

    def view_nbytes(self) -> int:
        """Decoded bytes of one view's targets (what holding a view in memory costs)."""
        return self.num_samples * sum(f.dtype.itemsize * int(np.prod(f.shape)) for f in self.encoding.fields().values())

    def take(
        self,
        view: int,
        indices: Sequence[int],
        read_chunk: Callable[[int, int], dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The targets of samples ``indices`` (any order) of ``view``, batched: one gather per chunk and field.

        ``read_chunk(view, chunk)`` supplies whole chunks (default: ``read_chunk``, checked); a reader with a chunk
        cache passes its own. The one way targets are gathered by index (the dataset's batches, verify's pairs).
        """
        read_chunk = read_chunk or self.read_chunk
        idx = torch.as_tensor(indices, dtype=torch.int64)
        chunk_of = idx // self.chunk_rows
        out: dict[str, torch.Tensor] = {}
        for chunk in chunk_of.unique().tolist():
            rows = read_chunk(view, chunk)
            where = (chunk_of == chunk).nonzero().squeeze(1)
            offsets = idx[where] - chunk * self.chunk_rows
            for name, t in rows.items():
                if name not in out:
                    out[name] = t.new_empty((len(idx), *t.shape[1:]))
                out[name][where] = t[offsets]
        return out

    def _check_digest(self, view: int, chunk: int, rows: dict[str, np.ndarray]) -> None:
        recorded = self._unit_digest(view, chunk)
        if recorded is not None and unit_digest(rows) != recorded:
            name = self._missing_chunk(view, chunk)
            why = (
                f"array '{name}': its chunk file is missing or empty (Zarr would read it as zeros)"
                if name
                else "its contents differ from the digest recorded at build time (a replaced or rewritten chunk)"
            )
            raise self._damaged(name, view, chunk, why)

    def _unit_digest(self, view: int, chunk: int) -> int | None:
        if view not in self._digests:
            try:
                self._digests[view] = self.group[DIGESTS][view, :]
            except Exception:
                self._digests[view] = None  # a damaged digest chunk: find which, unit by unit
        row = self._digests[view]
        if row is not None:
            return int(row[chunk])
        try:
            return int(self.group[DIGESTS][view, chunk])
        except Exception as e:
            raise self._damaged(DIGESTS, view, chunk, f"its digest cannot be read ({_first_line(e)})") from None

    def _missing_chunk(self, view: int, chunk: int) -> str | None:
        """The first array (fields, then the digest) whose chunk file for this unit is absent or empty (an empty shard
        reads as fill values too); asked only after a digest mismatch, so the common path costs no extra request."""
        from zarr.core.sync import sync

        for name, arr in [*self._arrays.items(), (DIGESTS, self.group[DIGESTS])]:
            key = f"{arr.store_path.path}/{arr.metadata.encode_chunk_key((view, chunk, *([0] * (arr.ndim - 2))))}"
            store = arr.store_path.store
            if not sync(store.exists(key)) or sync(store.getsize(key)) == 0:
                return name
        return None

    def _damaged(self, name: str | None, view: int, chunk: int, why: str) -> DamagedCache:
        start, stop = self.layout.rows(chunk)
        where = f"view {view}, chunk {chunk} (samples {start}-{stop - 1})"
        if name and not why.startswith("array"):
            why = f"array '{name}': {why}"
        return DamagedCache(f"cache {self.path} is damaged at {where}: {why}; {repair_hint(self.path)}", why=why)

    def scan(self) -> list[tuple[int, int, str]]:
        """``(view, chunk, why)`` for every unit that is not complete or whose stored data fail their checks.

        Reads every chunk once (no teacher): what ``verify --storage-only`` reports and ``build --repair`` redoes.
        """
        bad = []
        try:
            self.table()
        except DamagedCache as e:  # every unit decodes with the table: listed first, as view -1
            bad.append((-1, -1, e.why))
        done = self.completion()
        for v, c in np.ndindex(*done.shape):
            if not done[v, c]:
                bad.append((v, c, "incomplete (not marked complete)"))
                continue
            try:
                self.read_chunk(v, c)
            except DamagedCache as e:
                bad.append((v, c, e.why))
        return bad

    @property
    def mix(self) -> Mix:
        """The Mixup/CutMix the teacher's images were mixed with (``Mix()``, none, for a store without mixing)."""
        return self.meta.mix

    def labels(self) -> torch.Tensor:
        """The dataset labels recorded at build time (``[N]``)."""
        try:
            return torch.from_numpy(self.group[LABELS][...].astype(np.int64))
        except Exception as e:
            raise DamagedCache(
                f"cache {self.path} is damaged: array '{LABELS}' cannot be read ({_first_line(e)}); "
                f"{repair_hint(self.path)}"
            ) from None

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
            f"Cache({self.path!r}, encoding={self.encoding.name}{self.encoding.params()}, views={self.num_views}, "
            f"samples={self.num_samples}, classes={self.num_classes})"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


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
