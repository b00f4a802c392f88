"""gpt-eval's ``limit=N``: N documents of a task drawn (seeded) from its whole split.

Why not lm-eval's ``limit``: it takes the first N documents, and a task file sorted by label (or by
source: reviews of one movie together) then gives an accuracy that is the majority-class rate of its
first lines. lm-eval's own extension point for a chosen subset is ``simple_evaluate(samples=...)``,
document indices per task; the same indices select the examples of the classifier task.
"""

from __future__ import annotations


class SampledIndices(list):
    """lm-eval's ``samples=`` for one task: sorted document indices (lm-eval maps its i-th selected
    document back by position), with a set's membership test (it asks ``i in samples`` for every
    document of the split: a list would make that quadratic)."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__(indices)
        self._members = frozenset(indices)

    def __contains__(self, index: object) -> bool:
        return index in self._members


def sample_documents(count: int, limit: int | None, seed: int) -> SampledIndices | None:
    """``limit`` of ``count`` document indices drawn without replacement with ``seed``, sorted: a sample
    spread over the whole split. None: all of them (no limit, or a limit of at least ``count``)."""
    if limit is None or limit >= count:
        return None
    import numpy as np

    return SampledIndices(sorted(np.random.default_rng(seed).choice(count, size=limit, replace=False).tolist()))
