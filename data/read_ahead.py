"""Bounded read-ahead of remote shards: the next ``data.prefetch`` shards of a sequence are fetched,
verified and decoded in background threads while the current one is consumed.

A stream reader (``data/stream.py``) holds one such sequence per canonical stream, so a rank keeps
at most ``(1 + prefetch)`` shards in memory per stream it reads; abandoning the sequence (a new
epoch) drops its pending shards. Local shards are read in the caller's thread as before.

The pool is hand-written (a queue and daemon threads) because ``concurrent.futures`` joins its
workers at interpreter exit: a fetch waiting out its retry backoff would hold up a preempted run's
exit. It is made per process, so a forked DataLoader worker never submits to its parent's threads.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

THREADS = 2  # enough for the bandwidth a trainer needs; more threads cost the loader CPU (GIL)

_pool: tuple[int, queue.SimpleQueue] | None = None
_lock = threading.Lock()


def _work(jobs: queue.SimpleQueue) -> None:
    while True:
        future, fn, args = jobs.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - delivered to the consumer by future.result()
                future.set_exception(exc)


def submit(fn: Callable[..., Any], *args: Any) -> Future:
    """Run ``fn(*args)`` on this process's read-ahead threads."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            for i in range(THREADS):
                threading.Thread(target=_work, args=(jobs,), name=f"shard-read-ahead-{i}", daemon=True).start()
            _pool = (os.getpid(), jobs)
    future: Future = Future()
    _pool[1].put((future, fn, args))
    return future


def read_ahead(items: Sequence[Any], read: Callable[[Any], Any], depth: int) -> Iterator[Any]:
    """``read(item)`` for each item in order, with up to ``depth`` items read ahead of the one
    being consumed (``depth=0``: in the caller's thread). Errors surface where their item is consumed.

    The first item is read in the caller's thread, which needs it at once: queued behind other
    streams' read-ahead it would wait longer (a new epoch opens every stream at the same time)."""
    if depth <= 0:
        yield from map(read, items)
        return
    upcoming = iter(items)
    pending: deque[Future] = deque(submit(read, item) for item in itertools.islice(upcoming, 1, 1 + depth))
    for first in itertools.islice(items, 0, 1):
        yield read(first)
    while pending:
        result = pending.popleft().result()
        pending.extend(submit(read, item) for item in itertools.islice(upcoming, 1))
        yield result
        del result  # the consumer holds it, not this frame, once it moves on
