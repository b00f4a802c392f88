"""Streaming, resumable loading whose global sample order does not depend on dp.

The order of an epoch is a function of (seed, epoch, shard set, num_streams) only:

1. shards are permuted by ``rng(seed, epoch)`` and the windows inside each shard by
   ``rng(seed, epoch, shard)``; concatenated they form the sequence ``S`` (N samples);
2. ``S`` is cut into ``K = num_streams`` contiguous *canonical streams* of
   ``L = N // K`` samples (MosaicML Streaming's "canonical nodes");
3. global position ``p`` is sample ``p // K`` of stream ``p % K`` (round-robin);
4. global batch ``b`` is positions ``[b·G, (b+1)·G)``; data-parallel rank ``r`` takes
   the positions with ``p % dp == r``. Because ``dp`` divides ``K``, those are exactly
   the positions of streams ``s % dp == r``: a rank reads only its streams' shards.

An epoch ends when fewer than ``G`` positions remain (those < G + K samples wait for
the next epoch's shuffle). The loader state is just ``(epoch, position)``: a point in
the global order, valid for any dp that divides K, so a run saved at dp=2 resumes at
dp=1 without losing or repeating a sample.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from conf.errors import RunError, UserError, unwrap_worker_error
from data.remote import RemoteUnavailable
from data.shards import Manifest, read_shard, read_shards


@dataclass(frozen=True)
class Layout:
    """How the global batch is cut: sizes that are fixed for a run."""

    global_batch: int
    micro_batch: int
    dp_rank: int = 0
    dp_size: int = 1

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)


class GlobalOrder:
    """The epoch's sample order (see module docstring); cheap to build, no I/O."""

    def __init__(self, manifest: Manifest, split: str, seed: int, epoch: int, num_streams: int):
        shards = manifest.shards(split)
        self.shards = shards
        total = sum(s.num_samples for s in shards)
        if total < num_streams:
            raise UserError(
                f"{manifest.directory}: split {split!r} has {total} samples, fewer than data.num_streams={num_streams}"
            )
        rng = np.random.default_rng([seed, epoch])
        self.shard_order = rng.permutation(len(shards))
        self.num_streams = num_streams
        self.stream_len = total // num_streams
        self.length = self.stream_len * num_streams
        self.seed, self.epoch = seed, epoch
        counts = np.array([shards[i].num_samples for i in self.shard_order])
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # in S, per permuted shard
        # sample id = index of the window in the split, in file order
        self.first_ids = np.concatenate([[0], np.cumsum([s.num_samples for s in shards])])

    def inner_permutation(self, shard_index: int) -> np.ndarray:
        n = self.shards[shard_index].num_samples
        return np.random.default_rng([self.seed, self.epoch, shard_index, 1]).permutation(n)

    def stream_segments(self, stream: int, offset: int) -> Iterator[tuple[int, int, int]]:
        """(shard index, first, last) ranges in permuted-shard coordinates covering the
        rest of ``stream`` from ``offset``; used to read only the shards a stream needs."""
        begin = stream * self.stream_len + offset
        end = (stream + 1) * self.stream_len
        k = int(np.searchsorted(self.starts, begin, side="right")) - 1
        while begin < end:
            shard_begin, shard_end = int(self.starts[k]), int(self.starts[k + 1])
            stop = min(end, shard_end)
            yield int(self.shard_order[k]), begin - shard_begin, stop - shard_begin
            begin, k = stop, k + 1


class _StreamReader:
    """Yields (sample id, window) of one canonical stream, one shard in memory at a time."""

    def __init__(self, order: GlobalOrder, manifest: Manifest, stream: int, offset: int):
        self.order, self.manifest = order, manifest
        segments = list(order.stream_segments(stream, offset))
        self.segments = iter(segments)
        infos = [order.shards[k] for k, _, _ in segments]  # remote shards are read ahead
        self.windows = read_shards(infos, manifest.dtype, manifest.seq_len, read_shard)
        self.buffer: Iterator[tuple[int, np.ndarray]] = iter(())

    def __next__(self) -> tuple[int, np.ndarray]:
        for item in self.buffer:
            return item
        shard_index, first, last = next(self.segments)
        windows = next(self.windows)
        local = self.order.inner_permutation(shard_index)[first:last]
        ids = self.order.first_ids[shard_index] + local
        self.buffer = zip(ids.tolist(), windows[local], strict=True)
        return next(self.buffer)


def advance(epoch: int, position: int, global_batch: int, length: int) -> tuple[int, int]:
    """The loader state after one more global batch."""
    position += global_batch
    if position + global_batch > length:
        return epoch + 1, 0
    return epoch, position


class TrainStream(IterableDataset):
    """This rank's micro-batches from ``(epoch, position)`` on, forever (epochs roll over).

    With DataLoader workers, worker ``w`` of ``W`` produces micro-batches ``j ≡ w (mod W)``;
    the DataLoader returns them in order, so the stream is identical for any W.
    """

    def __init__(
        self, manifest: Manifest, layout: Layout, seed: int, num_streams: int, epoch: int = 0, position: int = 0
    ):
        if num_streams % layout.dp_size:
            raise UserError(
                f"data.num_streams={num_streams} is not divisible by the data-parallel size {layout.dp_size}"
            )
        self.manifest, self.layout, self.seed, self.num_streams = manifest, layout, seed, num_streams
        self.epoch, self.position = epoch, position
        order = GlobalOrder(manifest, "train", seed, 0, num_streams)
        if order.length < layout.global_batch:
            raise UserError(
                f"{manifest.directory}: {order.length} usable training samples, fewer than "
                f"train.global_batch={layout.global_batch}"
            )

    def _rank_positions(self, epoch: int, position: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, stream, offset) of this rank's samples in order, forever."""
        lay, k = self.layout, self.num_streams
        while True:
            length = GlobalOrder(self.manifest, "train", self.seed, epoch, k).length
            while position + lay.global_batch <= length:
                for p in range(position + lay.dp_rank, position + lay.global_batch, lay.dp_size):
                    yield epoch, p % k, p // k
                epoch, position = advance(epoch, position, lay.global_batch, length)
                if position == 0:
                    break

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Micro-batches as numpy arrays ``tokens`` [mb, seq_len+1] (the manifest's dtype) and
        ``ids``: small arrays pickle across worker processes far cheaper than tensors, which
        travel through a shared-memory segment each (:class:`TrainLoader` makes the tensors)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mb = self.layout.micro_batch
        readers: dict[int, _StreamReader] = {}
        current_epoch = None
        positions = self._rank_positions(self.epoch, self.position)
        for j in itertools.count():
            chunk = list(itertools.islice(positions, mb))
            if j % workers != worker:
                continue
            ids, rows = [], []
            for epoch, stream, offset in chunk:
                if epoch != current_epoch:
                    order = GlobalOrder(self.manifest, "train", self.seed, epoch, self.num_streams)
                    readers, current_epoch = {}, epoch
                if stream not in readers:
                    readers[stream] = [_StreamReader(order, self.manifest, stream, offset), offset]
                entry = readers[stream]  # [reader, its next offset]
                while entry[1] < offset:  # the other workers' samples of this stream
                    next(entry[0])
                    entry[1] += 1
                sample_id, window = next(entry[0])
                entry[1] += 1
                ids.append(sample_id)
                rows.append(window)
            yield {"tokens": np.stack(rows), "ids": np.asarray(ids, dtype=np.int64)}


def _ignore_stop_signals(_worker: int) -> None:
    """A scheduler signals every process of a job (slurm's SIGTERM / SIGUSR1, a terminal's
    SIGINT): a worker that died of it would fail the trainer before its preemption checkpoint.
    The trainer decides; its workers exit with it (torch checks, and so does the fork hook of
    ``parallel/process_hygiene.py``)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _as_is(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DataLoader collate for already-batched numpy micro-batches (no conversion in the worker)."""
    return batch


def worker_iterator(dataset: IterableDataset, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's micro-batches, produced in ``num_workers`` DataLoader processes (0: in this one)."""
    if not num_workers:
        return iter(dataset)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_as_is,
        prefetch_factor=8,
        worker_init_fn=_ignore_stop_signals,
    )
    return iter(loader)


def next_arrays(iterator: Iterator[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The next micro-batch; on an error the DataLoader's workers are stopped first: they ignore
    SIGTERM, so one left alive would hang the interpreter's exit (multiprocessing joins it)."""
    try:
        return next(iterator)
    except BaseException as exc:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if isinstance(exc, RemoteUnavailable):  # remote data gone mid-run: the run failed, the input was fine
            raise RunError(str(unwrap_worker_error(exc))) from None
        if isinstance(exc, UserError):  # from a DataLoader worker: keep its one line
            raise unwrap_worker_error(exc) from None
        raise


class TrainLoader:
    """Iterates this rank's micro-batches and knows the exact resumable state.

    The state counts only micro-batches handed to the trainer (not what workers have
    prefetched), and is taken at global-batch boundaries, where it is a position in
    the dp-independent global order.
    """

    def __init__(self, manifest: Manifest, layout: Layout, seed: int, num_streams: int, num_workers: int = 0):
        self.manifest, self.layout, self.seed = manifest, layout, seed
        self.num_streams, self.num_workers = num_streams, num_workers
        self.epoch, self.position = 0, 0
        self._consumed = 0
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None
        self._lengths: dict[int, int] = {}

    def _length(self, epoch: int) -> int:
        if epoch not in self._lengths:  # once per epoch, not per step
            self._lengths = {epoch: GlobalOrder(self.manifest, "train", self.seed, epoch, self.num_streams).length}
        return self._lengths[epoch]

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            dataset = TrainStream(self.manifest, self.layout, self.seed, self.num_streams, self.epoch, self.position)
            self._iterator = worker_iterator(dataset, self.num_workers)
        arrays = next_arrays(self._iterator)
        tokens = torch.from_numpy(arrays["tokens"].astype(np.int64))
        mask = torch.ones(len(tokens), tokens.shape[1] - 1)
        batch = {"tokens": tokens, "ids": torch.from_numpy(arrays["ids"]), "mask": mask}
        self._consumed += 1
        if self._consumed == self.layout.micro_batches_per_step:
            self._consumed = 0
            self.epoch, self.position = advance(
                self.epoch, self.position, self.layout.global_batch, self._length(self.epoch)
            )
        return batch

    def state_dict(self) -> dict[str, int]:
        if self._consumed:
            raise RuntimeError("loader state requested in the middle of a global batch")
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_streams": self.num_streams}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["num_streams"]) != self.num_streams:
            raise UserError(
                f"data.num_streams={self.num_streams}, but the checkpoint's loader used "
                f"{state['num_streams']}: the global sample order would change"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position + self.layout.global_batch > self._length(self.epoch):  # a larger global batch now
            self.epoch, self.position = self.epoch + 1, 0  # the epoch's tail waits for the next shuffle, as always
        self._consumed, self._iterator = 0, None


def eval_batches(
    manifest: Manifest, split: str, micro_batch: int, dp_rank: int = 0, dp_size: int = 1, limit: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """The whole split in file order, this rank's contiguous share, full-size micro-batches.

    The last micro-batch is padded with mask 0 so that every rank and pipeline stage
    sees equally shaped batches; losses are summed under the mask.
    """
    shards = manifest.shards(split)
    total = sum(s.num_samples for s in shards)
    lo, hi = total * dp_rank // dp_size, total * (dp_rank + 1) // dp_size
    if limit is not None:
        hi = min(hi, lo + limit * micro_batch)
    rows: list[np.ndarray] = []
    starts = np.cumsum([0] + [s.num_samples for s in shards]).tolist()
    wanted = [k for k in range(len(shards)) if starts[k + 1] > lo and starts[k] < hi]
    contents = read_shards([shards[k] for k in wanted], manifest.dtype, manifest.seq_len, read_shard)
    for k, windows in zip(wanted, contents, strict=True):
        start, end = starts[k], starts[k + 1]
        rows.extend(windows[max(lo - start, 0) : min(hi, end) - start])
        while len(rows) >= micro_batch:
            yield _eval_batch(rows[:micro_batch], micro_batch)
            rows = rows[micro_batch:]
    if rows:
        yield _eval_batch(rows, micro_batch)


def _eval_batch(rows: list[np.ndarray], micro_batch: int) -> dict[str, torch.Tensor]:
    tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
    mask = torch.ones(micro_batch, tokens.shape[1] - 1)
    if len(rows) < micro_batch:
        mask[len(rows) :] = 0
        pad = tokens[:1].expand(micro_batch - len(rows), -1)
        tokens = torch.cat([tokens, pad])
    return {"tokens": tokens, "mask": mask}
