"""gpt-prepare's worker processes: tokenize chunks of documents, write shards.

Results come back in submission order (:func:`ordered_map`), and every task is a pure function
of its input, so the output is the same for any number of workers. ``workers=1`` runs the same
functions in the calling process.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from data.prepare_dedup import piece_hashes
from data.prepare_shards import write_shard_fast
from data.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer

T = TypeVar("T")
K = TypeVar("K")
R = TypeVar("R")
_STATE: dict[str, Any] = {}


def init_worker(tokenizer_dir: str, dtype: str, in_worker: bool = True) -> None:
    """Load the tokenizer saved in the work dir (once per process)."""
    if in_worker:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: workers= is the parallelism
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    tokenizer = load_tokenizer(tokenizer_dir)
    _STATE.update(tokenizer=tokenizer, dtype=np.dtype(dtype), key=(tokenizer_dir, dtype))
    if isinstance(tokenizer, CharTokenizer):
        codes = np.array([ord(c) for c in tokenizer.chars], dtype=np.uint32)
        order = np.argsort(codes, kind="stable")
        _STATE["char_codes"], _STATE["char_ids"] = codes[order], order.astype(np.int64)


@contextlib.contextmanager
def worker_pool(workers: int, tokenizer_dir: Path, dtype: str) -> Iterator[Executor | None]:
    """A process pool of ``workers`` (None for one: the caller's process does the work).

    Forked where the platform forks (no re-import of the caller's ``__main__``, which a spawned
    worker needs and a script without a ``__main__`` guard, or stdin, cannot give); the workers
    touch only numpy and the tokenizer. ``TOKENIZERS_PARALLELISM=false`` while the pool lives:
    a worker tokenizes on one thread, and tokenizers then does not warn about the fork.
    """
    init_worker(str(tokenizer_dir), dtype, in_worker=False)
    if workers <= 1:
        yield None
        return
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    executor = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context(method),
        initializer=init_worker,
        initargs=(str(tokenizer_dir), dtype),
    )
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def ordered_map(executor: Executor | None, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """``map(fn, items)`` on the pool, in order, with at most ``window`` tasks in flight: the input
    is consumed only as fast as results are (``Pool.imap`` reads its whole input ahead)."""
    for _, result in ordered_map_keyed(executor, fn, ((None, item) for item in items), window):
        yield result  # type: ignore[misc]


def ordered_map_keyed(
    executor: Executor | None, fn: Callable[[T], R], items: Iterable[tuple[K, T | None]], window: int
) -> Iterator[tuple[K, R | None]]:
    """:func:`ordered_map` over ``(key, task)`` pairs, yielding ``(key, result)``; a ``None`` task is
    passed through as a ``None`` result in its place (a marker: the end of an input file)."""
    if executor is None:
        for key, item in items:
            yield key, None if item is None else fn(item)
        return
    pending: deque = deque()
    failure: Exception | None = None
    try:
        iterator = iter(items)
        while True:
            try:
                key, item = next(iterator)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - e.g. a bad line: what was read before it still counts
                failure = exc
                break
            pending.append((key, None if item is None else executor.submit(fn, item)))
            if len(pending) >= window:
                key, future = pending.popleft()
                yield key, None if future is None else future.result()
        while pending:
            key, future = pending.popleft()
            yield key, None if future is None else future.result()
        if failure is not None:
            raise failure
    finally:
        for _, future in pending:
            if future is not None:
                future.cancel()


def encode_texts(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """All pieces' tokens as one array, and each piece's token count."""
    if isinstance(tokenizer, CharTokenizer):  # vectorised: the per-character Python loop is 20x slower
        codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype="<u4")
        known, ids = _STATE["char_codes"], _STATE["char_ids"]
        index = np.minimum(np.searchsorted(known, codes), len(known) - 1)
        flat = np.where(known[index] == codes, ids[index], tokenizer.unk_id).astype(dtype)
        return flat, np.fromiter(map(len, texts), np.int64, len(texts))
    if isinstance(tokenizer, ByteTokenizer):
        blobs = [t.encode("utf-8") for t in texts]
        flat = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(dtype)
        return flat, np.fromiter(map(len, blobs), np.int64, len(blobs))
    if isinstance(tokenizer, BPETokenizer):
        backend = tokenizer.backend
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    elif isinstance(tokenizer, TiktokenTokenizer):
        ids = tokenizer.enc.encode_ordinary_batch(texts, num_threads=1)
    else:
        ids = [tokenizer.encode(t) for t in texts]
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(chain.from_iterable(ids), dtype, int(lengths.sum())), lengths


def encode_chunk(task: tuple[list[str], list[bool], bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens with end-of-text after each piece that ends a document, tokens per piece, ends, hashes)."""
    texts, ends, dedup = task
    tokenizer, dtype = _STATE["tokenizer"], _STATE["dtype"]
    flat, lengths = encode_texts(tokenizer, texts, dtype)
    ends_array = np.array(ends, dtype=bool)
    tokens = np.insert(flat, np.cumsum(lengths)[ends_array], np.asarray(tokenizer.eot_id, dtype=dtype))
    hashes = piece_hashes(texts) if dedup else np.zeros(0, np.uint64)
    return tokens, lengths + ends_array, ends_array, hashes


def read_tokens(parts: list[tuple[str, int, int]], dtype: np.dtype) -> np.ndarray:
    """Concatenate ``(path, first token, count)`` slices of part files."""
    arrays = []
    for path, first, count in parts:
        mapped = np.memmap(path, dtype=dtype, mode="r")
        arrays.append(np.array(mapped[first : first + count]))
        del mapped
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def write_shard_task(task: tuple[str, int, int, int, list[tuple[str, int, int]]]) -> dict:
    """Write one shard: ``count`` windows of seq_len+1 tokens with stride seq_len, from the part files."""
    path, first_window, count, seq_len, parts = task
    stream = read_tokens(parts, _STATE["dtype"])
    index = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    info = write_shard_fast(Path(path), stream[index], first_window)
    return {"file": Path(path).name, "num_samples": info.num_samples, "sha256": info.sha256, "bytes": info.size}
