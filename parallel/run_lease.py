"""One writer per run dir: a lease file with a heartbeat, taken atomically before a run writes.

Two ``gpt-pretrain`` on one ``run.dir`` (a double requeue, a relaunch while the old job still runs)
would interleave metrics, configs and checkpoints. ``flock`` is not enough where run dirs live on
clusters (NFS and parallel file systems may not honour it across nodes), so the lease is a file:

- **taken** by ``os.link`` of a fully written temp file to ``run.dir/.lease.json`` — create-exclusive
  and atomic on local and network file systems alike; exactly one of two racing takers succeeds;
- **kept alive** by a daemon thread that rewrites its ``heartbeat`` every ``expiry / 6`` seconds
  (write a temp file, ``os.replace``), after checking the lease is still its own;
- **released** (removed) when the run ends, however it ends short of ``kill -9``;
- **stale**, and taken over with a one-line note, when its holder is gone: a dead pid on this
  host, an earlier incarnation of this slurm job (a requeued job keeps its id and counts up
  ``SLURM_RESTART_COUNT``), or a heartbeat older than ``run.lease_expiry_s``; ``run.takeover=true`` forces it.
  Taking over renames the stale file aside first (one rename wins), so two takers never both win.

A holder that finds its lease gone or replaced (it stalled past the expiry and another run took
over) stops at the next step boundary: :meth:`Lease.lost` says so, and the trainer raises.
Clocks: the heartbeat is compared with the reader's clock, so the expiry must exceed the clock
skew between nodes by far (the default is minutes; NTP keeps skews under a second).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conf.errors import UserError

LEASE = ".lease.json"
FORMAT = "gpt-run-lease/1"


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as written in the lease file."""

    host: str
    pid: int
    token: str
    since: float
    heartbeat: float
    slurm_job_id: str | None = None
    slurm_restart: int = 0  # SLURM_RESTART_COUNT: a requeued job keeps its id and counts up

    @classmethod
    def me(cls) -> Holder:
        now = time.time()
        job, restart = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now, job, int(restart or 0))

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **self.__dict__}) + "\n"

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder in ``path``; None when the file is gone, or unreadable (a torn write of an
        earlier version, a hand edit): such a file names no live holder and is treated as stale."""
        try:
            raw = json.loads(path.read_text())
            return cls(
                str(raw["host"]),
                int(raw["pid"]),
                str(raw["token"]),
                float(raw["since"]),
                float(raw["heartbeat"]),
                None if raw.get("slurm_job_id") is None else str(raw["slurm_job_id"]),
                int(raw.get("slurm_restart", 0)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return cls("?", 0, "", 0.0, 0.0)

    def describe(self) -> str:
        job = f", slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"host {self.host} pid {self.pid}{job}, since {since}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return pid > 0


def why_stale(holder: Holder, expiry_s: float, me: Holder) -> str | None:
    """Why ``holder`` no longer holds the run dir, or None while it may still be running."""
    if holder.token == "":
        return "the lease file is unreadable"
    if holder.host == me.host and not _pid_alive(holder.pid):
        return f"pid {holder.pid} is not running on {holder.host}"
    same_job = holder.slurm_job_id is not None and holder.slurm_job_id == me.slurm_job_id
    if same_job and me.slurm_restart > holder.slurm_restart:
        return f"slurm job {holder.slurm_job_id} was requeued (restart {me.slurm_restart})"
    age = time.time() - holder.heartbeat
    if age > expiry_s:
        return f"its heartbeat is {age:.0f} s old (run.lease_expiry_s={expiry_s:g})"
    return None


class Lease:
    """The run dir's lease, held by this process from :meth:`acquire` to :meth:`release`."""

    def __init__(self, run_dir: str | Path, expiry_s: float = 300.0, takeover: bool = False):
        self.path = Path(run_dir) / LEASE
        self.expiry_s = float(expiry_s)
        self.takeover = takeover
        self.holder = Holder.me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    def acquire(self) -> str | None:
        """Take the lease or raise :class:`UserError` naming the holder; returns the one-line
        note of a takeover, or None."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(3):  # a racing taker can make one attempt fail; a third loss means a live holder
            if self._link():
                break
            current = Holder.read(self.path)
            if current is None:  # released meanwhile
                continue
            reason = "run.takeover=true" if self.takeover else why_stale(current, self.expiry_s, self.holder)
            if reason is None:
                age = time.time() - current.heartbeat
                raise UserError(
                    f"run.dir={self.path.parent} is in use by another run ({current.describe()}, heartbeat "
                    f"{age:.0f} s ago); wait for it to end, or if it is gone pass run.takeover=true "
                    f"(it expires {max(0.0, self.expiry_s - age):.0f} s after its last heartbeat)"
                )
            aside = self.path.with_name(f"{LEASE}.stale-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(FileNotFoundError):  # another taker renamed it first: retry the link
                os.replace(self.path, aside)
                with contextlib.suppress(OSError):
                    aside.unlink()
                note = f"note: took over the lease of run.dir={self.path.parent} from {current.describe()}: {reason}"
        else:
            raise UserError(f"run.dir={self.path.parent}: could not take its lease ({self.path}); another run races")
        self._thread = threading.Thread(target=self._beat, name="gpt-run-lease", daemon=True)
        self._thread.start()
        return note

    def _link(self) -> bool:
        tmp = self.path.with_name(f"{LEASE}.{self.holder.token}.tmp")
        tmp.write_text(self.holder.to_json())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _beat(self) -> None:
        interval = max(0.05, self.expiry_s / 6)
        while not self._stop.wait(interval):
            current = Holder.read(self.path)
            if current is None or current.token != self.holder.token:
                self._lost = "its lease file was removed" if current is None else f"taken by {current.describe()}"
                return
            self.holder = Holder(**{**self.holder.__dict__, "heartbeat": time.time()})
            tmp = self.path.with_name(f"{LEASE}.{self.holder.token}.tmp")
            with contextlib.suppress(OSError):  # a full disk: the heartbeat ages, the run goes on
                tmp.write_text(self.holder.to_json())
                os.replace(tmp, self.path)

    def lost(self) -> str | None:
        """Why this process no longer holds the run dir (another run took it over), or None."""
        return self._lost

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        current = Holder.read(self.path)
        if current is not None and current.token == self.holder.token:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
