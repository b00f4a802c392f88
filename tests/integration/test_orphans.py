"""No orphan processes: a ``kill -9`` of a trainer or of its launcher takes every helper with it.

Helpers are megatron-core's results-queue Manager, our checkpoint writer, megatron's forked
per-bucket writers, DataLoader workers and multiprocessing's resource tracker
(``parallel/process_hygiene.py``). Every process of a run is found by an environment
marker (``/proc/*/environ``), whoever its parent is after the kill. The in-process tests
install the fork hook in the pytest process itself (harmless: its forks then die with it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from parallel import process_hygiene
from tests.conftest import REPO

MARKER = "GPT_ORPHAN_MARKER"
GONE_WITHIN_S = 10
ARGS = [
    "model=tiny",
    "train.micro_batch=4",
    "train.global_batch=4",
    "train.save_every=2",
    "train.async_save=true",
    "data.num_workers=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "logging.wandb=disabled",
    "logging.progress_bar=false",
]
# `python -m pretrain.train`, except that megatron's forked per-bucket writers of a synchronous
# save announce themselves and then hang, so the test can kill the trainer while they exist.
HARNESS = """
import os, runpy, sys, time
from megatron.core.dist_checkpointing.strategies import filesystem_async
trainer, write = os.getpid(), filesystem_async.FileSystemWriterAsync.write_preloaded_data
def held(*args, **kwargs):
    if os.getpid() != trainer:
        open(os.path.join(os.environ["GPT_ORPHAN_WRITERS"], str(os.getpid())), "w").close()
        time.sleep(600)
    return write(*args, **kwargs)
filesystem_async.FileSystemWriterAsync.write_preloaded_data = staticmethod(held)
runpy.run_module("pretrain.train", run_name="__main__", alter_sys=True)
"""


def marked(marker: str) -> dict[int, tuple[int, str]]:
    """Live (not zombie) processes carrying the marker: pid -> (parent pid, command line)."""
    found = {}
    needle = f"{MARKER}={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            state, ppid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                found[int(entry)] = (
                    int(ppid),
                    Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(),
                )
    return found


def survivors(marker: str, within: float = GONE_WITHIN_S) -> dict[int, tuple[int, str]]:
    deadline = time.monotonic() + within
    while (alive := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def kill_marked(marker: str) -> None:
    for pid in marked(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def signal_mask(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1], 16)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def run_env(marker: str, **extra: str) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # torchrun
    base = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return {**base, MARKER: marker, **extra}


@pytest.mark.slow
def test_killed_trainer_leaves_no_helper(char_shards: Path, tmp_path: Path) -> None:
    """Step 2 saves asynchronously (Manager, our writer), step 4 synchronously (megatron's
    forked writers, held open); kill -9 the trainer then: nothing of the run may remain."""
    marker, writers, log = uuid.uuid4().hex, tmp_path / "writers", tmp_path / "run.log"
    writers.mkdir()
    args = [*ARGS, f"data.dir={char_shards}", f"run.dir={tmp_path / 'run'}", "train.max_steps=4"]
    env = run_env(marker, GPT_ORPHAN_WRITERS=str(writers))
    cmd = [sys.executable, "-c", HARNESS, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: any(writers.iterdir()), proc, log, "forked checkpoint writer")
        time.sleep(0.5)  # every bucket's writer
        procs = marked(marker)
        helpers = {pid: cmd for pid, (_, cmd) in procs.items() if pid != proc.pid}
        forked = [pid for pid, cmd in helpers.items() if "-c \nimport os, runpy" in cmd]
        spawned = [pid for pid, cmd in helpers.items() if "multiprocessing.spawn" in cmd]
        tracker = [pid for pid, cmd in helpers.items() if "resource_tracker" in cmd]
        held = [int(p.name) for p in writers.iterdir()]
        # the loader worker and megatron's writers; the Manager and our writer; the tracker
        assert len(forked) >= 1 + len(held) and len(spawned) == 2 and len(tracker) == 1, procs
        term = 1 << (signal.SIGTERM - 1)
        assert signal_mask(proc.pid, "SigCgt") & term  # the trainer's preemption handler
        for pid in held:  # a writer ignores the trainer's stop signals instead of running its handler
            assert signal_mask(pid, "SigIgn") & term and not signal_mask(pid, "SigCgt") & term

        proc.kill()
        proc.wait()
        left = survivors(marker)
        assert not left, f"alive {GONE_WITHIN_S} s after kill -9 of the trainer: {left}"
    finally:
        proc.kill()
        kill_marked(marker)


@pytest.mark.slow
def test_killed_launcher_takes_the_rank_and_its_helpers_along(char_shards: Path, tmp_path: Path) -> None:
    """kill -9 of ``launch/torchrun.sh`` alone (the shell, not its process group): the torchrun agent
    dies with it, the rank with its agent (torchrun starts ranks in sessions of their own), the
    helpers with their rank. One rank: a second adds start-up time, not another way to die."""
    from tests.distributed import free_port

    marker, run, log = uuid.uuid4().hex, tmp_path / "run", tmp_path / "launch.log"
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), "--nnodes", "1", "--nproc-per-node", "1"]
    cmd += ["--master-port", str(free_port()), "--", "pretrain.train", *ARGS]
    cmd += [f"data.dir={char_shards}", f"run.dir={run}", "train.max_steps=100000"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=run_env(marker), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for(lambda: (run / "checkpoints" / "latest").is_file(), proc, log, "checkpoint")
        procs = marked(marker)
        rank_cmd = [pid for pid, (_, cmd) in procs.items() if cmd.startswith(f"{sys.executable} -u -m pretrain.train")]
        ranks = [pid for pid in rank_cmd if procs[pid][0] not in rank_cmd]
        workers = [pid for pid in rank_cmd if procs[pid][0] in ranks]  # forked: the same command line
        spawned = [pid for pid, (_, cmd) in procs.items() if "multiprocessing.spawn" in cmd]
        trackers = [pid for pid, (_, cmd) in procs.items() if "resource_tracker" in cmd]
        # launcher, agent, the rank, its loader worker, resource tracker, Manager and checkpoint writer
        assert len(procs) == 7 and len(ranks) == len(workers) == len(trackers) == 1 and len(spawned) == 2, procs
        assert os.getsid(ranks[0]) != os.getsid(proc.pid)  # the group kill does not reach the rank itself

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = survivors(marker)
        assert not left, f"alive {GONE_WITHIN_S} s after kill -9 of the launcher: {left}"
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        kill_marked(marker)


def _pdeathsig() -> int:
    value = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
    return value.value


def _is_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _is_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_forked_child_ignores_the_stop_signals_drops_other_handlers_and_dies_with_its_parent() -> None:
    from pretrain.trainer.preemption import StopRequest

    process_hygiene.install()
    stop = StopRequest(["SIGTERM", "SIGUSR1"]).install()
    alarm = signal.signal(signal.SIGALRM, lambda *_: None)
    read, write = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the child: report what it inherited, then leave at once
            seen = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM)]
            ok = seen == [signal.SIG_IGN, signal.SIG_IGN, signal.SIG_DFL] and _pdeathsig() == signal.SIGKILL
            os.write(write, b"1" if ok else repr((seen, _pdeathsig())).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 200) == b"1"
        assert signal.getsignal(signal.SIGTERM) == stop._handle  # the parent keeps its handler
    finally:
        stop.uninstall()
        signal.signal(signal.SIGALRM, alarm)
        os.close(read)
        os.close(write)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_child_forked_from_a_thread_outlives_the_thread_and_dies_with_the_process() -> None:
    """PDEATHSIG fires when the forking *thread* exits: a child forked from a thread must not
    die with that thread, only with its parent process."""
    process_hygiene.install()
    read, write = os.pipe()
    helper = 0
    parent = os.fork()
    if parent == 0:  # an intermediate "trainer" that forks a helper from a short-lived thread
        try:

            def fork_helper() -> None:
                helper = os.fork()
                if helper == 0:
                    time.sleep(60)
                    os._exit(0)
                os.write(write, f"{helper}\n".encode())
                time.sleep(0.5)  # the helper is set up before this thread ends

            thread = threading.Thread(target=fork_helper)
            thread.start()
            thread.join()
            time.sleep(2)  # the thread is gone; the helper must still be alive
        finally:
            os._exit(0)
    try:
        helper = int(os.read(read, 100).decode().split()[0])
        time.sleep(1)  # the thread ended half-way through
        assert not _is_gone(helper), "the helper died with the thread that forked it"
        os.waitpid(parent, 0)
        assert _wait_gone(helper, process_hygiene.POLL_S + 3), "the helper outlived its parent"
    finally:
        if helper > 0:
            with contextlib.suppress(OSError):
                os.kill(helper, signal.SIGKILL)
        os.close(read)
        os.close(write)


def test_megatron_results_queue_patch_refuses_an_unknown_megatron(monkeypatch: pytest.MonkeyPatch) -> None:
    """The patch replaces megatron-core's ``_get_write_results_queue``; a megatron whose function no
    longer starts the Manager there must fail loudly, not leave the Manager orphanable."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    process_hygiene.patch_megatron_results_queue()
    assert filesystem_async._get_write_results_queue._gpt_patched
    monkeypatch.setattr(filesystem_async, "_get_write_results_queue", lambda: None)
    with pytest.raises(RuntimeError, match="update parallel/process_hygiene.py"):
        process_hygiene.patch_megatron_results_queue()
    monkeypatch.delattr(filesystem_async, "_results_queue")
    with pytest.raises(RuntimeError, match="_results_queue"):
        process_hygiene.patch_megatron_results_queue()
