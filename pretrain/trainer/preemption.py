"""Preemption: a SIGTERM / SIGUSR1 on any rank stops every rank at the same step boundary.

Slurm sends ``--signal=USR1@T`` (or SIGTERM at the time limit / on preemption) to the
processes of a job step; torchrun forwards the signals it handles to its workers. A
rank that gets one only sets a flag. At every step boundary the ranks all-reduce
(MAX) that flag, so they all see the stop at the same step, save a checkpoint
together, and exit with ``train.requeue_exit_code`` — the code the sbatch template
requeues on. Ctrl-C (SIGINT) stops the same way but exits 130, and a second Ctrl-C
aborts at once (one line, no traceback, no save). Under ``launch/torchrun.sh`` the code
is also written to the file named by ``GPT_LAUNCH_STATUS``: torchrun reports any failing
worker as exit 1, so the launcher reads the worker's intended code from there.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

import torch
import torch.distributed as dist

from conf.errors import UserError
from parallel.watchdog import write_launch_status

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: Ctrl-C, after saving


class StopRequest:
    """The signal flag of this rank and the all-rank agreement on it."""

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1")):
        self.received: str | None = None
        self.signals = [_signal(name) for name in signals]
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        """Catch the signals from now on (forked helpers ignore them: ``parallel/process_hygiene.py``)."""
        for sig in self.signals:
            if signal.getsignal(sig) is signal.SIG_IGN:  # started ignoring it (nohup: SIGHUP): keep that
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":  # a second Ctrl-C: leave now, no traceback
            print(f"rank {_rank()}: second SIGINT; aborting without saving", file=sys.stderr, flush=True)
            os._exit(INTERRUPTED_EXIT_CODE)
        if self.received is None:
            self.received = name
            again = " (Ctrl-C again aborts without saving)" if name == "SIGINT" else ""
            print(f"rank {_rank()}: got {name}; saving at the next step boundary{again}", flush=True)

    def agreed(self) -> str | None:
        """The signal some rank got (the highest number if several), the same answer on every
        rank (a collective), or None."""
        local = signal.Signals[self.received].value if self.received else 0
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received
        flag = torch.tensor([local], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return signal.Signals(int(flag.item())).name if flag.item() else None


def _signal(name: str) -> signal.Signals:
    try:
        return signal.Signals[str(name).upper()]
    except KeyError:
        raise UserError(f"train.preempt_signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)") from None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def exit_for_requeue(code: int) -> None:
    """Leave with the requeue code, telling ``launch/torchrun.sh`` through its status file."""
    write_launch_status(code)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
