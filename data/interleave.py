"""A smooth, deterministic interleave of sources by weight: which source fills slot ``n``.

With integer weights ``a_i`` (``T = sum a_i``), source ``i``'s ``j``-th slot (j = 1, 2, ...) has
the *window* of slots ``[floor((j-1)·T/a_i), ceil(j·T/a_i))``: exactly the slots in which giving
it its ``j``-th keeps its count within 1 of the ideal ``n·a_i/T``. Each slot goes to the source
whose pending window has begun and ends first (earliest deadline first; ties: the lower index).
On one processor EDF meets every window whenever some assignment does, and total weight 1 makes
one exist (proportionate fairness, "Pfair": Baruah, Cohen, Plaxton, Varvel 1996), so for every
prefix of ``n`` slots and every source ``i``::

    |count_i(n) - n·a_i/T| < 1

The sequence repeats with period ``T`` (after ``T`` slots every count is exact), so one period is
computed once and any slot's source or prefix count is a table lookup; ``tests/unit/test_mixture.py``
checks the bound over whole periods of random weight vectors. Hand-written: no maintained library
offers Pfair / stride sequences (MosaicML Streaming and Megatron draw per epoch or per batch).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from conf.errors import UserError

RESOLUTION = 1 << 16  # weights whose exact ratio needs a longer period are rounded to 1/65536


def integer_weights(weights: Sequence[float], resolution: int = RESOLUTION) -> list[int]:
    """Relative weights as the smallest integers in the same ratio (``0.7, 0.3`` -> ``7, 3``),
    read as the decimals they print as; ratios that need a period above ``resolution`` are
    rounded to ``resolution`` parts (largest remainder; a non-zero weight keeps at least 1)."""
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise UserError(f"mixture weights {list(weights)}: must be >= 0, at least one > 0")
    exact = [Fraction(repr(float(w))) for w in weights]
    scale = np.lcm.reduce([f.denominator for f in exact]) if len(exact) > 1 else exact[0].denominator
    ints = [int(f * int(scale)) for f in exact]
    divisor = int(np.gcd.reduce(ints)) if len(ints) > 1 else ints[0]
    ints = [i // divisor for i in ints]
    if sum(ints) <= resolution:
        return ints
    total = sum(exact)
    shares = [f / total * resolution for f in exact]
    rounded = [max(int(s), 1) if s > 0 else 0 for s in shares]
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - int(shares[i])), i))
    for i in order[: max(resolution - sum(rounded), 0)]:
        rounded[i] += 1
    return rounded


class Interleave:
    """The interleave of integer weights ``a`` (see module docstring): slot -> source, prefix counts."""

    def __init__(self, weights: Sequence[int]):
        self.weights = np.asarray(weights, dtype=np.int64)
        self.period = int(self.weights.sum())
        if self.period < 1 or (self.weights < 0).any():
            raise UserError(f"mixture weights {list(weights)}: must be >= 0, at least one > 0")
        self.pattern = _pfair(self.weights.tolist())
        prefix = np.zeros((len(self.weights), self.period + 1), dtype=np.int64)
        for i in range(len(self.weights)):
            prefix[i, 1:] = np.cumsum(self.pattern == i)
        self.prefix = prefix

    def source(self, slots: np.ndarray) -> np.ndarray:
        """The source of each slot."""
        return self.pattern[slots % self.period]

    def count(self, slots: np.ndarray, sources: np.ndarray) -> np.ndarray:
        """How many of the slots before each ``slots[j]`` went to ``sources[j]``."""
        return (slots // self.period) * self.weights[sources] + self.prefix[sources, slots % self.period]

    def counts(self, slot: int) -> np.ndarray:
        """Every source's count of the slots before ``slot``."""
        return (slot // self.period) * self.weights + self.prefix[:, slot % self.period]


def _pfair(weights: list[int]) -> np.ndarray:
    """One period of the earliest-deadline-first Pfair sequence (one heap operation per slot)."""
    total = sum(weights)
    counts = [0] * len(weights)
    ready: list[tuple[int, int]] = []  # (deadline, source) of windows that have begun
    waiting: list[tuple[int, int, int]] = []  # (release, deadline, source)

    def window(i: int) -> tuple[int, int]:
        j = counts[i] + 1
        return (j - 1) * total // weights[i], -(-j * total // weights[i])

    for i, a in enumerate(weights):
        if a:
            release, deadline = window(i)
            heapq.heappush(waiting, (release, deadline, i))
    out = np.empty(total, dtype=np.int32)
    for slot in range(total):
        while waiting and waiting[0][0] <= slot:
            _, deadline, i = heapq.heappop(waiting)
            heapq.heappush(ready, (deadline, i))
        _, i = heapq.heappop(ready)
        out[slot] = i
        counts[i] += 1
        if counts[i] < weights[i]:
            release, deadline = window(i)
            heapq.heappush(waiting, (release, deadline, i))
    return out
