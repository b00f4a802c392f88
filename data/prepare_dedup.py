"""Exact-duplicate documents for ``gpt-prepare dedup=true``: a 64-bit hash of the normalised text
and a set of the hashes seen that costs 8 bytes per kept document (16 while two runs merge).

Normalised: Unicode NFC, every run of whitespace one space (leading/trailing dropped), lowercase.
A document cut into pieces (``data/corpus.py``) is hashed as the hash of its pieces' hashes, so two
long documents count as duplicates when they are equal piece by piece. Two different documents
share a 64-bit hash with probability about n²/2⁶⁵ (n = 10⁹ documents: 3%, and then one document
is dropped wrongly), which is the price of 8 bytes a document.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

import numpy as np
import xxhash


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split()).lower()


def piece_hashes(texts: Iterable[str]) -> np.ndarray:
    """The 64-bit hash of each piece's normalised text."""
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(normalise(t).encode("utf-8", "surrogatepass")) for t in texts), np.uint64
    )


def combine(hashes: np.ndarray) -> int:
    """A document's hash from its pieces' hashes (one piece: that piece's hash)."""
    if len(hashes) == 1:
        return int(hashes[0])
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(hashes, dtype="<u8").tobytes())


class HashSet:
    """A set of uint64 held as a few sorted numpy runs (a log-structured merge).

    Hand-written because Python's ``set`` costs about 70 bytes an entry and no maintained library
    offers an exact, compact, vectorised integer set. Runs are merged when the newer one grows to
    half the older, so there are O(log n) of them and a lookup is a ``searchsorted`` in each.
    """

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runs)

    def contains(self, values: np.ndarray) -> np.ndarray:
        found = np.zeros(len(values), dtype=bool)
        for run in self.runs:
            index = np.minimum(np.searchsorted(run, values), len(run) - 1)
            found |= run[index] == values
        return found

    def add_unique(self, values: np.ndarray) -> None:
        """Add values that are distinct and not in the set yet."""
        if len(values) == 0:
            return
        self.runs.append(np.sort(values.astype(np.uint64, copy=False)))
        while len(self.runs) > 1 and 2 * len(self.runs[-1]) >= len(self.runs[-2]):
            newer = self.runs.pop()
            older = self.runs.pop()
            merged = np.concatenate([older, newer])
            merged.sort(kind="stable")
            self.runs.append(merged)

    def first_seen(self, values: np.ndarray) -> np.ndarray:
        """Which of ``values`` (in order) are new: not in the set and not earlier in ``values``;
        those are added."""
        new = np.zeros(len(values), dtype=bool)
        if len(values) == 0:
            return new
        _, first = np.unique(values, return_index=True)
        new[first] = True
        new &= ~self.contains(values)
        self.add_unique(values[new])
        return new
