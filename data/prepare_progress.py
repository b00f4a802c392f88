"""Progress of a long gpt-prepare: a tqdm bar (MB/s, ETA) on a terminal, else one line a minute.

A log (``gpt-prepare ... 2> prepare.log``, a batch job) gets a line it can be read by, not a bar
redrawn a hundred times a second.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 60.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Bytes of input (or shards: ``unit="shard"``) done out of ``total`` (``initial`` of them done
    before this run started)."""

    def __init__(
        self,
        total: int,
        desc: str,
        initial: int = 0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = LOG_INTERVAL_S,
        unit: str = "B",
    ) -> None:
        self.stream = stream or sys.stderr
        self.total, self.desc, self.initial, self.done = total, desc, initial, initial
        self.clock, self.interval, self.unit = clock, interval, unit
        self.start = self.last = clock()
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = (
            tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == "B", file=self.stream)
            if tty
            else None
        )

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        rate = (self.done - self.initial) / max(now - self.start, 1e-9)
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        percent = 100 * self.done / max(self.total, 1)
        if self.unit != "B":
            return f"{self.desc}: {self.done} of {self.total} {self.unit}s ({percent:.0f}%), ETA {eta}"
        return (
            f"{self.desc}: {self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB ({percent:.0f}%), "
            f"{rate / 1e6:.2f} MB/s, ETA {eta}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tokenize_progress(files: list[Any], finished: set[int]) -> Progress:
    """Input bytes tokenized (a bar on a terminal, else one line a minute), counting those done before."""
    from data.inputs import size_of

    sizes = [size_of(path) for path in files]
    return Progress(sum(sizes), "tokenize", initial=sum(sizes[i] for i in finished))
