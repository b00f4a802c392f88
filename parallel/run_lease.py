"""One writer per run dir: a lease file with a heartbeat, taken atomically before a run writes.

Two ``gpt-pretrain`` on one ``run.dir`` (a double requeue, a relaunch while the old job still runs)
would interleave metrics, configs and checkpoints. ``flock`` is not enough where run dirs live on
clusters (NFS and parallel file systems may not honour it across nodes), so the lease is a file:

- **taken** by ``os.link`` of a fully written temp file to ``run.dir/.lease.json`` — create-exclusive
  and atomic on local and network file systems alike; exactly one of two racing takers succeeds;
- **kept alive** by a daemon thread that rewrites its ``heartbeat`` every ``expiry / 6`` seconds,
  in place, after checking the lease is still its own;
- **released** (removed) when the run ends, however it ends short of ``kill -9``;
- **stale**, and taken over with a one-line note, when its holder is gone: a dead pid on this
  host, an earlier incarnation of this slurm job (a requeued job keeps its id and counts up
  ``SLURM_RESTART_COUNT``), an earlier rank 0 of the same elastic job (below), or a heartbeat
  older than ``run.lease_expiry_s``; ``run.takeover=true`` forces it.
  Removing a stale file is serialised by a second create-exclusive file, and re-checks that the
  file is still the stale one, so two takers never both win.

Elastic jobs: ``launch/torchrun.sh`` on a c10d rendezvous exports ``GPT_ELASTIC_JOB`` =
``<rdzv id>@<endpoint host:port>`` (a loopback endpoint qualified by the host name), and the lease
records it. When torchrun restarts the ranks (a node lost, or one joining), c10d ranks the nodes by
arrival, so the new rank 0 may be on another host than the old one, which may have died with its
node (``kill -9``: its lease left behind with a fresh heartbeat). A holder of the same elastic job
on another host, or with another pid, is taken over at once. Why that is safe: one rendezvous has
one rank 0 at a time, and a process gets a rank only from a live rendezvous: while a job's store
lives, a launcher naming its id and endpoint joins that job (it cannot host a second store on the
same address; it waits for a place in the next round), so a run of another job never carries the
same identity while the holder's job runs. An old rank 0 still alive (torchrun stops a node's
ranks before it joins the next round, but a partitioned node may not hear of it) finds its lease
gone at its next heartbeat and stops at the next step boundary without saving. It assumes that
unrelated runs do not share a run dir under the same rendezvous id, endpoint and port (slurm jobs
use the job id; by hand, ``RDZV_ID`` names the job), and that the old rank 0 may still write for up to
one heartbeat interval (``expiry / 6``) after the takeover, as with ``run.takeover=true``.

A holder that finds its lease gone or replaced (it stalled past the expiry and another run took
over) stops at the next step boundary: :meth:`Lease.lost` says so, and the trainer raises.
Clocks: the heartbeat is compared with the reader's clock, so the expiry must exceed the clock
skew between nodes by far (the default is minutes; NTP keeps skews under a second).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
BREAK_WAIT_S = 5.0  # how long a taker waits for another's removal of a stale lease
BREAK_STALE_S = 30.0  # a removal lock older than this was left by a killed taker


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
    expiry_s: float = 0.0  # the holder's own run.lease_expiry_s: a reader never judges it by a shorter one
    elastic_job: str | None = None  # GPT_ELASTIC_JOB: the c10d rendezvous this rank 0 came from

    @classmethod
    def me(cls) -> Holder:
        now = time.time()
        job, restart = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
        elastic = os.environ.get("GPT_ELASTIC_JOB") or None
        host, pid = socket.gethostname(), os.getpid()
        return cls(host, pid, uuid.uuid4().hex, now, now, job, int(restart or 0), elastic_job=elastic)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **self.__dict__}) + "\n"

    @classmethod
    def parse(cls, text: str, mtime: float) -> Holder:
        """The holder a lease file's ``text`` names. Text that does not parse (a heartbeat being
        rewritten as it is read, a hand edit) names no holder, only its file's ``mtime`` as the
        heartbeat: it is stale once that is older than the expiry, like any other lease."""
        try:
            raw = json.loads(text)
            return cls(
                str(raw["host"]),
                int(raw["pid"]),
                str(raw["token"]),
                float(raw["since"]),
                float(raw["heartbeat"]),
                None if raw.get("slurm_job_id") is None else str(raw["slurm_job_id"]),
                int(raw.get("slurm_restart", 0)),
                float(raw.get("expiry_s", 0.0)),
                None if raw.get("elastic_job") is None else str(raw["elastic_job"]),  # absent in older leases
            )
        except (ValueError, KeyError, TypeError):
            return cls("?", 0, "", mtime, mtime)

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder in ``path``, or None when there is no lease file."""
        try:
            with open(path) as handle:
                return cls.parse(handle.read(), os.fstat(handle.fileno()).st_mtime)
        except FileNotFoundError:
            return None
        except OSError:
            return cls("?", 0, "", time.time(), time.time())  # unreadable now: not proof that it is stale

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
    age, expiry_s = time.time() - holder.heartbeat, max(expiry_s, holder.expiry_s)
    if holder.token == "":
        return f"its lease file is unreadable and {age:.0f} s old" if age > expiry_s else None
    if holder.host == me.host and not _pid_alive(holder.pid):
        return f"pid {holder.pid} is not running on {holder.host}"
    same_job = holder.slurm_job_id is not None and holder.slurm_job_id == me.slurm_job_id
    if same_job and me.slurm_restart > holder.slurm_restart:
        return f"slurm job {holder.slurm_job_id} was requeued (restart {me.slurm_restart})"
    same_elastic = holder.elastic_job is not None and holder.elastic_job == me.elastic_job
    if same_elastic and (holder.host != me.host or holder.pid != me.pid):
        return f"it was rank 0 of an earlier round of elastic job {holder.elastic_job} (one rank 0 per rendezvous)"
    if age > expiry_s:
        return f"its heartbeat is {age:.0f} s old (run.lease_expiry_s={expiry_s:g})"
    return None


class Lease:
    """The run dir's lease, held by this process from :meth:`acquire` to :meth:`release`."""

    def __init__(self, run_dir: str | Path, expiry_s: float = 300.0, takeover: bool = False):
        self.path = Path(run_dir) / LEASE
        self.expiry_s = float(expiry_s)
        self.takeover = takeover
        self.holder = dataclasses.replace(Holder.me(), expiry_s=self.expiry_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    def acquire(self) -> str | None:
        """Take the lease or raise :class:`UserError` naming the holder; returns the one-line
        note of a takeover, or None."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(5):  # each round: a racing taker may have changed the file since it was read
            if self._link(self.path):
                break
            current = Holder.read(self.path)
            if current is None:  # released meanwhile
                continue
            reason = "run.takeover=true" if self.takeover else why_stale(current, self.expiry_s, self.holder)
            if reason is None:
                age, expiry = time.time() - current.heartbeat, max(self.expiry_s, current.expiry_s)
                raise UserError(
                    f"run.dir={self.path.parent} is in use by another run ({current.describe()}, heartbeat "
                    f"{age:.0f} s ago); wait for it to end, or if it is gone pass run.takeover=true "
                    f"(it expires {max(0.0, expiry - age):.0f} s after its last heartbeat)"
                )
            if self._remove_if(current.token):
                note = f"note: took over the lease of run.dir={self.path.parent} from {current.describe()}: {reason}"
        else:
            raise UserError(f"run.dir={self.path.parent}: could not take its lease ({self.path}); another run races")
        self._thread = threading.Thread(target=self._beat, name="gpt-run-lease", daemon=True)
        self._thread.start()
        return note

    def _link(self, path: Path, holder: Holder | None = None) -> bool:
        """Create ``path`` holding ``holder`` (this one), atomically and only if it does not exist:
        ``os.link`` of a complete temp file, or where a file system has no hard links (FUSE mounts of
        object stores), ``O_CREAT | O_EXCL`` (exclusive there too, but a reader may see it empty)."""
        text = (holder or self.holder).to_json()
        tmp = self.path.with_name(f"{LEASE}.{self.holder.token}.tmp")
        tmp.write_text(text)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # EPERM / ENOTSUP: no hard links here
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _remove_if(self, token: str) -> bool:
        """Remove the lease file if it still names ``token`` (the holder judged gone); whether it did.

        Reading the file and removing it are two steps; between them another taker could replace
        it with its own fresh lease. So removals are serialised by a second create-exclusive file
        (``.lease.json.break``), held for those two steps only; one left by a taker killed in
        between is stale after ``BREAK_STALE_S``."""
        breaker = self.path.with_name(f"{LEASE}.break")
        mine = dataclasses.replace(self.holder, heartbeat=time.time())  # the break file's own age
        deadline = time.monotonic() + BREAK_WAIT_S
        while not self._link(breaker, mine):
            other = Holder.read(breaker)
            if other is not None and time.time() - other.heartbeat > BREAK_STALE_S:
                aside = breaker.with_name(f"{breaker.name}.{uuid.uuid4().hex[:8]}.stale")
                with contextlib.suppress(FileNotFoundError):  # one renamer wins; it re-checks what it moved
                    os.replace(breaker, aside)
                    moved = Holder.read(aside)
                    if moved is not None and moved.token != other.token:  # a fresh one: put it back
                        self._link(breaker, moved)
                    aside.unlink()
                continue
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        try:
            current = Holder.read(self.path)
            if current is None or current.token != token:
                return False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return True
        finally:
            held = Holder.read(breaker)
            if held is not None and held.token == mine.token:
                with contextlib.suppress(FileNotFoundError):
                    breaker.unlink()

    def _beat(self) -> None:
        """Rewrite the heartbeat in place, in the file this holder reads: if a taker replaced the lease
        between the read and the write, the write lands in the replaced file, never over the taker's."""
        interval = max(0.05, self.expiry_s / 6)
        while not self._stop.wait(interval):
            try:
                with open(self.path, "r+") as handle:
                    current = Holder.parse(handle.read(), time.time())
                    if current.token != self.holder.token:
                        self._lost = f"taken by {current.describe()}"
                        return
                    self.holder = Holder(**{**self.holder.__dict__, "heartbeat": time.time()})
                    handle.seek(0)
                    handle.write(self.holder.to_json())
                    handle.truncate()
            except FileNotFoundError:
                taker = self._taker()
                self._lost = f"taken by {taker.describe()}" if taker else "its lease file was removed"
                return
            except OSError:  # a full disk: the heartbeat ages, the run goes on
                continue

    def _taker(self, wait_s: float = 1.0) -> Holder | None:
        """The run that replaced this lease: a taker removes the old file before it links its own, so
        a heartbeat can fall in between; look again for a moment before calling the file removed."""
        deadline = time.monotonic() + wait_s
        while True:
            current = Holder.read(self.path)
            if current is not None and current.token != self.holder.token:
                return current
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def lost(self) -> str | None:
        """Why this process no longer holds the run dir (another run took it over), or None."""
        return self._lost

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._lost is None:
            self._remove_if(self.holder.token)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
