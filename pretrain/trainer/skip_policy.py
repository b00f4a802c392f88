"""Non-finite losses and loss spikes: skip the update, count it, stop after too many in a row.

One bad batch (or a transient numerical blow-up) should not end a long run, and a run
that keeps producing them should stop before it burns its budget. The decision must be
the same on every rank: a rank that steps while another skips would desynchronise the
replicas (or hang in the distributed optimizer's collectives), so each rank's verdict
is all-reduced (MAX) and any rank's "skip" skips the step everywhere.

- a step whose global-batch loss is not finite is skipped;
- with ``train.spike_factor = f``, so is a step whose loss exceeds f x the mean of the
  last ``WINDOW`` applied steps (once ``MIN_HISTORY`` of them exist);
- a skipped step consumes its batch but makes no update and does not advance the lr
  schedule; ``skipped_steps`` counts them in ``metrics.jsonl``;
- after ``train.max_skipped`` consecutive skips the run stops in one line (exit 1)
  without saving, so the last checkpoint is the last good state.

The loss history is part of the checkpoint's train state, so a resumed run decides
exactly as the uninterrupted one would. With the test harness switch on
(``conf/test_hooks.py``), ``GPT_FAULT_NAN_STEPS=3,5`` (and optionally ``GPT_FAULT_RANK=R``) makes
those steps' losses look non-finite on that rank: fault injection for tests of this policy.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
import torch.distributed as dist

from conf import test_hooks
from conf.errors import RunError

WINDOW = 50
MIN_HISTORY = 10


class SkipPolicy:
    def __init__(self, spike_factor: float | None, max_skipped: int, rank0: bool = True):
        self.spike_factor = float(spike_factor) if spike_factor else None
        self.max_skipped = int(max_skipped)
        self.history: deque[float] = deque(maxlen=WINDOW)
        self.consecutive = 0
        self.total = 0
        self.step = 0  # the step being decided (set by the trainer before each step)
        self.reason = ""
        self._faults = test_hooks.int_set("GPT_FAULT_NAN_STEPS", announce=rank0)
        self._fault_rank = test_hooks.int_value("GPT_FAULT_RANK", -1)

    def _local_reason(self, loss: float) -> str:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.step in self._faults and self._fault_rank in (-1, rank):
            loss = float("nan")
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if self.spike_factor and len(self.history) >= MIN_HISTORY:
            mean = sum(self.history) / len(self.history)
            if loss > self.spike_factor * mean:
                return f"loss {loss:.4g} > train.spike_factor={self.spike_factor:g} x recent mean {mean:.4g}"
        return ""

    def accept(self, loss: float) -> bool:
        """Whether to apply this step's update: a collective, the same answer on every rank."""
        self.reason = self._local_reason(loss)
        skip = torch.tensor([1 if self.reason else 0], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(skip, op=dist.ReduceOp.MAX)
        if skip.item():
            self.reason = self.reason or "another rank's loss"
            self.consecutive += 1
            self.total += 1
            return False
        self.consecutive = 0
        self.history.append(loss)
        return True

    def check(self) -> None:
        """Stop (one line, :class:`RunError`) after ``max_skipped`` consecutive skipped steps."""
        if self.consecutive >= self.max_skipped:
            raise RunError(
                f"step {self.step}: {self.consecutive} consecutive steps skipped (last: {self.reason}); "
                "stopping with the last checkpoint intact: lower train.lr, raise train.spike_factor or check the data"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.history = deque(state["history"], maxlen=WINDOW)
            self.consecutive, self.total = int(state["consecutive"]), int(state["total"])
