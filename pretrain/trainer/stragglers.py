"""Stragglers named: a rank that is persistently slower than its peers, with its host.

Why not the step time: in a synchronous job every rank's step ends together (the gradient
reduction waits for the slowest), so a straggler makes every rank's ``step_time_s`` long and names
nobody. What differs between ranks is the work each does on its own before it waits: loading its
micro-batches and running its model's forward passes. So each rank times exactly that (the data
with a clock, the forward with hooks on its model, CUDA events on a GPU, where kernels run
asynchronously), and every ``parallel.straggler_every`` steps the ranks all-gather their mean
compute time per step over that window. A rank above ``parallel.straggler_factor`` x the median
of the ranks of its pipeline stage (those that do the same work; the lower median, so that with
two ranks the faster one is the reference) for ``parallel.straggler_windows`` windows in a row is
named once per streak, in one line and a ``{"event": "straggler"}`` record. The backward pass runs
on the same device as the forward, so the forward stands for both. Ranks of one tensor-parallel
group wait for each other inside the forward: a slow one slows its group, which is named together.

Test hook (``conf/test_hooks.py``, off unless ``GPT_TEST_HARNESS=1``): ``GPT_FAULT_SLOW_RANK=R``
makes rank R's forward passes ``GPT_FAULT_SLOW_MS`` longer (default 50) from step
``GPT_FAULT_SLOW_FROM`` (default 1) on.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from conf import test_hooks
from conf.errors import UserError

T = TypeVar("T")


def check(every: int, factor: float, windows: int) -> None:
    """The ``parallel.straggler_*`` keys, one line each (before any work)."""
    if every < 0:
        raise UserError(f"parallel.straggler_every={every}: must be >= 0 (0: off)")
    if not factor > 1:
        raise UserError(f"parallel.straggler_factor={factor}: must be > 1 (a slow rank is this many times the median)")
    if windows < 1:
        raise UserError(f"parallel.straggler_windows={windows}: must be >= 1")


class Stragglers:
    """Times this rank's own work per step; every ``every`` steps (a collective on every rank) finds
    the ranks that are slow for ``windows`` windows in a row."""

    def __init__(self, every: int, factor: float, windows: int, world_size: int, rank: int):
        check(every, factor, windows)
        self.every = every if world_size > 1 else 0  # one rank has no peer to compare with
        self.factor, self.windows, self.rank = factor, windows, rank
        self.compute_s = 0.0  # this window's data + forward seconds
        self.steps = 0
        self.streak: dict[int, int] = {}  # rank -> slow windows in a row
        self._began: list[Any] = []  # forward start marks not yet matched by an end
        self._pairs: list[tuple[Any, Any]] = []  # CUDA event pairs to read at the window's end
        self._handles: list[Any] = []
        self._slow_rank = test_hooks.int_value("GPT_FAULT_SLOW_RANK", -1)
        self._slow_s = test_hooks.int_value("GPT_FAULT_SLOW_MS", 50) / 1000
        self._slow_from = test_hooks.int_value("GPT_FAULT_SLOW_FROM", 1)
        self.step = 0  # the step being trained (the slow-rank hook's clock)
        self._cuda = False
        if self._slow_rank == rank and self.every:
            print(
                f"warning: test fault injected: rank {rank} is {self._slow_s * 1000:.0f} ms slower per forward "
                f"from step {self._slow_from} ({test_hooks.SWITCH}=1)",
                file=sys.stderr,
                flush=True,
            )

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def attach(self, model: Any, first_step: int) -> None:
        """Time ``model``'s training forward passes on this rank from step ``first_step`` (hooks;
        removed by :meth:`close`)."""
        self.step = first_step
        if not self.enabled:
            return
        self._cuda = next(model.parameters()).is_cuda
        self._handles = [model.register_forward_pre_hook(self._forward_began), model.register_forward_hook(self._ended)]

    def _mark(self) -> Any:
        if self._cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _forward_began(self, module: Any, args: Any) -> None:
        if not module.training:  # an evaluation's forward is not a step's work
            return
        self._began.append(self._mark())
        if self._slow_rank == self.rank and self.step >= self._slow_from:
            time.sleep(self._slow_s)

    def _ended(self, module: Any, args: Any, output: Any) -> None:
        if not module.training or not self._began:
            return
        began, ended = self._began.pop(), self._mark()
        if self._cuda:
            self._pairs.append((began, ended))
        else:
            self.compute_s += ended - began

    def data(self, load: Callable[[], T]) -> T:
        """``load()`` (this step's micro-batches), timed as this rank's own work."""
        if not self.enabled:
            return load()
        began = time.perf_counter()
        try:
            return load()
        finally:
            self.compute_s += time.perf_counter() - began

    def step_done(self, step: int) -> list[dict[str, Any]]:
        """After step ``step`` on every rank: at a window's end, the all-gather and the ranks named
        now (each a record for ``metrics.jsonl``; the same list on every rank)."""
        self.step = step + 1
        if not self.enabled:
            return []
        self.steps += 1
        if step % self.every:
            return []
        import torch.distributed as dist

        if self._pairs:  # wait for the window's last forward to finish on the device, then read them all
            self._pairs[-1][1].synchronize()
            self.compute_s += sum(a.elapsed_time(b) for a, b in self._pairs) / 1000
            self._pairs = []
        mine = (socket.gethostname(), _stage(), self.compute_s / max(self.steps, 1))
        self.compute_s, self.steps = 0.0, 0
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return self.judge(step, gathered)

    def judge(self, step: int, gathered: list[tuple[str, int, float]]) -> list[dict[str, Any]]:
        """The ranks slow in this window for ``windows`` windows in a row, as events."""
        named = []
        for rank, (host, stage, seconds) in enumerate(gathered):
            peers = [s for _, st, s in gathered if st == stage]
            median = statistics.median_low(peers)
            slow = len(peers) > 1 and median > 0 and seconds > self.factor * median
            self.streak[rank] = self.streak.get(rank, 0) + 1 if slow else 0
            if self.streak[rank] == self.windows:
                named.append(
                    {
                        "step": step,
                        "event": "straggler",
                        "rank": rank,
                        "host": host,
                        "compute_s": seconds,
                        "median_s": median,
                        "windows": self.windows,
                        "window_steps": self.every,
                    }
                )
        return named

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def describe(event: dict[str, Any]) -> str:
    """A named straggler in one line (rank 0's console)."""
    ratio = event["compute_s"] / event["median_s"]
    return (
        f"straggler: rank {event['rank']} on {event['host']}: {event['compute_s'] * 1000:.1f} ms of its own work "
        f"(data + forward) per step, {ratio:.1f}x its stage's median {event['median_s'] * 1000:.1f} ms, "
        f"for {event['windows']} windows of {event['window_steps']} steps (step {event['step']})"
    )


def _stage() -> int:
    """This rank's pipeline stage: the ranks compared with each other do the same work."""
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
