"""A bounded on-disk cache of verified remote shards (``data.cache_dir``, ``data.cache_bytes``).

Hand-written because webdataset's ``LRUCleanup`` deletes *any* file under its directory, after the
fact and by ctime, and fsspec's ``filecache`` has no byte bound and would keep unverified bytes.

- Entries are content-addressed: ``<sha256>.shard``, written only after the bytes matched the
  manifest's sha256, so one cache serves every URL and run of the same shards and a changed shard
  set can never be served stale. Reads re-verify (the reader hashes every shard it uses).
- Writes are atomic (a hidden temp file, then ``os.replace``): a killed run leaves no half entry
  that looks complete.
- The bound holds across the processes of a node sharing the directory: a put evicts least
  recently used entries (mtime, refreshed on every hit) under an ``flock`` until the new entry
  fits. Only files named like entries are counted or deleted; anything else in the directory
  is left alone. A shard larger than the whole cache is not cached.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path

from conf.errors import UserError
from data.safe_paths import is_sha256

SUFFIX = ".shard"
ENTRY = re.compile(r"^[0-9a-f]{64}\.shard$")
LOCK = ".gpt-shard-cache.lock"


class ShardCache:
    def __init__(self, directory: str | Path, capacity: int):
        self.directory, self.capacity = Path(directory).expanduser(), int(capacity)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"data.cache_dir={directory}: cannot create ({exc.strerror})") from exc

    def _path(self, sha256: str) -> Path:
        if not is_sha256(sha256):  # it becomes a path we read, write and delete: never "../x"
            raise UserError(f"data.cache_dir: {sha256!r} is not a sha256; refusing it as a cache entry name")
        return self.directory / f"{sha256}{SUFFIX}"

    def get(self, sha256: str) -> bytes | None:
        """The cached bytes (unverified: the caller hashes them), or None on a miss."""
        path = self._path(sha256)
        try:
            blob = path.read_bytes()
            os.utime(path)  # most recently used
        except OSError:  # a miss, or evicted by another process meanwhile
            return None
        return blob

    def discard(self, sha256: str) -> None:
        """Drop an entry that failed verification (a damaged disk, not ours to keep serving)."""
        with contextlib.suppress(OSError):
            self._path(sha256).unlink()

    def entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every entry, oldest first."""
        out = []
        for name in os.listdir(self.directory):
            if ENTRY.match(name):
                path = self.directory / name
                with contextlib.suppress(OSError):  # evicted meanwhile
                    st = path.stat()
                    out.append((st.st_mtime, st.st_size, path))
        return sorted(out)

    def used(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def put(self, sha256: str, blob: bytes) -> None:
        """Store verified bytes, evicting least recently used entries to stay within the bound.

        A full or read-only disk only costs the cache: the shard is already in memory."""
        if len(blob) > self.capacity:
            return
        target = self._path(sha256)
        tmp = self.directory / f".{sha256}.{os.getpid()}.tmp"
        try:
            with self._locked():
                if target.exists():
                    return
                entries = self.entries()
                used = sum(size for _, size, _ in entries)
                for _, size, path in entries:
                    if used + len(blob) <= self.capacity:
                        break
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    used -= size
                tmp.write_bytes(blob)
                os.replace(tmp, target)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
