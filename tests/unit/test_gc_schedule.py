"""The training loop's garbage-collection schedule (``train.gc_every``)."""

from __future__ import annotations

import gc
import weakref

from pretrain.trainer.gc_schedule import GcSchedule


class Node:
    pass


def cycle() -> weakref.ref:
    """A reference cycle only the collector can free; a weak reference that says when it is gone."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_collects_only_on_schedule_and_restores_the_collector() -> None:
    schedule = GcSchedule(every=3)
    schedule.start()
    try:
        assert not gc.isenabled() and gc.get_freeze_count() > 0  # start-up objects frozen
        garbage = cycle()
        for _ in range(2000):  # allocations that would trigger the automatic collector
            cycle()
        schedule.before_step(2)
        assert garbage() is not None  # not a step of the schedule: nothing collected
        schedule.before_step(3)
        assert garbage() is None
    finally:
        schedule.stop()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_zero_leaves_the_automatic_collector() -> None:
    schedule = GcSchedule(every=0)
    schedule.start()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    schedule.before_step(0)
    schedule.stop()
    assert gc.isenabled()
