"""Collective watchdog: fail with rank, step and operation instead of hanging.

A dead or hung peer leaves the others blocked in a collective. gloo raises after the
process-group timeout (NCCL may block for much longer), and its message names
neither the step nor what the job was doing. Every rank therefore runs each phase of
the loop (train step, evaluation, checkpoint save, stop agreement) inside
:meth:`Watchdog.watch`: a daemon thread checks the phase's age, and one that exceeds
``parallel.timeout_s`` prints one line naming rank, step and operation, then ends the
process with :data:`WATCHDOG_EXIT_CODE` (``os._exit``: a thread stuck in a collective
cannot be unwound). A collective that raises (a peer's socket closed) is reported in
the same words. Relaunching resumes from ``checkpoints/latest``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

WATCHDOG_EXIT_CODE = 70  # EX_SOFTWARE: not a requeue, a failure to look at
STATUS_ENV = "GPT_LAUNCH_STATUS"  # set by launch/torchrun.sh: torchrun reports any failing worker as 1


def write_launch_status(code: int) -> None:
    """Tell the launcher this rank's intended exit code (it exits with it instead of torchrun's)."""
    status = os.environ.get(STATUS_ENV)
    if status:
        try:
            with open(status, "w") as out:
                out.write(f"{code}\n")
        except OSError as exc:  # the exit code still says it
            print(f"could not write {STATUS_ENV}={status}: {exc}", file=sys.stderr, flush=True)


class Watchdog:
    """One per rank; :meth:`watch` marks the phase the rank is in."""

    def __init__(self, timeout_s: float, rank: int, world_size: int, enabled: bool = True):
        self.timeout_s = float(timeout_s)
        self.rank, self.world_size = rank, world_size
        self.enabled = enabled and self.timeout_s > 0
        self._phase: tuple[str, int, float] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="gpt-watchdog", daemon=True)
            self._thread.start()

    def message(self, op: str, step: int, what: str) -> str:
        return (
            f"watchdog: rank {self.rank} of {self.world_size}, step {step}, operation '{op}': {what}. "
            "A peer rank died or hangs (or parallel.timeout_s is too short for this operation); "
            f"exiting with code {WATCHDOG_EXIT_CODE}. Relaunch the same command to resume from checkpoints/latest."
        )

    @contextlib.contextmanager
    def watch(self, op: str, step: int) -> Iterator[None]:
        """Run one phase under the timeout; a failing collective inside it is reported the same way."""
        if not self.enabled:
            yield
            return
        with self._lock:
            self._phase = (op, step, time.monotonic())
        try:
            yield
        except Exception as exc:  # a collective whose peer is gone raises (gloo: connection closed)
            if not _is_comm_error(exc):
                raise
            self._die(self.message(op, step, f"collective failed: {type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._phase = None

    def beat(self) -> None:
        """Restart the current phase's clock (long phases made of many collectives, e.g. evaluation)."""
        with self._lock:
            if self._phase is not None:
                self._phase = (self._phase[0], self._phase[1], time.monotonic())

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        period = min(1.0, max(0.05, self.timeout_s / 20))
        while not self._stop.wait(period):
            with self._lock:
                phase = self._phase
            if phase is not None and time.monotonic() - phase[2] > self.timeout_s:
                op, step, _ = phase
                self._die(self.message(op, step, f"not finished after parallel.timeout_s={self.timeout_s:g} s"))

    def _die(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        write_launch_status(WATCHDOG_EXIT_CODE)
        import multiprocessing

        for child in multiprocessing.active_children():  # checkpoint writer, megatron's queue manager
            child.kill()
        os._exit(WATCHDOG_EXIT_CODE)


def _is_comm_error(exc: BaseException) -> bool:
    """Errors of the communication layer, as opposed to bugs or bad input in the phase itself."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("gloo", "nccl", "connection", "timed out", "broken pipe", "peer")
    )
