"""Weighted mixtures of shard sets (``data.sources``) in a global order that does not depend on dp.

Every source keeps its own order of ``data/stream.py`` (its ``GlobalOrder`` per epoch, its own
epochs: a small source repeats, a large one does not); its *cursor* is the number of its samples
consumed, ``epoch · L + position`` with ``L`` its usable epoch length (a multiple of ``K``).

The mixture deals **rows** of ``K = data.num_streams`` consecutive global positions: row ``q`` goes
to the source that :class:`~data.interleave.Interleave` gives slot ``q`` (earliest deadline first
over the integer weights, so every source's row count stays within 1 of its share), and takes that
source's next ``K`` samples, one from each of its canonical streams. Rank ``r`` takes global
positions ``p % dp == r`` as for one source, i.e. the same streams of every source: a rank reads
only its ``K/dp`` streams' shards of each source. Per-sample interleaving would make every rank
read every shard of every source (dp times the I/O, fatal for remote shards); rows keep reads
local at the cost of a coarser, still exact, bound: for every prefix of ``n`` positions of a
segment (below) and every source ``i`` with normalised weight ``w_i``::

    |samples_i(n) - w_i·n| < K

(fewer than one row off; at row ends fewer than 1 row of the ideal). The loader state is the
global position ``P``, the current *segment* (first row, integer weights, every source's cursor
there) and each source's ``(epoch, position)``: a point in the global order valid at any dp
dividing ``K``. When the weights or the sources change at a resume, a new segment starts at the
next row boundary from the sources' cursors: each source goes on from its recorded position,
so nothing of its current epoch is repeated or skipped.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from conf.errors import UserError
from data.interleave import Interleave, integer_weights
from data.shards import Manifest, ShardInfo, read_shard, read_shards
from data.stream import GlobalOrder, Layout, next_arrays, worker_iterator

FORMAT = 1  # "mixture" in a loader state; a state without it is data/stream.py's (epoch, position)
BLOCK = 4096  # positions of this rank located at once (numpy), so the per-sample work is a read


@dataclass(frozen=True)
class Source:
    name: str
    manifest: Manifest
    weight: float  # relative (the weights are normalised)


@dataclass
class Segment:
    """Rows ``row, row+1, ...`` follow one interleave: ``weights`` (integers, by source name) and
    every source's cursor at the segment's first position ``row · K``."""

    row: int
    weights: dict[str, int]
    start: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "weights": dict(self.weights), "start": dict(self.start)}


class MixtureOrder:
    """Global position -> (source, cursor) for one segment; numpy in, numpy out, no I/O.

    Sources are indexed in ``names`` order; the interleave runs over them sorted by name, so
    the order depends on the sources and weights, not on how the config lists them."""

    def __init__(self, names: list[str], lengths: list[int], num_streams: int, segment: Segment):
        self.names, self.num_streams, self.segment = names, num_streams, segment
        self.lengths = np.asarray(lengths, dtype=np.int64)
        ranked = sorted(range(len(names)), key=lambda i: names[i])
        self.rank_to_source = np.asarray(ranked, dtype=np.int64)
        self.interleave = Interleave([segment.weights[names[i]] for i in ranked])
        self.start = np.asarray([segment.start[names[i]] for i in ranked], dtype=np.int64)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, cursor: the sample of that source's order) of each global position."""
        k = self.num_streams
        rows = positions // k - self.segment.row
        ranked = self.interleave.source(rows)
        cursor = self.start[ranked] + k * self.interleave.count(rows, ranked) + positions % k
        return self.rank_to_source[ranked], cursor

    def cursors(self, position: int) -> np.ndarray:
        """Every source's cursor (samples consumed) once the positions before ``position`` are."""
        k = self.num_streams
        row = position // k - self.segment.row
        cursor = self.start + k * self.interleave.counts(row)
        cursor[int(self.interleave.source(np.asarray(row)))] += position % k
        out = np.empty_like(cursor)
        out[self.rank_to_source] = cursor
        return out


class _SharedShards:
    """This rank's decoded shards, shared by its readers (least recently used dropped): a source
    with fewer shards than streams has several streams in one shard, and a small source reads
    the same shards every epoch; one read each instead of one per stream and epoch."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self.lock = threading.Lock()  # remote shards are read ahead in threads (data/read_ahead.py)

    def get(self, source: int, info: ShardInfo, manifest: Manifest) -> np.ndarray:
        key = (source, str(info.path))
        with self.lock:
            if key in self.held:
                self.held.move_to_end(key)
                return self.held[key]
        windows = read_shard(info, manifest.dtype, manifest.seq_len)
        with self.lock:
            self.held[key] = windows
            while len(self.held) > self.capacity:
                self.held.popitem(last=False)
        return windows


class _Reader:
    """(sample id, window) of one source's canonical stream in one epoch, from an offset on."""

    def __init__(
        self, source: int, order: GlobalOrder, manifest: Manifest, stream: int, offset: int, shards: _SharedShards
    ):
        self.order = order
        segments = list(order.stream_segments(stream, offset))
        self.segments = iter(segments)
        infos = [order.shards[k] for k, _, _ in segments]  # remote shards are read ahead
        self.windows = read_shards(
            infos, manifest.dtype, manifest.seq_len, lambda info, *_: shards.get(source, info, manifest)
        )
        self.ids: list[int] = []
        self.rows: np.ndarray | None = None
        self.at = 0

    def __next__(self) -> tuple[int, np.ndarray]:
        if self.at == len(self.ids):
            shard, first, last = next(self.segments)
            windows = next(self.windows)
            local = self.order.inner_permutation(shard)[first:last]
            self.ids, self.rows, self.at = (self.order.first_ids[shard] + local).tolist(), windows[local], 0
        self.at += 1
        return self.ids[self.at - 1], self.rows[self.at - 1]  # type: ignore[index]


class MixtureStream(IterableDataset):
    """This rank's micro-batches from global position ``position`` on, forever.

    As :class:`data.stream.TrainStream`: worker ``w`` of ``W`` produces micro-batches ``j ≡ w (mod W)``
    (it skips the other workers' samples of a stream), so the stream is identical for any W."""

    def __init__(self, sources: list[Source], layout: Layout, seed: int, order: MixtureOrder, position: int):
        if order.num_streams % layout.dp_size:
            raise UserError(
                f"data.num_streams={order.num_streams} is not divisible by the data-parallel size {layout.dp_size}"
            )
        self.sources, self.layout, self.seed, self.order, self.position = sources, layout, seed, order, position

    def _located(self) -> Iterator[tuple[list[int], list[int], list[int], list[int]]]:
        """(source, epoch, stream, offset) lists of this rank's positions, a block of global batches at a time."""
        lay, k, order = self.layout, self.order.num_streams, self.order
        per_rank = lay.global_batch // lay.dp_size
        offsets = lay.dp_rank + lay.dp_size * np.arange(per_rank, dtype=np.int64)
        batches = max(1, BLOCK // per_rank)
        position = self.position
        while True:
            starts = position + lay.global_batch * np.arange(batches, dtype=np.int64)
            source, cursor = order.locate((starts[:, None] + offsets[None, :]).ravel())
            epoch, index = np.divmod(cursor, order.lengths[source])
            yield source.tolist(), epoch.tolist(), (index % k).tolist(), (index // k).tolist()
            position += batches * lay.global_batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mb, k = self.layout.micro_batch, self.order.num_streams
        readers: dict[int, list] = {}  # source * K + stream -> [epoch, next offset, reader]
        orders: dict[tuple[int, int], GlobalOrder] = {}
        shards = _SharedShards(len(self.sources) * (k // self.layout.dp_size + 1))  # one per stream read
        samples = (row for block in self._located() for row in zip(*block, strict=True))
        for j in itertools.count():
            chunk = list(itertools.islice(samples, mb))
            if j % workers != worker:
                continue
            ids, rows, which = [], [], []
            for source, epoch, stream, offset in chunk:
                entry = readers.get(source * k + stream)
                if entry is None or entry[0] != epoch or entry[1] > offset:
                    if (source, epoch) not in orders:
                        for old in [key for key in orders if key[0] == source]:
                            del orders[old]
                        info_ = self.sources[source].manifest
                        orders[source, epoch] = GlobalOrder(info_, "train", self.seed, epoch, k)
                    reader = _Reader(
                        source, orders[source, epoch], self.sources[source].manifest, stream, offset, shards
                    )
                    entry = readers[source * k + stream] = [epoch, offset, reader]
                while entry[1] < offset:  # another worker's samples
                    next(entry[2])
                    entry[1] += 1
                sample_id, window = next(entry[2])
                entry[1] += 1
                ids.append(sample_id)
                rows.append(window)
                which.append(source)
            yield {
                "tokens": np.stack(rows),
                "ids": np.asarray(ids, dtype=np.int64),
                "source": np.asarray(which, dtype=np.int64),
            }


class MixtureLoader:
    """Iterates this rank's micro-batches of a mixture and knows the exact resumable state
    (taken at global-batch boundaries, like :class:`data.stream.TrainLoader`)."""

    def __init__(self, sources: list[Source], layout: Layout, seed: int, num_streams: int, num_workers: int = 0):
        self.sources, self.layout, self.seed = sources, layout, seed
        self.num_streams, self.num_workers = num_streams, num_workers
        self.names = [s.name for s in sources]
        self.lengths = [GlobalOrder(s.manifest, "train", seed, 0, num_streams).length for s in sources]
        self.weights = dict(zip(self.names, integer_weights([s.weight for s in sources]), strict=True))
        self.position = 0
        self.changed: tuple[dict[str, float], dict[str, float]] | None = None  # (old, new) at a resume
        self._start(Segment(0, self.weights, dict.fromkeys(self.names, 0)))

    def _start(self, segment: Segment) -> None:
        self.order = MixtureOrder(self.names, self.lengths, self.num_streams, segment)
        self._consumed = 0
        self._iterator: Iterator[dict[str, np.ndarray]] | None = None

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            dataset = MixtureStream(self.sources, self.layout, self.seed, self.order, self.position)
            self._iterator = worker_iterator(dataset, self.num_workers)
        arrays = next_arrays(self._iterator)
        tokens = torch.from_numpy(arrays["tokens"].astype(np.int64))
        batch = {
            "tokens": tokens,
            "ids": torch.from_numpy(arrays["ids"]),
            "source": torch.from_numpy(arrays["source"]),
            "mask": torch.ones(len(tokens), tokens.shape[1] - 1),
        }
        self._consumed += 1
        if self._consumed == self.layout.micro_batches_per_step:
            self._consumed = 0
            self.position += self.layout.global_batch
        return batch

    def samples(self) -> dict[str, int]:
        """Samples consumed from each source, over all ranks, since it joined the run."""
        return dict(zip(self.names, self.order.cursors(self.position).tolist(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        if self._consumed:
            raise RuntimeError("loader state requested in the middle of a global batch")
        cursors = self.order.cursors(self.position)
        return {
            "mixture": FORMAT,
            "seed": self.seed,
            "num_streams": self.num_streams,
            "position": self.position,
            "segment": self.order.segment.to_dict(),
            "sources": {
                name: {"epoch": int(c) // length, "position": int(c) % length}
                for name, c, length in zip(self.names, cursors, self.lengths, strict=True)
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A mixture state whose sources are named as this loader's (``pretrain/trainer/source_changes.py`` maps an
        older run's names and converts a one-source state). Sources it lacks start at their
        beginning; other weights or sources start a new segment at the next row."""
        if int(state["num_streams"]) != self.num_streams:
            raise UserError(
                f"data.num_streams={self.num_streams}, but the checkpoint's loader used "
                f"{state['num_streams']}: the global sample order would change"
            )
        recorded = state.get("sources", {})
        cursors = {
            name: int(recorded[name]["epoch"]) * length + int(recorded[name]["position"]) if name in recorded else 0
            for name, length in zip(self.names, self.lengths, strict=True)
        }
        self.position, saved = int(state.get("position", 0)), state.get("segment")
        self.changed = None
        if saved is not None and saved["weights"] == self.weights and not saved.get("restart"):
            self._start(Segment(int(saved["row"]), self.weights, {n: int(v) for n, v in saved["start"].items()}))
            return
        if saved is not None:
            self.changed = (normalised(saved["weights"]), normalised(self.weights))
        row = -(-self.position // self.num_streams)
        self.position = row * self.num_streams  # the partial row's other positions are never dealt
        self._start(Segment(row, self.weights, cursors))

    @property
    def segment(self) -> Segment:
        return self.order.segment


def normalised(weights: dict[str, int]) -> dict[str, float]:
    """Integer weights as the fractions of the samples they give."""
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}
