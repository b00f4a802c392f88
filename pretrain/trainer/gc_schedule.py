"""Python's garbage collector on the step schedule: start-up objects frozen, a collection every N steps.

CPython's automatic collector runs when allocations cross its thresholds, at whatever step that
happens, and a full (generation 2) pass walks every object the process holds: with megatron-core,
transformers and the evaluation harness imported, hundreds of thousands of objects that never
become garbage. On one process that is a pause inside random steps; on many ranks each rank pauses
at a different step and the others wait for it in the next collective. Megatron-LM (``--manual-gc``)
and torchtitan (``training.gc_freq``) therefore collect on a schedule. Here, when the loop starts:
one collection, then ``gc.freeze()`` (everything alive after start-up moves to the permanent
generation, which collections skip) and ``gc.disable()``; then a full collection every
``train.gc_every`` steps, before the step and inside its clock (``step_time_s`` includes it); at the
end the collector is restored. ``train.gc_every=0`` leaves Python's automatic collector on.
Cyclic garbage made between two collections (the autograd graph is freed by reference counting,
not by the collector) waits at most ``gc_every`` steps.
"""

from __future__ import annotations

import gc


class GcSchedule:
    """``start()`` before the first step, ``before_step(step)`` before each, ``stop()`` at the end."""

    def __init__(self, every: int):
        self.every = every
        self.active = False

    def start(self) -> None:
        if self.every <= 0 or not gc.isenabled():  # off, or the embedding program manages the collector
            return
        gc.collect()
        gc.freeze()
        gc.disable()
        self.active = True

    def before_step(self, step: int) -> None:
        """Collect before step ``step + 1`` when ``step`` (the steps done) is a multiple of ``every``."""
        if self.active and step % self.every == 0:
            gc.collect()

    def stop(self) -> None:
        if self.active:
            gc.unfreeze()
            gc.enable()
            self.active = False
