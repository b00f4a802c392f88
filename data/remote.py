"""Shard sets at a URL: ``http(s)://…`` natively, ``pipe:COMMAND`` through the user's own CLI.

``data.dir=https://host/corpus`` reads ``…/corpus/manifest.json``, ``…/tokenizer.json`` and each
shard ``…/corpus/<file>`` as listed in the manifest. ``data.dir='pipe:aws s3 cp s3://b/corpus/{file} -'``
is webdataset's ``pipe:`` URL (a shell command whose stdout is the file; exit status 0 required),
extended to a directory: ``{file}`` stands for the file's name in the shard set and is substituted,
shell-quoted, for each file read (manifest, tokenizer, shards).

What comes from libraries and what is added here:
- HTTP is fsspec's ``HTTPFileSystem`` (aiohttp): pooled connections, timeouts, a body cut short of
  its ``Content-Length`` raises, 404 is ``FileNotFoundError``.
- ``pipe:`` runs like webdataset's ``gopen_pipe`` (``shell=True``), but through ``subprocess.run``:
  gopen's pipe has no timeout on a hung command and lets its stderr go past the error message.
- Hand-written, since neither has them: the retry policy (transient errors — resets, short reads,
  timeouts, 5xx, a failed command, a sha256 mismatch — retried with exponential backoff, a bounded
  number of times, then one ``UserError`` naming the URL; never a skip), verification of every
  shard against the manifest before use, and the bounded cache of :mod:`data.shard_cache`.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from conf.errors import UserError
from data.shard_cache import ShardCache

SCHEMES = ("http://", "https://", "pipe:")
FILE_FIELD = "{file}"


def is_remote(location: object) -> bool:
    """Whether ``data.dir`` (or a source's ``dir``) names a remote shard set rather than a directory."""
    return isinstance(location, str) and location.startswith(SCHEMES)


@dataclass(frozen=True)
class RemoteOptions:
    """The ``data.*`` keys of remote reading (defaults mirror ``conf/groups.py``'s ``DataConfig``)."""

    cache_dir: str | None = None  # an on-disk cache of verified shards; None: memory only
    cache_bytes: int = 10 * 2**30  # the cache's bound
    retries: int = 3  # retries after the first attempt of a file
    prefetch: int = 1  # shards read ahead per stream, in background threads
    timeout_s: float = 120.0  # HTTP: seconds without progress; pipe: seconds for the whole command
    backoff_s: float = 1.0  # the first retry's delay; doubled at each retry

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> RemoteOptions:
        """The options named in a ``data`` config node (or a mapping); absent keys keep defaults."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data and data[f.name] is not None})


class _Transient(Exception):
    """A failed attempt worth retrying; its message says what went wrong."""


class _Permanent(Exception):
    """A failed attempt that a retry cannot fix (404, 403, a malformed URL)."""


def _http_failure(exc: BaseException) -> Exception | None:
    """Classify an fsspec/aiohttp error: transient, permanent, or None when it is not a transfer error."""
    import asyncio

    import aiohttp

    if isinstance(exc, FileNotFoundError):
        return _Permanent("not found (HTTP 404)")
    if isinstance(exc, aiohttp.ClientResponseError):
        status = f"HTTP {exc.status} {exc.message}".strip()
        return _Transient(status) if exc.status >= 500 or exc.status in (408, 429) else _Permanent(status)
    if isinstance(exc, aiohttp.InvalidURL):
        return _Permanent(f"invalid URL ({exc})")
    if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError | ConnectionError | OSError):
        return _Transient(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return None


class Remote:
    """One remote shard set: fetches its files by name, verified, retried, through the cache."""

    def __init__(self, location: str, options: RemoteOptions | None = None):
        self.pipe = location.startswith("pipe:")
        if self.pipe and FILE_FIELD not in location:
            raise UserError(
                f"data.dir={location}: a pipe: command must contain {FILE_FIELD} where each file's name goes "
                f"(e.g. 'pipe:aws s3 cp s3://bucket/corpus/{FILE_FIELD} -')"
            )
        self.location = location if self.pipe else location.rstrip("/")
        self.options = options or RemoteOptions()
        opts = self.options
        if opts.retries < 0 or opts.prefetch < 0 or opts.timeout_s <= 0 or opts.cache_bytes < 1:
            raise UserError(f"data.*: retries, prefetch >= 0, timeout_s > 0 and cache_bytes >= 1 needed ({opts})")
        self.cache = ShardCache(opts.cache_dir, opts.cache_bytes) if opts.cache_dir else None
        self._fs: tuple[int, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}  # a DataLoader worker opens its own session

    def url(self, name: str) -> str:
        if self.pipe:
            return self.location.replace(FILE_FIELD, shlex.quote(name))
        return f"{self.location}/{name}"

    def _http(self) -> Any:
        """fsspec's HTTP filesystem of this process (a forked worker must not share aiohttp's session)."""
        if self._fs is None or self._fs[0] != os.getpid():
            import aiohttp
            import fsspec

            t = self.options.timeout_s
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)
            fs = fsspec.filesystem("http", skip_instance_cache=True, client_kwargs={"timeout": timeout})
            self._fs = (os.getpid(), fs)
        return self._fs[1]

    def _attempt(self, name: str) -> bytes:
        """One try at the whole file; raises _Transient or _Permanent."""
        url = self.url(name)
        if self.pipe:
            try:
                done = subprocess.run(
                    url[len("pipe:") :], shell=True, capture_output=True, timeout=self.options.timeout_s
                )
            except subprocess.TimeoutExpired as exc:
                raise _Transient(f"command timed out after {self.options.timeout_s:g} s") from exc
            if done.returncode:
                tail = done.stderr.decode(errors="replace").strip().splitlines()
                raise _Transient(f"command exited {done.returncode}" + (f" ({tail[-1].strip()})" if tail else ""))
            return done.stdout
        try:
            return self._http().cat_file(url)
        except Exception as exc:  # noqa: BLE001 - classified below, the rest re-raised
            failure = _http_failure(exc)
            if failure is None:
                raise
            raise failure from exc

    def fetch(self, name: str, sha256: str | None = None, size: int = -1, what: str = "shard") -> bytes:
        """The bytes of file ``name``, checked against ``size`` and ``sha256`` when given.

        A failed or mismatching attempt is retried ``retries`` times, after ``backoff_s``, then
        twice as long each time; then one ``UserError``: ``shard URL: <last reason> after N attempts``.
        """
        if sha256 and self.cache is not None:
            blob = self.cache.get(sha256)
            if blob is not None:
                if hashlib.sha256(blob).hexdigest() == sha256:
                    return blob
                self.cache.discard(sha256)
        attempts = self.options.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                blob = self._attempt(name)
                if size >= 0 and len(blob) != size:
                    raise _Transient(f"{len(blob)} bytes, manifest says {size}")
                if sha256 and hashlib.sha256(blob).hexdigest() != sha256:
                    raise _Transient("sha256 mismatch")
            except _Permanent as exc:
                raise UserError(f"{what} {self.url(name)}: {exc}") from None
            except _Transient as exc:
                reason = str(exc)
                if attempt < attempts:
                    time.sleep(self.options.backoff_s * 2 ** (attempt - 1))
                continue
            if sha256 and self.cache is not None:
                self.cache.put(sha256, blob)
            return blob
        raise UserError(f"{what} {self.url(name)}: {reason} after {attempts} attempts")

    def sizes(self, names: list[str]) -> list[int] | None:
        """Each file's size from one concurrent round of HEAD requests (None for ``pipe:``, which
        cannot stat): the cheap up-front check of ``data.shards.check_files``."""
        if self.pipe or not names:
            return None
        urls = [self.url(n) for n in names]
        attempts = self.options.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return [-1 if size is None else int(size) for size in self._http().sizes(urls)]
            except Exception as exc:  # noqa: BLE001 - classified below, the rest re-raised
                failure = _http_failure(exc)
                if failure is None:
                    raise
                if isinstance(exc, FileNotFoundError):
                    raise UserError(f"shard {exc.args[0] if exc.args else self.location}: missing") from None
                if isinstance(failure, _Permanent):
                    raise UserError(f"data.dir={self.location}: cannot stat its shards ({failure})") from None
                reason = str(failure)
            if attempt < attempts:
                time.sleep(self.options.backoff_s * 2 ** (attempt - 1))
        raise UserError(f"data.dir={self.location}: cannot stat its shards ({reason}) after {attempts} attempts")

    def download_metadata(self, names: tuple[str, ...]) -> Path:
        """``names`` (manifest, tokenizer) fetched into a private temporary directory, removed at exit:
        the code that reads a tokenizer or hashes a manifest reads local files, wherever the shards are."""
        blobs = {}
        for name in names:
            try:
                blobs[name] = self.fetch(name, what="data.dir file")
            except UserError as exc:
                hint = "; is data.dir a gpt-prepare output directory?" if "HTTP 404" in str(exc) else ""
                raise UserError(f"{exc}{hint}") from None
        local = Path(tempfile.mkdtemp(prefix="gpt-remote-data-"))
        atexit.register(shutil.rmtree, local, ignore_errors=True)
        for name, blob in blobs.items():
            (local / name).write_bytes(blob)
        return local
