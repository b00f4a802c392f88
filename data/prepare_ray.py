"""``executor=ray``: gpt-prepare's tasks on Ray core, with the output of ``executor=local`` byte for byte.

Imported only for ``executor=ray`` (``data/prepare_executor.py``); the work of each task, without
Ray, is ``data/prepare_scan.py``.

- Ray: a local one started for the job (``executor.address=null``: ``workers`` CPUs, stopped at the
  end), or a running cluster (``auto``, ``HOST:6379``, ``ray://HOST:10001``: all of its CPUs). A Ray
  already initialised in this process (a notebook, the tests) is used as it is and left running.
- Tokenize: one task per input file, writing its part into the work dir, which is therefore on a
  filesystem every node mounts (a task on a node without it fails in one line). The driver records
  each part as it finishes (``data/prepare_work.py``): a failed job resumes without redoing them.
- Dedup (``dedup=true``): each file is scanned into all its documents' tokens and hashes; map tasks
  split the (hash, position) rows by hash range; one reduce task per range marks every copy after
  the first; filter tasks cut those out of each file's tokens. No host holds all the hashes: a
  reduce task holds about :data:`ROWS_PER_RANGE` rows. Parts are recorded done in file order.
- Shards: one task per shard, results taken in order (the manifest lists them in order).
- Faults: every task is retried by Ray (``max_retries``) when its worker dies (kill -9, a lost
  node); a task is a pure function of its arguments and the files it reads, so a retry writes the
  same bytes. An error of the input (a bad JSON line) is not retried: it is one line, as locally.
- Progress: the tokenize and dedup stages' bars (one line a minute in a log), per finished task.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import ray

import data.corpus
from conf import test_hooks
from conf.errors import UserError
from conf.prepare_schema import PrepareConfig
from data.inputs import InputFile, size_of
from data.prepare_progress import Progress, tokenize_progress
from data.prepare_scan import (
    Setup,
    drops_path,
    filter_part,
    partition_hashes,
    reduce_range,
    setup_worker,
    tokenize_part,
)
from data.prepare_tokenize import report_unknown
from data.prepare_work import WorkDir

T = TypeVar("T")
R = TypeVar("R")
MAX_RETRIES = 3  # a task whose worker died is run again this many times
ROWS_PER_RANGE = 1 << 23  # (hash, position) rows a reduce task sorts: 128 MiB of them at most, about
ROWS_PER_MAP = 1 << 23  # rows one map task reads (whole files: a bigger file is one task alone)
RECOUNT_S = 10.0  # how often the cluster's CPUs are counted again (nodes may join while the job runs)
DELAY_HOOK = "GPT_FAULT_PREPARE_TASK_DELAY_MS"  # a test-only pause in each tokenize task (conf/test_hooks.py)


@contextlib.contextmanager
def ray_session(address: str | None, workers: int) -> Iterator[int]:
    """Ray for the ``with`` block (see the module docstring); yields the cluster's CPUs."""
    owned = not ray.is_initialized()
    where = "the Ray this process had initialised"
    if owned:
        try:
            if address is None:  # "local": a new Ray even where RAY_ADDRESS names a running one
                ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
            key = f"executor.address={address}" if address else "executor=ray"
            raise UserError(f"{key}: cannot start or reach Ray ({_reason(exc)})") from None
        where = f"the cluster at {address}" if address else "a local Ray started for this job"
    cpus = _cpus()
    print(f"ray: {cpus} CPU{'s' if cpus != 1 else ''}, {where}", flush=True)
    try:
        yield cpus
    finally:
        if owned:
            ray.shutdown()


def _reason(exc: BaseException) -> str:
    """Why Ray could not be reached, in a few words: a missing token says how to give it."""
    cause: BaseException | None = exc
    while cause is not None:
        if "token" in str(cause).lower() and "auth" in str(cause).lower():
            return (
                "its token authentication refused this driver: export RAY_AUTH_MODE=token, with the cluster's "
                "token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
            )
        cause = cause.__cause__ or cause.__context__
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _cpus() -> int:
    return max(int(ray.cluster_resources().get("CPU", 1)), 1)


def _apply(setup: Setup, fn: Callable[[Any], Any], item: Any) -> Any:
    """``fn(item)`` on a worker whose tokenizer state is loaded (a shard task reads it)."""
    setup_worker(setup)
    return fn(item)


_remote = ray.remote(max_retries=MAX_RETRIES, num_cpus=1)
_tokenize = _remote(tokenize_part)
_partition = _remote(partition_hashes)
_reduce = _remote(reduce_range)
_filter = _remote(filter_part)
_call = _remote(_apply)


def _get(ref: ray.ObjectRef) -> Any:
    """``ray.get``, an input error raised in a task coming back as the same one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise


def _cancel(refs: Iterable[ray.ObjectRef]) -> None:
    for ref in refs:
        with contextlib.suppress(Exception):  # finished, or Ray already going down
            ray.cancel(ref)


class RayExecutor:
    """gpt-prepare's executor on Ray (see the module docstring)."""

    def __init__(self, config: PrepareConfig, cpus: int) -> None:
        self.config, self.cpus, self.counted = config, cpus, time.monotonic()
        self.setup: Setup | None = None
        delays = test_hooks.int_set(DELAY_HOOK)
        self.delay_s = max(delays, default=0) / 1000

    @property
    def window(self) -> int:
        """Tasks in flight: every CPU busy and one more wave queued. The CPUs are counted again every
        :data:`RECOUNT_S`, so that nodes joining the cluster after the start get work too."""
        if time.monotonic() - self.counted > RECOUNT_S:
            self.cpus, self.counted = _cpus(), time.monotonic()
        return 2 * self.cpus + 2

    @contextlib.contextmanager
    def running(self, work_path: Path, dtype: str) -> Iterator[None]:
        """The tasks' setup: the work dir, the dtype, and how the driver cuts pieces and chunks."""
        self.setup = (str(work_path), dtype, (data.corpus.PIECE_CHARS, data.corpus.CHUNK_CHARS))
        try:
            yield
        finally:
            self.setup = None

    def unordered(self, submit: Callable[[T], ray.ObjectRef], items: Iterable[T]) -> Iterator[tuple[T, Any]]:
        """``(item, result)`` as tasks finish, at most ``window`` in flight. After a task fails, no
        more are started, those running finish (their work is recorded: a resume skips it), and then
        the first failure is raised."""
        pending: dict[ray.ObjectRef, T] = {}
        queue = iter(items)
        failure: Exception | None = None
        try:
            while True:
                for item in queue if failure is None else ():
                    pending[submit(item)] = item
                    if len(pending) >= self.window:
                        break
                if not pending:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    item = pending.pop(ref)
                    try:
                        result = _get(ref)
                    except Exception as exc:  # noqa: BLE001 - raised once the running tasks are in
                        failure = failure or exc
                        continue
                    yield item, result
        finally:
            _cancel(pending)  # Ctrl-C, or the caller stopped early
        if failure is not None:
            raise failure

    def ordered(self, submit: Callable[[T], ray.ObjectRef], items: Iterable[T]) -> Iterator[Any]:
        """The results in the items' order, at most ``window`` in flight."""
        pending: deque[ray.ObjectRef] = deque()
        try:
            for item in items:
                pending.append(submit(item))
                if len(pending) >= self.window:
                    yield _get(pending.popleft())
            while pending:
                yield _get(pending.popleft())
        finally:
            _cancel(pending)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        return self.ordered(lambda item: _call.remote(self.setup, fn, item), items)

    def finished(self, work: WorkDir) -> set[int]:
        """Done files, and with ``dedup=true`` the scanned ones (their dedup is redone, cheaply)."""
        return set(work.done) | (set(work.scanned) if self.config.dedup else set())

    def tokenize(self, work: WorkDir, files: list[InputFile]) -> None:
        scan = self.config.dedup
        finished = self.finished(work)
        progress = tokenize_progress(files, finished)
        todo = [index for index in range(len(files)) if index not in finished]
        field = self.config.text_field

        def submit(index: int) -> ray.ObjectRef:
            return _tokenize.remote(self.setup, index, files[index], field, scan, self.delay_s)

        for index, entry in self.unordered(submit, todo):
            (work.finish_scan if scan else work.finish_part)(index, entry)
            progress.update(size_of(files[index]))
        progress.close()
        if scan:
            self.dedup(work)
        report_unknown(list(work.done.values()), work.tokenizer())

    def dedup(self, work: WorkDir) -> None:
        """The scanned files' parts without the documents seen before them (module docstring)."""
        done, scanned = work.done, work.scanned
        if not scanned:
            return
        rows = [(i, "hashes", done[i]["documents"]) for i in sorted(done)]
        rows += [(i, "dochash", scanned[i]["documents"]) for i in sorted(scanned)]
        total = sum(count for *_, count in rows)
        ranges = max(2, self.cpus, -(-total // ROWS_PER_RANGE))  # 2 at least: num_returns=1 returns no list
        maps = [
            _partition.options(num_returns=ranges).remote(self.setup, batch, ranges)
            for batch in _batches(rows, ROWS_PER_MAP)
        ]
        reduces = [_reduce.remote(self.setup, r, *(refs[r] for refs in maps)) for r in range(ranges)]
        del maps  # the reduce tasks hold the partitions now; the driver holds none of them
        bar = Progress(ranges, f"dedup {total:,} documents", unit="hash range")
        duplicates = 0
        for _, count in self.unordered(lambda ref: ref, reduces):
            duplicates += count
            bar.update(1)
        bar.close()
        order = sorted(scanned)
        bar = Progress(len(order), "remove duplicates", unit="file")
        results = self.ordered(lambda i: _filter.remote(self.setup, i, ranges, scanned[i]), order)
        for index, entry in zip(order, results, strict=True):
            work.finish_part(index, entry)  # in file order: the parts done are always the first files
            bar.update(1)
        bar.close()
        for number in range(ranges):
            drops_path(work, number).unlink(missing_ok=True)


def _batches(rows: list[tuple[int, str, int]], limit: int) -> Iterator[list[tuple[int, str]]]:
    """Consecutive files, grouped until their documents reach ``limit``."""
    batch: list[tuple[int, str]] = []
    size = 0
    for index, kind, count in rows:
        if batch and size + count > limit:
            yield batch
            batch, size = [], 0
        batch.append((index, kind))
        size += count
    if batch:
        yield batch
