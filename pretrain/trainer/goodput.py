"""The goodput account of a run: where its wall time went, from ``metrics.jsonl`` alone.

Why from ``metrics.jsonl``: it is the one file every session of a run appends to (rank 0), it survives
requeues, elastic restarts and ``kill -9``, and a resume already rewrites it to read as one
uninterrupted run. So each session writes what the account needs as it goes (:func:`session_events`
at its start, ``session_end`` at its close), and ``gpt-goodput RUN_DIR`` (:func:`account`) adds it up
later without any process of the run alive.

What each session records:

- ``{"event": "session_start", "time"}``: the wall-clock start of the rank-0 process (what ``startup_s``
  measures from), the step it starts at, its world size and layout, and ``previous_end``: when the
  session before it stopped writing (its ``session_end``, else the last write to ``metrics.jsonl``: a
  ``kill -9`` leaves no other trace);
- ``{"event": "recomputed", "steps", "train_s", ...}``: the lines the resume drops (logged after
  the checkpoint it continues from): their steps are trained again, so their time was lost;
- ``startup_s`` on its first step, ``step_time_s`` on every step, ``val_time_s`` / ``eval_time_s`` on
  validations and in-loop evaluations, ``save_stall_s`` on checkpoint records (the seconds the loop
  waited in a save or a commit);
- ``{"event": "session_end", "time"}`` when it closes (normally, preempted or failing).

Goodput, as MaxText's and Google's ``ml-goodput-measurement`` define it: productive time / total
time. **Productive** = the ``step_time_s`` of every step the final history keeps (not skipped, not
later recomputed): data loading, forward, backward and the optimizer step, the first step of each
session included. **Total** = from the first session's process start to the last session's end,
gaps between sessions included. Everything else is badput, by cause; what no record explains
(logging, the stop-signal agreement, teardown, a session's final outputs) is ``other``.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EVAL_KEYS = ("val_time_s", "eval_time_s")  # validation, in-loop evaluation
SESSION_START = "session_start"
SESSION_END = "session_end"
RECOMPUTED = "recomputed"
ROWS = (  # key, label; the account's rows in the order gpt-goodput prints them
    ("productive_s", "productive steps"),
    ("startup_s", "start-up and checkpoint load"),
    ("save_stall_s", "checkpoint save stalls"),
    ("eval_s", "evaluation"),
    ("skipped_s", "skipped steps"),
    ("recomputed_s", "recomputed after a failure"),
    ("between_sessions_s", "between a failure (or stop) and the next start"),
    ("other_s", "other (logging, teardown, final outputs)"),
)


def _seconds(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def process_start() -> float:
    """The wall-clock time this process started.

    Why not psutil's ``create_time()`` alone: it adds the process's start (clock ticks since boot) to the
    boot time, which Linux reports in whole seconds, so it can be up to a second early; a start-up
    measured from it was too long by that much. Here the start is measured back from now on the boot
    clock the kernel counts those ticks on."""
    import psutil

    try:
        proc = psutil.Process()
        try:
            since_boot = proc.create_time() - psutil.boot_time()
            return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
        except (AttributeError, OSError):  # no boot clock (macOS): psutil's figure
            return proc.create_time()
    except Exception:  # noqa: BLE001 - a figure for the log never stops a run: a start-up of 0 s then
        return time.time()


def session_events(
    records: list[dict[str, Any]], start_step: int, last_write: float | None, layout: dict[str, int]
) -> list[dict[str, Any]]:
    """This session's ``session_start`` (and, when the resume drops lines, ``recomputed``) events.

    ``records``: ``metrics.jsonl`` as the previous session left it, before the resume truncates it;
    ``last_write``: that file's modification time (the previous session's end when it left no
    ``session_end``: a ``kill -9``)."""
    start: dict[str, Any] = {"step": start_step, "event": SESSION_START, "time": process_start()}
    start |= {"host": socket.gethostname(), **layout}
    if records:
        last = records[-1]
        end = last.get("time") if last.get("event") == SESSION_END else last_write
        if isinstance(end, int | float):
            start["previous_end"] = float(end)
    events = [start]
    dropped = [r for r in records if r["step"] > start_step]
    steps = [r for r in dropped if "step_time_s" in r]
    if dropped:
        events.append(
            {
                "step": start_step,
                "event": RECOMPUTED,
                "steps": len(steps),
                "first": min((r["step"] for r in steps), default=None),
                "last": max((r["step"] for r in steps), default=None),
                # not the records' own keys: a reader of metrics.jsonl must not take this for a step
                "train_s": sum(_seconds(r, "step_time_s") for r in steps),
                "eval_s": sum(_seconds(r, key) for r in dropped for key in EVAL_KEYS),
                "save_s": sum(_seconds(r, "save_stall_s") for r in dropped),
            }
        )
    return events


def last_write(path: Path) -> float | None:
    """When ``path`` was last written (None if it does not exist)."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


@dataclass
class Session:
    """One process lifetime of the run (a launch, a requeue, an elastic restart)."""

    start: float
    step: int
    world_size: int | None
    previous_end: float | None
    end: float | None = None  # its session_end; else the next session's previous_end
    first_step: int | None = None
    last_step: int | None = None
    startup_s: float | None = None
    steps: int = 0


@dataclass
class Account:
    """Seconds per cause; they add up to ``total_s`` (``other_s`` is the remainder)."""

    productive_s: float = 0.0
    startup_s: float = 0.0
    save_stall_s: float = 0.0
    eval_s: float = 0.0
    skipped_s: float = 0.0
    recomputed_s: float = 0.0
    between_sessions_s: float = 0.0
    other_s: float = 0.0
    total_s: float = 0.0
    productive_steps: int = 0
    skipped_steps: int = 0
    recomputed_steps: int = 0
    saves: int = 0
    evaluations: int = 0
    sessions: list[Session] = field(default_factory=list)
    ended: bool = True  # False: the last session left no session_end (still running, or killed)

    @property
    def goodput(self) -> float:
        return self.productive_s / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["goodput"] = self.goodput
        return out

    def summary(self) -> dict[str, float]:
        """The figures for wandb's run summary (``goodput/<row>``)."""
        keys = [key for key, _ in ROWS] + ["total_s"]
        return {"goodput/goodput": self.goodput, **{f"goodput/{key}": getattr(self, key) for key in keys}}


def account(records: list[dict[str, Any]], end_of_file: float | None = None) -> Account:
    """Add up ``metrics.jsonl``'s records (in file order); ``end_of_file``: the file's modification
    time, the end of a last session that left no ``session_end``. Raises ValueError when no session
    was recorded (a run dir written before the account existed)."""
    acc = Account()
    session: Session | None = None
    for record in records:
        event = record.get("event")
        if event == SESSION_START:
            session = Session(
                float(record["time"]), record["step"], record.get("world_size"), record.get("previous_end")
            )
            acc.sessions.append(session)
            continue
        if session is None:
            continue  # lines of an older version of the trainer, before it recorded sessions
        if event == SESSION_END:
            session.end = float(record["time"])
        elif event == RECOMPUTED:
            acc.recomputed_steps += int(record.get("steps") or 0)
            acc.recomputed_s += sum(_seconds(record, k) for k in ("train_s", "eval_s", "save_s"))
        if event is not None:
            continue
        if "step_time_s" in record:
            took = _seconds(record, "step_time_s")
            session.steps += 1
            session.first_step = session.first_step or record["step"]
            session.last_step = record["step"]
            if "startup_s" in record:
                session.startup_s = max(0.0, _seconds(record, "startup_s") - took)  # startup_s includes the step
            if record.get("skipped"):
                acc.skipped_s += took
                acc.skipped_steps += 1
            else:
                acc.productive_s += took
                acc.productive_steps += 1
        if any(key in record for key in EVAL_KEYS):
            acc.eval_s += sum(_seconds(record, key) for key in EVAL_KEYS)
            acc.evaluations += 1
        if "checkpoint" in record:
            acc.save_stall_s += _seconds(record, "save_stall_s")
            acc.saves += 1
    if not acc.sessions:
        raise ValueError("no session_start event (written before gpt-pretrain kept a goodput account?)")
    sessions = acc.sessions
    for this, nxt in zip(sessions, sessions[1:], strict=False):
        if this.end is None:
            this.end = nxt.previous_end if nxt.previous_end is not None else nxt.start
        acc.between_sessions_s += max(0.0, nxt.start - this.end)
    last = sessions[-1]
    if last.end is None:
        acc.ended = False
        last.end = end_of_file if end_of_file is not None else last.start
    for s in sessions:  # a session that died before its first step spent all of its time starting
        acc.startup_s += s.startup_s if s.startup_s is not None else max(0.0, s.end - s.start)
    acc.total_s = max(0.0, last.end - sessions[0].start)
    counted = sum(getattr(acc, k) for k, _ in ROWS if k != "other_s")
    acc.other_s = acc.total_s - counted
    return acc


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def sessions(acc: Account) -> str:
    return _count(len(acc.sessions), "session")


def table(acc: Account) -> str:
    """The account as gpt-goodput prints it: a row per cause, seconds and share of the total."""
    counts = {
        "productive_s": _count(acc.productive_steps, "step"),
        "startup_s": sessions(acc),
        "save_stall_s": _count(acc.saves, "save"),
        "eval_s": _count(acc.evaluations, "evaluation"),
        "skipped_s": _count(acc.skipped_steps, "step"),
        "recomputed_s": _count(acc.recomputed_steps, "step"),
        "between_sessions_s": _count(len(acc.sessions) - 1, "restart"),
        "other_s": "",
    }
    total = acc.total_s or 1.0
    width = max(len(label) for _, label in ROWS)
    lines = [f"{'':{width}}  {'seconds':>10}  {'share':>6}  count"]
    for key, label in ROWS:
        value = getattr(acc, key)
        lines.append(f"{label:{width}}  {value:10.2f}  {100 * value / total:5.1f}%  {counts[key]}".rstrip())
    lines.append(f"{'total wall time':{width}}  {acc.total_s:10.2f}  100.0%")
    lines.append(f"goodput = productive / total = {acc.goodput:.3f}")
    if not acc.ended:
        lines.append("note: the last session left no session_end (still running, or killed): it ends at the last write")
    return "\n".join(lines)


def plot(acc: Account, out: Path) -> Path:
    """``goodput.png``: one bar per cause (seconds), goodput in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for _, label in ROWS][::-1]
    values = [getattr(acc, key) for key, _ in ROWS][::-1]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bars = ax.barh(labels, values, color=["#999"] * (len(values) - 1) + ["#2a7"])
    for bar, value in zip(bars, values, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.1f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds of wall time")
    ax.set_title(f"goodput {acc.goodput:.1%} of {acc.total_s:.0f} s ({sessions(acc)})")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
