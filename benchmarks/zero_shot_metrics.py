"""lm-eval metrics of seed_analyses' zero-shot sentiment task (loaded by the task YAML's ``!function``).

Accuracy alone hides what a small LM knows here: its prior for one answer word is larger than any
shift a review brings, so it gives that word for every review and scores the majority rate.
``auc`` is threshold-free: the probability that a review of the first label gets a larger margin
log p(answer 0) - log p(answer 1) than a review of the second (0.5: the review is not read; ties
count half). The label order is in ``sentiment_zero_shot_labels.json`` next to this file (the
script writes it with the task).
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from pathlib import Path
from typing import Any

_SPEC = json.loads((Path(__file__).with_name("sentiment_zero_shot_labels.json")).read_text())


def process_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, Any]:
    """Per review: accuracy (the likelier answer) and (gold index, margin of answer 0 over answer 1)."""
    lls = [ll for ll, _ in results]
    gold = _SPEC["labels"].index(str(doc[_SPEC["field"]]))
    best = max(range(len(lls)), key=lls.__getitem__)
    return {"acc": float(best == gold), "auc": (gold, lls[0] - lls[1])}


def auc(items: list[tuple[int, float]]) -> float:
    """Mann-Whitney AUC of the margins of label 0's reviews over label 1's (ties half)."""
    first = [m for g, m in items if g == 0]
    second = sorted(m for g, m in items if g == 1)
    if not first or not second:
        return float("nan")
    wins = sum(bisect_left(second, m) + (bisect_right(second, m) - bisect_left(second, m)) / 2 for m in first)
    return wins / (len(first) * len(second))
