"""No orphans: every helper process of a trainer dies with it, however the trainer ends.

A trainer starts helpers that outlive a ``kill -9`` of it (or of its launcher) unless told
otherwise: they are reparented to init and go on holding memory, files and ports:

* megatron-core's results-queue ``Manager`` server (spawned once, by
  ``filesystem_async._get_write_results_queue``; a whole Python interpreter with torch);
* our persistent checkpoint writer (``parallel/async_writer.py``, spawned);
* forked children: megatron's per-bucket checkpoint writers (synchronous saves) and
  DataLoader workers. A fork also inherits the trainer's Python signal handlers: the
  preemption handler (``pretrain/trainer/preemption.py``) only sets a flag, so such a child
  ignored SIGTERM and took a SIGKILL to stop once orphaned;
* multiprocessing's resource tracker, which exits by itself once every process holding
  its pipe is gone (the trainer and the spawned helpers above): nothing to do for it.

:func:`install` (called once per trainer process, by ``the commands' main()``):

* registers an after-fork hook: a forked child dies with its parent, does not run the
  trainer's handlers, and *ignores* the stop signals the trainer catches (SIGTERM, SIGUSR1,
  SIGINT, ...): slurm and ``tests/integration/test_cluster.py`` signal every process of a job step, and
  a helper that died of that signal would break the checkpoint the trainer is about to save
  (a dead sync writer hangs megatron's save; a dead DataLoader worker raises in the
  trainer). The trainer decides when its helpers stop; they die with it. Other Python
  handlers go back to SIG_DFL. (torch's DataLoader workers then install their own C
  handler for SIGTERM, which ends them: that part is torch's.);
* :func:`patch_megatron_results_queue` (called by the megatron engine before its first
  save, so commands that never save do not import megatron for it) patches megatron-core's
  ``_get_write_results_queue`` (guarded: an upgrade that renames
  it fails here, loudly) so the Manager server dies with the trainer too, and ignores the
  same stop signals (the trainer's preemption checkpoint still goes through it);
* under torchrun (``TORCHELASTIC_RUN_ID``), makes the rank die with its torchrun agent:
  a ``kill -9`` of the launcher would otherwise leave ranks training with no supervisor.

"Dies with its parent" is Linux's ``PR_SET_PDEATHSIG`` = SIGKILL. That signal fires when
the *thread* that created the child exits, not the process, so it is only used for
children created from the parent's main thread; a child created from another thread
polls ``getppid()`` from a daemon thread instead. Off Linux both become the poll.
The hook runs for ``os.fork`` (multiprocessing's fork context included) and for
``subprocess`` with a ``preexec_fn``; a program exec'd from such a fork keeps both the
death signal and the ignored stop signals (none of the trainer's dependencies does that).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import sys
import threading
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# signals a scheduler or launcher sends to stop a job (torchrun forwards these), whose default ends a process
STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)
POLL_S = 1.0  # parent-liveness poll of the fallback (children of non-main threads, non-Linux)

_installed = False
# Which process and thread a fork comes from, as seen by the child (inherited memory): the
# pid of the process that last ran install() or the fork hook, and its main thread's ident
# (a forked child keeps the forking thread's ident).
_owner_pid = 0
_owner_main_ident = 0


def _set_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where unavailable (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _poll_parent(parent: int) -> None:
    """Kill this process once ``parent`` is gone (the child is reparented: getppid changes)."""
    import time

    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(parent: int, from_main_thread: bool = True) -> None:
    """Make this process die (SIGKILL) as soon as process ``parent`` does.

    Call it first thing in a child. ``from_main_thread`` says whether the parent created
    this child from its main thread (only then is PDEATHSIG safe: it fires on the exit of
    the creating thread); otherwise, or off Linux, a daemon thread polls the parent.
    """
    if not (from_main_thread and _set_pdeathsig(signal.SIGKILL)):
        threading.Thread(target=_poll_parent, args=(parent,), name="gpt-die-with-parent", daemon=True).start()
    if os.getppid() != parent:  # the parent was gone before PDEATHSIG was set: it never fires
        os.kill(os.getpid(), signal.SIGKILL)


def stop_signals() -> list[int]:
    """The stop signals this process catches in Python (preemption, Ctrl-C): its helpers ignore them."""
    caught = []
    for sig in STOP_SIGNALS:
        try:
            if callable(signal.getsignal(sig)):
                caught.append(int(sig))
        except (OSError, ValueError):
            continue
    return caught


def ignore_signals(signals: list[int]) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def reset_signal_handlers() -> None:
    """In a forked helper: the stop signals the parent catches are ignored, every other
    signal with a Python handler goes back to SIG_DFL (SIG_IGN dispositions are kept)."""
    stops = stop_signals()
    ignore_signals(stops)
    for sig in signal.valid_signals():
        try:
            if sig not in stops and callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            continue


def helper_start(parent: int, from_main_thread: bool, ignored: list[int]) -> None:
    """Initializer of a spawned helper: die with ``parent``, ignore its stop signals."""
    die_with_parent(parent, from_main_thread)
    ignore_signals(ignored)


def _after_fork_in_child() -> None:
    global _owner_pid, _owner_main_ident
    parent, from_main = _owner_pid, threading.get_ident() == _owner_main_ident
    _owner_pid, _owner_main_ident = os.getpid(), threading.get_ident()  # for forks of this child
    reset_signal_handlers()
    die_with_parent(parent, from_main)


def _results_queue_dies_with_trainer(filesystem_async: Any) -> Any:
    """megatron's ``_get_write_results_queue`` with a Manager whose server dies with the trainer.

    The original (megatron-core 0.16) creates ``mp.get_context("spawn").Manager().Queue()``
    once and keeps it in the module global ``_results_queue``; this does the same, with the
    server started with :func:`helper_start` as its initializer.
    """

    def get_write_results_queue() -> Any:
        if _results_here.active:  # a synchronous save: its results never leave this process
            return queue.Queue()
        if filesystem_async._results_queue is None:
            from multiprocessing.managers import SyncManager

            manager = SyncManager(ctx=filesystem_async.mp.get_context("spawn"))
            from_main = threading.current_thread() is threading.main_thread()
            manager.start(initializer=helper_start, initargs=(os.getpid(), from_main, stop_signals()))
            filesystem_async._results_queue = manager.Queue()
            get_write_results_queue.manager = manager  # type: ignore[attr-defined]  # keeps it referenced
        return filesystem_async._results_queue

    get_write_results_queue._gpt_patched = True  # type: ignore[attr-defined]
    return get_write_results_queue


class _ResultsHere(threading.local):
    active = False


_results_here = _ResultsHere()


@contextlib.contextmanager
def results_in_this_process() -> Any:
    """Within the block, a save's write results go through a plain in-process queue.

    A synchronous save writes (with forked per-bucket writers) and collects its results in this
    process, yet megatron-core hands them to its Manager server, which must import torch to unpickle
    them: seconds of a second interpreter for the first save of every process. Async saves (written by
    another process) still use the Manager."""
    _results_here.active = True
    try:
        yield
    finally:
        _results_here.active = False


def patch_megatron_results_queue() -> None:
    """Replace megatron-core's ``filesystem_async._get_write_results_queue`` (see above).

    Refuses, instead of silently leaving the Manager orphanable, when the names it
    replaces are gone (a megatron-core upgrade): re-check the upstream function then.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    current = getattr(filesystem_async, "_get_write_results_queue", None)
    if getattr(current, "_gpt_patched", False):
        return
    missing = [
        name for name in ("_get_write_results_queue", "_results_queue", "mp") if not hasattr(filesystem_async, name)
    ]
    # the function must still be the one that makes the Manager (megatron-core 0.16: ctx.Manager().Queue())
    if not missing and not {"Manager", "_results_queue"} <= set(current.__code__.co_names):
        missing = ["a _get_write_results_queue that starts a Manager"]
    if missing:
        raise RuntimeError(
            f"process_hygiene: megatron.core.dist_checkpointing.strategies.filesystem_async has no {missing}; "
            "re-check how it creates its results-queue Manager and update parallel/process_hygiene.py"
        )
    filesystem_async._get_write_results_queue = _results_queue_dies_with_trainer(filesystem_async)


def install() -> None:
    """Once per trainer process, at start: forked children reset signals and die with their
    parent, a torchrun rank dies with its agent."""
    global _installed, _owner_pid, _owner_main_ident
    if _installed:
        return
    _installed = True
    _owner_pid, _owner_main_ident = os.getpid(), threading.main_thread().ident or 0
    os.register_at_fork(after_in_child=_after_fork_in_child)
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        # the agent's thread that started this rank is unknown: poll rather than PDEATHSIG
        die_with_parent(os.getppid(), from_main_thread=False)
