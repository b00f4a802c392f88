"""The training lines a log or a terminal shows: rates averaged over the interval, elapsed time, ETA.

``metrics.jsonl`` keeps each step's own ``tokens_per_s`` (and ``mfu``); one step's rate swings with
whatever else the machine does in that moment, so the periodic console line shows the rates averaged
over the steps since the previous line (weighted by their step times: total work over total time),
the wall time since the run (re)started, and an ETA from the session's wall time per step so far (saves and
evaluations included, averaged over the session: the line after an evaluation does not jump).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

AVERAGED = ("tokens_per_s", "examples_per_s", "mfu")


def clock(seconds: float) -> str:
    """``1:02:03`` (hours:minutes:seconds)."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def fields(record: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


class Interval:
    """The steps since the last console line (started at ``step``, the run's first step this session)."""

    def __init__(self, step: int, max_steps: int):
        self.max_steps = max_steps
        self.started, self.first_step = time.monotonic(), step
        self._reset(step)

    def _reset(self, step: int) -> None:
        self.since_step, self.since = step, time.monotonic()
        self.busy = 0.0
        self.work: dict[str, float] = defaultdict(float)

    def add(self, record: dict[str, Any]) -> None:
        """A training step's record."""
        seconds = record.get("step_time_s")
        if not seconds:
            return
        self.busy += seconds
        for key in AVERAGED:
            if isinstance(record.get(key), int | float):
                self.work[key] += record[key] * seconds

    def quiet_for(self) -> float:
        """Seconds since the last line."""
        return time.monotonic() - self.since

    def line(self, record: dict[str, Any]) -> str:
        """The console line of ``record`` (a training step), and a new interval from it."""
        step, now = record["step"], time.monotonic()
        shown = {k: v for k, v in record.items() if k not in ("step", "step_time_s", *AVERAGED)}
        steps = step - self.since_step
        if self.busy:
            shown.update({k: work / self.busy for k, work in self.work.items()})
            shown["avg_steps"] = steps
        done = step - self.first_step
        eta = (now - self.started) / done * (self.max_steps - step) if done > 0 else None
        text = f"step={step}/{self.max_steps} {fields(shown)} elapsed={clock(now - self.started)}"
        self._reset(step)
        return text + (f" eta={clock(eta)}" if eta is not None else "")
