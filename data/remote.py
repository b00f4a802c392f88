"""Shard sets at a URL: ``http(s)://…`` and ``s3://…`` natively, ``pipe:COMMAND`` through the user's own CLI.

``data.dir=https://host/corpus`` (or ``s3://bucket/corpus``) reads ``…/corpus/manifest.json``,
``…/tokenizer.json`` and each shard ``…/corpus/<file>`` as listed in the manifest.
``data.dir='pipe:aws s3 cp s3://b/corpus/{file} -'`` is webdataset's ``pipe:`` URL (a shell command
whose stdout is the file; exit status 0 required), extended to a directory: ``{file}`` stands for the
file's name in the shard set and is substituted, shell-quoted, for each file read (manifest,
tokenizer, shards).

What comes from libraries and what is added here:
- HTTP is urllib3 (pooled keep-alive connections, connect/read timeouts, redirects, a body cut
  short of its ``Content-Length`` raises). Not fsspec's HTTP filesystem: its aiohttp transfers run
  on an asyncio thread that costs the loader about twice urllib3's CPU per shard and contends for
  the GIL with it (benchmarks/README.md, remote shards).
- S3 is boto3 (:mod:`data.s3`: why boto3, and where its credentials, region and endpoint come from),
  except the shard GETs themselves: boto3 signs a URL (locally, with the user's credentials) and urllib3
  fetches it as any HTTP shard — botocore's own GET costs about twice the CPU a shard (benchmarks/README.md).
- ``pipe:`` runs like webdataset's ``gopen_pipe`` (``shell=True``), but through ``subprocess.run``:
  gopen's pipe has no timeout on a hung command and lets its stderr go past the error message.
- Hand-written, since none has them: the retry policy of :mod:`data.retry` (transient errors — resets,
  short reads, timeouts, 5xx, a failed command, a sha256 mismatch — retried with exponential backoff, a
  bounded number of times, then one ``RemoteUnavailable`` (a ``UserError``) naming the URL; never a
  skip), verification of every shard against the manifest before use, and the bounded cache of
  :mod:`data.shard_cache`.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from conf.errors import UserError
from data.retry import Permanent as _Permanent
from data.retry import RemoteUnavailable, retrying
from data.retry import Transient as _Transient
from data.s3 import SCHEME as S3
from data.s3 import S3Store, error_code, split_url
from data.shard_cache import ShardCache

__all__ = ["SCHEMES", "Remote", "RemoteOptions", "RemoteUnavailable", "is_remote"]
SCHEMES = ("http://", "https://", S3, "pipe:")
T = TypeVar("T")
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
    timeout_s: float = 120.0  # HTTP, S3: seconds without progress; pipe: seconds for the whole command
    backoff_s: float = 1.0  # the first retry's delay; doubled at each retry

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> RemoteOptions:
        """The options named in a ``data`` config node (or a mapping); absent keys keep defaults."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data and data[f.name] is not None})


def _http_response(pool: Any, method: str, url: str) -> Any:
    """One request; raises _Transient or _Permanent unless the answer is 200."""
    import urllib3

    try:
        response = pool.request(method, url, preload_content=True)
    except urllib3.exceptions.LocationValueError as exc:
        raise _Permanent(f"invalid URL ({exc})") from exc
    except urllib3.exceptions.HTTPError as exc:  # connect/read errors and timeouts, resets, short bodies
        reason = getattr(exc, "reason", None) or exc
        raise _Transient(f"{type(reason).__name__}: {reason}") from exc
    if response.status == 200:
        return response
    code = error_code(response.data)  # an S3 error's own code (NoSuchKey, SlowDown, …) says more
    if response.status == 404:
        raise _Permanent(f"not found ({code or 'HTTP 404'})")
    status = f"HTTP {response.status} {code or response.reason or ''}".strip()
    raise _Transient(status) if response.status >= 500 or response.status in (408, 429) else _Permanent(status)


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
        self._pool: tuple[int, Any] | None = None
        self.s3: tuple[S3Store, str, str] | None = None  # (store, bucket, prefix) of an s3:// shard set
        if location.startswith(S3):
            bucket, prefix = split_url(self.location, "data.dir")
            self.s3 = (S3Store(opts.retries, opts.backoff_s, opts.timeout_s), bucket, prefix)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None}  # a DataLoader worker opens its own connections

    def url(self, name: str) -> str:
        if self.pipe:
            return self.location.replace(FILE_FIELD, shlex.quote(name))
        return f"{self.location}/{name}"

    def _http(self) -> Any:
        """urllib3's connection pool of this process (a forked worker must not share its sockets).
        urllib3 retries nothing itself (the policy is :meth:`_retrying`'s) but follows redirects."""
        if self._pool is None or self._pool[0] != os.getpid():
            import urllib3

            t = self.options.timeout_s
            retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5)
            pool = urllib3.PoolManager(maxsize=8, retries=retries, timeout=urllib3.Timeout(connect=t, read=t))
            self._pool = (os.getpid(), pool)
        return self._pool[1]

    def _key(self, name: str) -> tuple[S3Store, str, str]:
        """(store, bucket, key) of file ``name`` of an s3:// shard set."""
        assert self.s3 is not None
        store, bucket, prefix = self.s3
        return store, bucket, f"{prefix}/{name}" if prefix else name

    def _attempt(self, name: str) -> bytes:
        """One try at the whole file; raises _Transient or _Permanent."""
        url = self.url(name)
        if self.s3 is not None:
            store, bucket, key = self._key(name)
            url = store.attempt(store.client.generate_presigned_url, "get_object", {"Bucket": bucket, "Key": key})
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
        return _http_response(self._http(), "GET", url).data

    def fetch(self, name: str, sha256: str | None = None, size: int = -1, what: str = "shard") -> bytes:
        """The bytes of file ``name``, checked against ``size`` and ``sha256`` when given (from
        the cache when it holds them)."""
        if sha256 and self.cache is not None:
            blob = self.cache.get(sha256)
            if blob is not None:
                if hashlib.sha256(blob).hexdigest() == sha256:
                    return blob
                self.cache.discard(sha256)

        def attempt() -> bytes:
            blob = self._attempt(name)
            if size >= 0 and len(blob) != size:
                raise _Transient(f"{len(blob)} bytes, manifest says {size}")
            if sha256 and hashlib.sha256(blob).hexdigest() != sha256:
                raise _Transient("sha256 mismatch")
            return blob

        blob = self._retrying(f"{what} {self.url(name)}", attempt)
        if sha256 and self.cache is not None:
            self.cache.put(sha256, blob)
        return blob

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        """``attempt()`` under :func:`data.retry.retrying` with ``data.retries`` and the backoff."""
        return retrying(what, attempt, self.options.retries, self.options.backoff_s)

    def sizes(self, names: list[str]) -> list[int] | None:
        """Each file's size from concurrent HEAD requests (None for ``pipe:``, which cannot stat):
        the cheap up-front check of ``data.shards.check_files``; a missing shard is named."""
        if self.pipe or not names:
            return None

        def head_attempt(name: str) -> int:
            if self.s3 is not None:
                store, bucket, key = self._key(name)
                return store.size(bucket, key)
            return int(_http_response(pool, "HEAD", url(name)).headers.get("Content-Length", -1))

        def head(name: str) -> int:
            try:
                return self._retrying(f"shard {self.url(name)}", lambda: head_attempt(name))
            except UserError as exc:
                raise UserError(str(exc).replace(": not found (HTTP 404)", ": missing")) from None

        pool, url = (None if self.s3 else self._http()), self.url
        with ThreadPoolExecutor(8) as heads:
            return list(heads.map(head, names))

    def download_metadata(self, names: tuple[str, ...]) -> Path:
        """``names`` (manifest, tokenizer) fetched into a private temporary directory, removed at exit:
        the code that reads a tokenizer or hashes a manifest reads local files, wherever the shards are."""
        blobs = {}
        for name in names:
            try:
                blobs[name] = self.fetch(name, what="data.dir file")
            except UserError as exc:
                hint = "; is data.dir a gpt-prepare output directory?" if ": not found (" in str(exc) else ""
                raise UserError(f"{exc}{hint}") from None
        local = Path(tempfile.mkdtemp(prefix="gpt-remote-data-"))
        atexit.register(shutil.rmtree, local, ignore_errors=True)
        for name, blob in blobs.items():
            (local / name).write_bytes(blob)
        return local
