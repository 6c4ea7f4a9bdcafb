"""Reading a store: ``open_cache`` and the ``Cache`` handle. Every read of a unit is checked against its checksum,
its presence and the digest recorded at build time; zarr reads a missing chunk as fill values, so the digest is what
makes a complete unit's contents provable."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.sync import sync  # zarr's own bridge from blocking code to its event loop (every Array method uses it)

from logitcache.encoding import Encoding, encoding_class
from logitcache.errors import LogitcacheError
from logitcache.store.meta import CacheMeta, json_digest
from logitcache.augment.mix import Mix
from logitcache.store.format import (
    ATTR_KEY, COMPLETE, DIGESTS, LABELS, META_DIGEST, READABLE_VERSIONS, TABLE, is_url, member_array, meta_layout,
    open_group, store_attributes,
)  # fmt: skip
from logitcache.store.integrity import DamagedCache, repair_hint, table_digest, unit_digest


class Cache:
    """A read handle on a logitcache store. Reads whole chunks; decode with ``KDLoss(cache)`` or ``kd_loss(...,
    cache=cache)``.

    Every read of a unit is checked: a checksum failure, a missing chunk file or contents that differ from the
    digest recorded at build time raise ``DamagedCache`` naming the array, view, chunk and samples.
    """

    def __init__(self, path: str | os.PathLike, group: zarr.Group):
        self.path = str(path)
        self.group = group
        attrs = store_attributes(group)
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
        self._arrays = {name: member_array(group, name) for name in self.field_names}
        self.has_digests = DIGESTS in members
        self._digests: dict[int, np.ndarray | None] = {}  # None: the view's digest chunk cannot be read
        self._table: torch.Tensor | None = None
        self._device_tables: dict[torch.device, torch.Tensor] = {}
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
        # per array: shape, chunks, dtype (None: any), shards (None: unsharded)
        expected: dict[str, tuple[tuple[int, ...], tuple[int, ...], np.dtype | None, tuple[int, ...] | None]] = {
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
            arr = member_array(self.group, name)
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
        flags = member_array(self.group, COMPLETE)
        try:
            return np.asarray(flags[...]).astype(bool)
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
        ``wire`` completes a batch of them)."""
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
        return out if fields_only else self.wire(out)

    def read_chunks(self, view: int, chunks: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """The stored fields of whole units ``chunks`` of ``view`` (scattered, any order; ``wire`` completes
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

    def wire(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch of stored ``fields`` as it travels to the loss (``Encoding.wire``): the stored fields in the
        encoding's newest layout, with its few per-sample extras; decoded with this cache's options and table
        (``kd_loss(..., cache=)``, ``KDLoss``). Every read path ends here, so a damaged table is named at the first
        read, before any target that needs it travels."""
        self.table()  # checked once per handle
        return self.encoding.wire(fields)

    def decode_table(self, device: torch.device) -> torch.Tensor | None:
        """The table on ``device`` (copied there once per handle), or None for an encoding that keeps none."""
        table = self.table()
        if table is None:
            return None
        copy = self._device_tables.get(device)
        if copy is None:
            copy = self._device_tables[device] = table.to(device)
        return copy

    def table(self) -> torch.Tensor | None:
        """The encoding's per-cache table (None when it keeps none), checked against its digest once per handle."""
        if self._table is None and self.encoding.table_shape() is not None:
            try:
                table = np.ascontiguousarray(member_array(self.group, TABLE)[...])
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
                self._digests[view] = np.asarray(member_array(self.group, DIGESTS)[view, :])
            except Exception:
                self._digests[view] = None  # a damaged digest chunk: find which, unit by unit
        row = self._digests[view]
        if row is not None:
            return int(row[chunk])
        try:
            return int(np.asarray(member_array(self.group, DIGESTS)[view, chunk]))
        except Exception as e:
            raise self._damaged(DIGESTS, view, chunk, f"its digest cannot be read ({_first_line(e)})") from None

    def _missing_chunk(self, view: int, chunk: int) -> str | None:
        """The first array (fields, then the digest) whose chunk file for this unit is absent or empty (an empty shard
        reads as fill values too); asked only after a digest mismatch, so the common path costs no extra request."""
        from zarr.core.sync import sync

        for name, arr in [*self._arrays.items(), (DIGESTS, member_array(self.group, DIGESTS))]:
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
            return torch.from_numpy(np.asarray(member_array(self.group, LABELS)[...]).astype(np.int64))
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
        type(self).__init__(self, state["path"], open_group(state["path"], mode="r"))

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
    version = store_attributes(group).get("format_version")
    if version not in READABLE_VERSIONS:
        raise LogitcacheError(
            f"{path} has format version {version}; this logitcache reads versions "
            + ", ".join(map(str, READABLE_VERSIONS))
        )
    return Cache(path, group)
