"""Async checkpoint writing from a persistent process over a staged copy, for megatron-core's async saves.

megatron-core's default async caller forks a writer per save. On a GPU node that is
cheap: the forked writer reads pinned host copies. When the state lives in host memory
(CPU training, or CPU offload), the fork shares every page of the trainer
copy-on-write, and the next optimizer step pays a page fault and a 4 KiB copy for
each page it writes, which costs more than half of a synchronous save on a CPU
(``benchmarks/async_checkpoint.py``, figures in ``benchmarks/README.md``). Its persistent (spawned) caller would
move the live parameters into shared memory and write them while training changes them.

This caller instead:

1. **stages** the tensors to write into shared-memory buffers reused across saves (one
   memcpy of the checkpoint, the only part training waits for, like megatron's D2H copy
   on GPU), and
2. **writes** them from one persistent spawned process with megatron-core's own
   per-bucket writer (``FileSystemWriterAsync.write_preloaded_data``). A writer thread
   was measured too: it contends for the GIL (``benchmarks/README.md``).

then reports the results to megatron's finalize step through the same queue as its
forked writer does. Completion is agreed over ranks by the base class's all-reduce.
"""

from __future__ import annotations

import atexit
import contextlib
import queue
from typing import Any

import torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCaller, AsyncRequest
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync


def _staged(write_buckets: list[Any], buffers: dict[tuple[int, int], torch.Tensor]) -> list[Any]:
    """The buckets with every tensor copied into ``buffers`` (kept across saves: reusing them
    avoids faulting in fresh pages for every save; ``.to('cpu')`` of a host tensor is the tensor itself)."""
    _check_shared_memory(write_buckets, buffers)
    staged = []
    for b, (file_name, storage_key, (bytes_data, tensor_data)) in enumerate(write_buckets):
        tensors = []
        for i, (item, tensor) in enumerate(tensor_data):
            buffer = buffers.get((b, i))
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = buffers[(b, i)] = torch.empty(tensor.shape, dtype=tensor.dtype).share_memory_()
            tensors.append((item, buffer.copy_(tensor.detach())))
        staged.append((file_name, storage_key, (bytes_data, tensors)))
    return staged


def _check_shared_memory(write_buckets: list[Any], buffers: dict[tuple[int, int], torch.Tensor]) -> None:
    """Refuse early when /dev/shm cannot hold the new buffers: a full tmpfs shows up as a
    SIGBUS in the middle of a copy, not as an error."""
    import shutil

    needed = sum(
        tensor.numel() * tensor.element_size()
        for b, (_, _, (_, tensor_data)) in enumerate(write_buckets)
        for i, (_, tensor) in enumerate(tensor_data)
        if (b, i) not in buffers
    )
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return
    if needed > free:
        raise RuntimeError(
            f"train.async_save=true: the checkpoint staging buffers need {needed / 2**20:.0f} MiB of shared "
            f"memory and /dev/shm has {free / 2**20:.0f} MiB free; enlarge it (docker: --shm-size) "
            "or set train.async_save=false"
        )


def _write(transform_list: Any, use_msc: bool, rank: int, write_buckets: list[Any], results_queue: Any) -> None:
    """What ``FileSystemWriterAsync.write_preloaded_data_multiproc`` does, without forking."""
    from parallel.checksums import hash_megatron_writes

    results: dict[int, Any] | Exception = {}
    try:
        hash_megatron_writes()  # this process writes the shards: it hashes them as it writes
        for index, bucket in enumerate(write_buckets):
            local: queue.Queue = queue.Queue()
            count: queue.Queue = queue.Queue()
            count.put(index)
            FileSystemWriterAsync.write_preloaded_data(transform_list, index, bucket, local, count, True)
            _, outcome = local.get()
            if isinstance(outcome, Exception):
                results = outcome
                break
            results[index] = outcome  # type: ignore[index]
    except Exception as exc:  # reported to every rank by megatron's finalize
        results = exc
    results_queue.put(results)


def _writer_loop(requests: Any, done: Any, parent: int, from_main_thread: bool = True) -> None:
    """The writer process: write each staged request, report, repeat; leave with the trainer
    (at once when it is killed, even mid-write: ``die_with_parent``; between writes, by the
    ``getppid`` check below)."""
    import os
    import signal

    from parallel.process_hygiene import die_with_parent

    die_with_parent(parent, from_main_thread)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # the trainer decides when to stop
        signal.signal(sig, signal.SIG_IGN)
    while os.getppid() == parent:
        try:
            request = requests.get(timeout=1.0)
        except queue.Empty:
            continue
        if request is None:
            return
        _write(*request)
        done.put(True)


class ProcessAsyncCaller(AsyncCaller):
    """Stage into shared memory, then write from a persistent spawned process."""

    def __init__(self) -> None:
        import multiprocessing as mp
        import os

        self._ctx = mp.get_context("spawn")
        self._parent = os.getpid()
        self.requests = self._ctx.Queue()
        self.done = self._ctx.Queue()
        self.process: Any = None
        self.pending = False
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}

    def schedule_async_call(self, async_req: AsyncRequest) -> None:
        if async_req.async_fn is None:
            return
        args = list(async_req.async_fn_args)
        if async_req.preload_fn:
            args[1] = async_req.preload_fn()
        staged = _staged(args[1], self.buffers)
        if self.process is None:
            import threading

            from_main = threading.current_thread() is threading.main_thread()
            self.process = self._ctx.Process(
                target=_writer_loop,
                args=(self.requests, self.done, self._parent, from_main),
                name="gpt-checkpoint-writer",
            )
            self.process.daemon = True
            self.process.start()
            # before multiprocessing's own exit hook, which would SIGTERM it (ignored) and wait
            atexit.register(self.close)
        transform_list, use_msc = async_req.async_fn.args[:2]
        self.requests.put((transform_list, use_msc, args[0], staged, args[2]))
        self.pending = True

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        if self.pending:
            try:
                self.done.get(block=blocking, timeout=None)
                self.pending = False
            except queue.Empty:
                pass
            if self.pending and not self.process.is_alive():
                raise RuntimeError(f"the checkpoint writer process died (exit code {self.process.exitcode})")
        alive = int(self.pending)
        return not alive if no_dist else self.sync_all_async_calls(alive)

    def close(self, abort: bool = False) -> None:
        if self.process is not None:
            if not abort and self.pending:
                self.done.get()
                self.pending = False
            self.requests.put(None)
            self.process.join(timeout=10)
            self.process = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def use_writer_process(calls_queue: Any) -> None:
    """Make an ``AsyncCallsQueue`` hand its requests to one :class:`ProcessAsyncCaller` (one
    save in flight at a time: ``CheckpointDir.save`` waits for the previous one)."""
    caller = ProcessAsyncCaller()
    calls_queue._get_async_caller = lambda: caller
