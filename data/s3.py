"""``s3://bucket/key`` through boto3, for gpt-prepare's inputs and outputs and for training's shards.

boto3 rather than s3fs: it is synchronous like the HTTP path's urllib3 (s3fs runs aiobotocore on an
asyncio thread, the per-shard CPU cost measured for fsspec's HTTP in benchmarks/README.md), and
botocore itself reads the standard AWS setup — ``AWS_ACCESS_KEY_ID`` / ``AWS_PROFILE`` /
``~/.aws/credentials``, ``AWS_REGION``, ``~/.aws/config``, ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for S3-compatible stores — so a user's existing setup works unchanged.

botocore retries nothing here (``total_max_attempts=1``): every call goes through the one policy of
:mod:`data.retry`, and its failures are sorted into transient (5xx, throttling, resets, timeouts,
short reads) and permanent (not found, access denied, no credentials).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from conf.errors import UserError
from data.retry import Permanent, Transient, retrying

SCHEME = "s3://"
T = TypeVar("T")
# botocore reads these when it makes a client: a change (a test's local server) gets a new client
_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")  # fmt: skip
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}
_CLIENTS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def is_s3(location: object) -> bool:
    return isinstance(location, str) and location.startswith(SCHEME)


def split_url(url: str, key: str = "input") -> tuple[str, str]:
    """``s3://bucket/a/b/`` → ``("bucket", "a/b")``; a URL without a bucket is refused in one line."""
    bucket, _, prefix = url[len(SCHEME) :].partition("/")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
        raise UserError(f"{key}={url}: expected s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


def _client(timeout_s: float) -> Any:
    """One boto3 client per process (a forked worker must not share its connections), timeout and
    AWS environment; botocore clients are thread-safe, their creation is not."""
    cache_key = (os.getpid(), timeout_s, *(os.environ.get(k) for k in _ENV))
    with _LOCK:
        if cache_key not in _CLIENTS:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
                retries={"total_max_attempts": 1},  # the policy is data/retry.py's
                max_pool_connections=16,
            )
            _CLIENTS[cache_key] = boto3.session.Session().client("s3", config=config)
        return _CLIENTS[cache_key]


def failure(exc: BaseException) -> Transient | Permanent:
    """What a failed boto3 call was: worth a retry or not, in a few words."""
    from botocore.exceptions import (
        ClientError,
        FlexibleChecksumError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404"):
            return Permanent(f"not found ({'HTTP 404' if code in ('', '404') else code})")
        if status == 412 or code == "PreconditionFailed":
            return Permanent("changed while being read (its ETag is another now); run again")
        text = f"HTTP {status} {code}".strip()
        if status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES:
            return Transient(text)
        message = error.get("Message")
        return Permanent(f"{text}: {message}" if message else text)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return Permanent(f"{exc} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    if isinstance(exc, FlexibleChecksumError):  # the body does not match the checksum the store keeps
        return Transient("checksum mismatch")
    if isinstance(exc, ParamValidationError):
        return Permanent(f"invalid request ({str(exc).splitlines()[-1].strip()})")
    return Transient(f"{type(exc).__name__}: {exc}")


def error_code(body: bytes) -> str:
    """The ``<Code>`` of an S3 error response's XML body, or ``''``."""
    match = re.search(rb"<Code>([A-Za-z0-9.]{1,64})</Code>", body[:4096]) if body.startswith(b"<?xml") else None
    return match[1].decode() if match else ""


def _errors() -> tuple[type[BaseException], ...]:
    import urllib3
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, urllib3.exceptions.HTTPError, OSError)


@dataclass(frozen=True)
class S3Object:
    """One object, as listed: what gpt-prepare reads as an input file (a ``Path`` for local ones)."""

    bucket: str
    key: str
    size: int
    etag: str  # identifies the content: a finished input changed since is refused on resume
    store: S3Store = field(compare=False, repr=False)  # how it is read (retries, timeouts)

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class S3Store:
    """Calls to S3 with one retry policy: ``retries`` after the first attempt, backoff from ``backoff_s``."""

    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 120.0

    def attempt(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One call, its failure raised as :class:`Transient` or :class:`Permanent`."""
        try:
            return call(*args, **kwargs)
        except _errors() as exc:
            raise failure(exc) from exc

    def retried(self, what: str, call: Callable[[], T]) -> T:
        return retrying(what, lambda: self.attempt(call), self.retries, self.backoff_s)

    @property
    def client(self) -> Any:
        return _client(self.timeout_s)

    def get(self, bucket: str, key: str) -> bytes:
        """One attempt at a whole object (the caller retries, after checking what came)."""
        return self.attempt(lambda: self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def size(self, bucket: str, key: str) -> int:
        """One attempt at an object's size (a HEAD request)."""
        return int(self.attempt(self.client.head_object, Bucket=bucket, Key=key)["ContentLength"])

    def head(self, bucket: str, key: str) -> S3Object | None:
        """The object at ``key``, or None when there is none."""
        try:
            head = self.retried(f"{SCHEME}{bucket}/{key}", lambda: self.client.head_object(Bucket=bucket, Key=key))
        except UserError as exc:
            if "not found (HTTP 404)" in str(exc):
                return None
            raise
        return S3Object(bucket, key, int(head["ContentLength"]), head.get("ETag", ""), self)

    def list(self, bucket: str, prefix: str) -> list[S3Object]:
        """Every object whose key starts with ``prefix``, in key order."""

        def listing() -> list[S3Object]:
            found = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    found.append(S3Object(bucket, item["Key"], int(item["Size"]), item.get("ETag", ""), self))
            return found

        return self.retried(f"{SCHEME}{bucket}/{prefix}", listing)

    def read_text(self, obj: S3Object) -> str:
        return self.retried(obj.url, lambda: self.get(obj.bucket, obj.key)).decode("utf-8", "replace")

    def open(self, obj: S3Object) -> io.BufferedReader:
        """A buffered, seekable reader of ``obj`` that never holds the whole object (:class:`S3Reader`)."""
        return io.BufferedReader(S3Reader(obj), buffer_size=1 << 20)

    def put_file(self, bucket: str, key: str, path: Path) -> None:
        def put() -> None:
            with open(path, "rb") as body:
                self.client.put_object(Bucket=bucket, Key=key, Body=body)

        self.retried(f"{SCHEME}{bucket}/{key}", put)

    def put_bytes(self, bucket: str, key: str, blob: bytes) -> None:
        self.retried(f"{SCHEME}{bucket}/{key}", lambda: self.client.put_object(Bucket=bucket, Key=key, Body=blob))

    def delete(self, bucket: str, keys: Iterable[str]) -> None:
        """Delete exactly ``keys`` (a thousand a request, S3's limit); a key already gone is fine."""
        keys = sorted(keys)
        for start in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}

            def delete(batch: dict = batch) -> None:
                errors = self.client.delete_objects(Bucket=bucket, Delete=batch).get("Errors", [])
                if errors:
                    first = errors[0]
                    raise Transient(f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".strip())

            self.retried(f"{SCHEME}{bucket}/{keys[start]}", delete)


class S3Reader(io.RawIOBase):
    """A readable, seekable view of one object that never holds it whole.

    Sequential reads stream one GET from the current position; a seek drops it and the next read
    opens a ranged GET there (Parquet reads its footer, then each row group's column). A reset
    mid-object is retried from the current position, not from the start, with the store's policy;
    every GET is conditional on the listed ETag, so an object replaced mid-read is named, not mixed.
    """

    def __init__(self, obj: S3Object) -> None:
        super().__init__()
        self.obj, self.position, self.body = obj, 0, None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.obj.size}[whence]
        position = max(base + offset, 0)
        if position != self.position:
            self._drop()
            self.position = position
        return position

    def readinto(self, buffer: Any) -> int:
        if self.position >= self.obj.size or len(buffer) == 0:
            return 0
        obj, store = self.obj, self.obj.store

        def attempt() -> bytes:
            try:
                if self.body is None:
                    condition = {"IfMatch": obj.etag} if obj.etag else {}
                    response = store.client.get_object(
                        Bucket=obj.bucket, Key=obj.key, Range=f"bytes={self.position}-", **condition
                    )
                    self.body = response["Body"]
                blob = self.body.read(min(len(buffer), obj.size - self.position))
            except _errors() as exc:
                self._drop()
                raise failure(exc) from exc
            if not blob:
                self._drop()
                raise Transient(f"connection closed at byte {self.position} of {obj.size}")
            return blob

        blob = retrying(obj.url, attempt, store.retries, store.backoff_s)
        buffer[: len(blob)] = blob
        self.position += len(blob)
        return len(blob)

    def _drop(self) -> None:
        if self.body is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; it is dropped anyway
                self.body.close()
            self.body = None

    def close(self) -> None:
        self._drop()
        super().close()
