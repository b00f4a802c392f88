"""The retry policy of everything read from or written to a remote store (``data/remote.py``,
``data/s3.py``): one place, so that an ``http(s)://`` shard, an ``s3://`` shard and a gpt-prepare
input or output object fail the same way.

A transient failure (a reset, a short read, a timeout, a 5xx, a sha256 mismatch) is retried a
bounded number of times with exponential backoff; a permanent one (not found, access denied) is
not. Either way the caller gets one :class:`RemoteUnavailable` naming the object — never a skip,
never a traceback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from conf.errors import UserError

T = TypeVar("T")


class RemoteUnavailable(UserError):
    """A remote file that could not be read after the retries: a wrong ``data.dir`` at start (exit 2),
    data gone for good once training runs (the loader turns it into a :class:`RunError`, exit 1)."""


class Transient(Exception):
    """A failed attempt worth retrying; its message says what went wrong."""


class Permanent(Exception):
    """A failed attempt that a retry cannot fix (404, 403, a malformed URL)."""


def retrying(what: str, attempt: Callable[[], T], retries: int, backoff_s: float) -> T:
    """``attempt()``, retried ``retries`` times after a :class:`Transient` failure, ``backoff_s`` then
    twice as long each time; then one :class:`RemoteUnavailable`: ``<what>: <last reason> after N attempts``."""
    attempts = retries + 1
    reason = ""
    for number in range(1, attempts + 1):
        try:
            return attempt()
        except Permanent as exc:
            raise RemoteUnavailable(f"{what}: {exc}") from None
        except Transient as exc:
            reason = str(exc)
        if number < attempts:
            time.sleep(backoff_s * 2 ** (number - 1))
    raise RemoteUnavailable(f"{what}: {reason} after {attempts} attempts")
