"""A folder that every process of a sequence reaches, on a local or shared filesystem or in an object store.

Concurrent processes (on one machine or several) coordinate through one atomic primitive, ``create``: write an
object only if it does not exist yet, whole or not at all. On a filesystem it is a hard link of a finished temporary
file (atomic on local disks and on NFS, where ``O_EXCL`` is not always); on an object store, a conditional put
(``If-None-Match: *``, which S3 and S3-compatible servers honour), read back so that a server ignoring the condition
is caught. Everything else is a whole-object write, a read, a listing or a removal. ``age`` compares an object's
modification time with a probe's written just now, both stamped by the same server, so no two machines' clocks are
ever compared and nothing relies on appends.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from logitcache.errors import LogitcacheError

_TRIES = 5  # a conditional put that conflicts with a concurrent one (S3's 409) is tried again


class SharedFolder:
    """``root``: a local path or an fsspec URL (``s3://bucket/prefix``, ``memory://...``); names are ``/``-separated
    paths inside it."""

    def __init__(self, root: str | os.PathLike):
        from logitcache.store import is_url

        self.remote = is_url(str(root))
        self.fs: Any = None
        if self.remote:
            import fsspec

            self.root = str(root).rstrip("/")
            self.fs, self._path = fsspec.core.url_to_fs(self.root)
        else:
            self.root = str(Path(root).resolve())  # records hold absolute paths: any process, any working directory
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return self.root

    def path(self, name: str) -> str:
        """The local path or URL of ``name``."""
        return f"{self.root}/{name}"

    def _fs_path(self, name: str) -> str:
        return f"{self._path}/{name}"

    def create(self, name: str, data: bytes) -> bool:
        """Write ``name`` if it does not exist (atomically, whole): True if this call created it. ``data`` should be
        unique to the caller (a host and process id): it is read back to catch a server that ignores the condition."""
        if not self.remote:
            target = Path(self.root, name)
            tmp = self._tmp(target, data)
            try:
                os.link(tmp, target)
                return True
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
        for attempt in range(_TRIES):
            try:
                self.fs.pipe_file(self._fs_path(name), data, mode="create")
                return self.read(name) == data
            except FileExistsError:
                return False
            except OSError as e:  # a conflicting concurrent put (409), or a 412 that does not name its condition
                if self.read(name) is not None:
                    return False
                if attempt == _TRIES - 1:
                    raise LogitcacheError(f"cannot create {self.path(name)}: {e}") from None
                time.sleep(0.05 * 2**attempt)
        return False

    def write(self, name: str, data: bytes) -> None:
        """Replace ``name`` whole (readers see the old bytes or the new, never a part)."""
        if self.remote:
            self.fs.pipe_file(self._fs_path(name), data)
            return
        target = Path(self.root, name)
        os.replace(self._tmp(target, data), target)

    def read(self, name: str) -> bytes | None:
        """The bytes of ``name``, or None when it does not exist."""
        try:
            if self.remote:
                return bytes(self.fs.cat_file(self._fs_path(name)))
            return Path(self.root, name).read_bytes()
        except FileNotFoundError:
            return None

    def names(self, folder: str) -> list[str]:
        """The names of the objects directly in ``folder`` (sorted; temporary files left out)."""
        if self.remote:
            self.fs.invalidate_cache()  # another process may have written since the last listing
            try:
                entries = self.fs.ls(self._fs_path(folder), detail=False)
            except FileNotFoundError:
                return []
            names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        else:
            try:
                names = os.listdir(Path(self.root, folder))
            except FileNotFoundError:
                return []
        return sorted(n for n in names if not n.startswith("."))

    def remove(self, name: str) -> None:
        try:
            if self.remote:
                self.fs.rm_file(self._fs_path(name))
            else:
                Path(self.root, name).unlink()
        except FileNotFoundError:
            pass

    def prune(self, folder: str) -> None:
        """Remove ``folder`` if it is empty (an object store has no empty folders)."""
        if not self.remote:
            try:
                os.rmdir(Path(self.root, folder))
            except OSError:
                pass  # not empty, or already gone

    def age(self, name: str) -> float | None:
        """Seconds since ``name`` was last written, by the clock of the server that stamps both it and a probe
        written now (None when it does not exist)."""
        probe = f".clock/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.write(probe, b"")
        try:
            return self._modified(probe) - self._modified(name)
        except FileNotFoundError:
            return None
        finally:
            self.remove(probe)

    def _modified(self, name: str) -> float:
        if self.remote:
            self.fs.invalidate_cache(self._fs_path(name))
            stamp = self.fs.modified(self._fs_path(name))
            return stamp.timestamp()
        return Path(self.root, name).stat().st_mtime

    @staticmethod
    def _tmp(target: Path, data: bytes) -> Path:
        tmp = target.with_name(f".{target.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")
        for attempt in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                f = open(tmp, "wb")
                break
            except FileNotFoundError:  # another process pruned the (empty) folder between the two calls
                if attempt == 2:
                    raise
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp
