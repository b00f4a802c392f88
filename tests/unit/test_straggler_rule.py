"""The straggler rule (``pretrain/trainer/stragglers.py``) without a process group."""

from __future__ import annotations

import pytest

from conf.errors import UserError
from pretrain.trainer.stragglers import Stragglers


def test_the_judgement_compares_ranks_of_one_stage_and_names_a_streak_once() -> None:
    """The rule itself (no process group): the lower median of the rank's pipeline stage, a streak of
    ``windows`` slow windows, reset by a normal one."""
    judge = Stragglers(every=5, factor=1.5, windows=2, world_size=4, rank=0)
    # stage 1 (ranks 2, 3) does more work than stage 0: not slow, only different
    normal = [("a", 0, 0.010), ("b", 0, 0.011), ("c", 1, 0.030), ("d", 1, 0.031)]
    slow3 = [("a", 0, 0.010), ("b", 0, 0.011), ("c", 1, 0.030), ("d", 1, 0.090)]
    assert judge.judge(5, normal) == []
    assert judge.judge(10, slow3) == []  # one slow window: not yet
    assert judge.judge(15, normal) == []  # the streak is broken
    assert judge.judge(20, slow3) == []
    (event,) = judge.judge(25, slow3)
    assert (event["rank"], event["host"], event["median_s"]) == (3, "d", 0.030)
    assert judge.judge(30, slow3) == []  # named once per streak
    two = Stragglers(every=5, factor=1.5, windows=1, world_size=2, rank=0)
    (event,) = two.judge(5, [("a", 0, 0.010), ("b", 0, 0.020)])  # two ranks: the faster is the reference
    assert event["rank"] == 1
    for bad in ({"every": -1}, {"factor": 1.0}, {"windows": 0}):
        with pytest.raises(UserError, match="parallel.straggler_"):
            Stragglers(**{"every": 5, "factor": 1.5, "windows": 2, **bad}, world_size=2, rank=0)
