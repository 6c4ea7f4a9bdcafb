"""Integrity of a stored unit: its digest (a crc32 of the decoded rows), the table's digest, and the error a damaged
unit raises, naming the array, view, chunk and samples."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

from logitcache.errors import LogitcacheError


def table_digest(table: np.ndarray) -> str:
    """sha256 of a table's bytes (native little-endian, C order): what the attributes record and reads check."""
    return hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest()


def unit_digest(rows: dict[str, np.ndarray]) -> int:
    """crc32 of a unit's decoded rows, field by field in name order (what `write_unit` records and reads check)."""
    crc = 0
    for name in sorted(rows):
        crc = zlib.crc32(np.ascontiguousarray(rows[name]).view(np.uint8).reshape(-1).data, crc)
    return crc


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
