"""Reliability round 2, in process: the run-dir lease, nothing in a run dir or a manifest executes
code or names a path outside its dir, torn metrics lines, fault hooks off in production."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conf import test_hooks
from conf.errors import UserError
from data.shard_cache import ShardCache
from data.shards import load_manifest
from parallel.checkpoint import load_rng_file, rng_state, set_rng_state
from parallel.checksums import CorruptCheckpoint, read_manifest
from parallel.run_lease import LEASE, Holder, Lease
from pretrain.trainer.metrics import read_metrics, truncate_after
from pretrain.trainer.skip_policy import SkipPolicy
from tests.remote_server import ShardServer


@pytest.fixture(autouse=True)
def _no_elastic_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run under launch/torchrun.sh would inherit its elastic job identity: the lease tests set their own."""
    monkeypatch.delenv("GPT_ELASTIC_JOB", raising=False)


def write_holder(run: Path, **fields: object) -> None:
    holder = {**Holder.me().__dict__, "token": "someone-else", **fields}
    run.mkdir(parents=True, exist_ok=True)
    (run / LEASE).write_text(json.dumps(holder))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_writer_is_refused_naming_the_holder_and_release_frees_the_dir(tmp_path: Path) -> None:
    first = Lease(tmp_path / "run")
    assert first.acquire() is None
    with pytest.raises(UserError) as refused:
        Lease(tmp_path / "run").acquire()
    line = str(refused.value)
    assert f"pid {os.getpid()}" in line and socket.gethostname() in line and "run.takeover=true" in line
    assert "\n" not in line
    first.release()
    assert not (tmp_path / "run" / LEASE).exists()
    second = Lease(tmp_path / "run")
    assert second.acquire() is None
    second.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no temp files left


@pytest.mark.parametrize(
    "holder, reason",
    [
        ({"pid": "dead"}, "is not running"),
        ({"host": "elsewhere", "heartbeat": 0.0}, "heartbeat is"),
        ({"host": "elsewhere", "slurm_job_id": "77", "slurm_restart": 0}, "was requeued"),
        ({"host": "elsewhere", "garbage": True}, "unreadable"),
    ],
)
def test_a_gone_holder_is_taken_over_with_one_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holder: dict, reason: str
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run = tmp_path / "run"
    if holder.pop("garbage", False):
        run.mkdir()
        (run / LEASE).write_text('{"host": "elsewh')  # a hand edit: only its age can tell
        with pytest.raises(UserError, match="in use by another run"):
            Lease(run, expiry_s=60).acquire()  # fresh: maybe a heartbeat being rewritten
        os.utime(run / LEASE, (time.time() - 120, time.time() - 120))
    else:
        write_holder(run, **{k: dead_pid() if v == "dead" else v for k, v in holder.items()})
    lease = Lease(run, expiry_s=60)
    note = lease.acquire()
    assert note is not None and reason in note and "\n" not in note
    assert Holder.read(run / LEASE).token == lease.holder.token
    lease.release()


JOB = "4242@node-a:29500"  # what launch/torchrun.sh exports on a c10d rendezvous


@pytest.mark.parametrize(
    "theirs, host", [(JOB, "node-b"), (JOB, "here"), ("4243@node-a:29500", "node-b"), (None, "node-b")]
)
def test_an_elastic_restarts_new_rank0_takes_over_from_the_old_one_on_another_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, theirs: str | None, host: str
) -> None:
    """c10d ranks nodes by arrival: after a lost node the new rank 0 may be on another host than the
    old one, whose lease (killed with its node) still has a fresh heartbeat. Only the same job's is taken."""
    monkeypatch.setenv("GPT_ELASTIC_JOB", JOB)
    run = tmp_path / "run"
    here = host == "here"  # this host, a live pid of the same job (a torchrun agent tearing its rank down)
    write_holder(run, host=socket.gethostname() if here else host, pid=os.getppid(), elastic_job=theirs)
    lease = Lease(run, expiry_s=60)
    if theirs != JOB:  # another job, or a static rendezvous: the fresh holder is kept
        with pytest.raises(UserError, match="in use by another run"):
            lease.acquire()
        return
    note = lease.acquire()
    assert note is not None and "\n" not in note and (here or "host node-b" in note)
    assert note.endswith(f": it was rank 0 of an earlier round of elastic job {JOB} (one rank 0 per rendezvous)")
    assert Holder.read(run / LEASE).elastic_job == JOB
    lease.release()
    (run / LEASE).write_text(json.dumps({k: v for k, v in Holder.me().__dict__.items() if k != "elastic_job"}))
    assert Holder.read(run / LEASE).elastic_job is None and Holder.read(run / LEASE).token  # an older lease parses


def test_a_live_holder_elsewhere_is_kept_unless_takeover_and_then_it_learns_it_lost(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = Lease(run, expiry_s=0.3)
    holder.acquire()
    time.sleep(0.2)
    with pytest.raises(UserError, match="in use by another run"):
        Lease(run, expiry_s=60).acquire()  # heartbeats keep it fresh past its 0.3 s expiry
    taker = Lease(run, expiry_s=60, takeover=True)
    assert "run.takeover=true" in taker.acquire()
    deadline = time.monotonic() + 5
    while holder.lost() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert holder.lost() is not None and "taken by" in holder.lost()
    holder.release()  # not its lease any more: the taker's stays
    assert Holder.read(run / LEASE).token == taker.holder.token
    taker.release()


def test_racing_takers_of_a_stale_lease_leave_exactly_one_holder(tmp_path: Path) -> None:
    for attempt in range(20):
        run = tmp_path / f"run{attempt}"
        write_holder(run, host="elsewhere", heartbeat=0.0)
        leases = [Lease(run, expiry_s=60) for _ in range(4)]
        outcomes: list[object] = [None] * 4

        def take(i: int, leases: list[Lease] = leases, outcomes: list[object] = outcomes) -> None:
            try:
                leases[i].acquire()
                outcomes[i] = "held"
            except UserError as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [lease for lease, o in zip(leases, outcomes, strict=True) if o == "held"]
        assert len(winners) == 1, outcomes
        assert Holder.read(run / LEASE).token == winners[0].holder.token
        winners[0].release()


def test_rng_files_load_without_unpickling_code_old_format_included(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    torch.save(rng_state(), tmp_path / "new.pt")
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({**old, "cuda": None, "tracker": rng_state()["tracker"]}, tmp_path / "old.pt")  # format 1
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    for name in ("new.pt", "old.pt"):
        set_rng_state(load_rng_file(tmp_path / name))
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected

    payload = tmp_path / "executed"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {payload}",))

    torch.save({"python": Payload()}, tmp_path / "crafted.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_rng_file(tmp_path / "crafted.pt")
    assert not payload.exists()


def test_a_checksum_list_naming_a_path_outside_the_step_is_refused(tmp_path: Path) -> None:
    (tmp_path / "checksums.json").write_text(json.dumps({"files": {"../../etc/passwd": {"size": 1}}}))
    with pytest.raises(CorruptCheckpoint, match="outside the step"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("field, value", [("sha256", "../../victim"), ("file", "../victim.tar")])
def test_a_served_manifest_with_a_path_in_a_name_is_refused_and_deletes_nothing(
    char_shards: Path, tmp_path: Path, field: str, value: str
) -> None:
    served = tmp_path / "srv" / "ts"
    shutil.copytree(char_shards, served)
    manifest = json.loads((served / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0][field] = value
    (served / "manifest.json").write_text(json.dumps(manifest))
    victim = tmp_path / "victim"
    victim.write_text("a user's file")
    with ShardServer(served.parent) as server, pytest.raises(UserError) as refused:
        load_manifest(f"{server.url}/ts")
    assert "\n" not in str(refused.value) and repr(value) in str(refused.value)
    with pytest.raises(UserError, match="not a sha256"):
        ShardCache(tmp_path / "cache", 1 << 20).discard("../victim")
    assert victim.read_text() == "a user's file"


def test_a_torn_metrics_line_is_dropped_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(good) + '\n{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # what the plot reads
    truncate_after(path, 2)
    assert path.read_text() == "\n".join(good[:2]) + "\n"
    assert "dropped 1 malformed line" in capsys.readouterr().out


def test_fault_hooks_do_nothing_without_the_test_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT_FAULT_NAN_STEPS", "1")
    monkeypatch.delenv(test_hooks.SWITCH, raising=False)
    policy = SkipPolicy(None, 10)
    policy.step = 1
    assert policy.accept(3.95)  # a real run's step 1 is applied
    monkeypatch.setenv(test_hooks.SWITCH, "1")
    policy = SkipPolicy(None, 10)
    policy.step = 1
    assert not policy.accept(3.95) and policy.reason == "loss is nan"
    monkeypatch.setenv("GPT_FAULT_NAN_STEPS", "abc")
    with pytest.raises(UserError, match="GPT_FAULT_NAN_STEPS=abc: expected comma-separated integers"):
        SkipPolicy(None, 10)


def test_a_holder_is_judged_by_its_own_longer_expiry_and_names_stay_inside(tmp_path: Path) -> None:
    from data.safe_paths import is_safe_name

    run = tmp_path / "run"
    write_holder(run, host="elsewhere", heartbeat=time.time() - 100, expiry_s=3600.0)
    with pytest.raises(UserError, match="in use by another run"):
        Lease(run, expiry_s=60).acquire()  # 100 s old is fresh for a holder that beats every 600 s
    assert [is_safe_name(n, subdirs=True) for n in (".", "a/", "a/./b", "a/b", "../a")] == [0, 0, 0, 1, 0]


def test_a_signal_ignored_at_start_stays_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """``nohup gpt-pretrain ... &``: a closed terminal must not stop a run started that way."""
    import signal

    from pretrain.trainer.preemption import StopRequest

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        stop = StopRequest(["SIGHUP", "SIGUSR1"]).install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR1) == stop._handle
        stop.uninstall()
    finally:
        signal.signal(signal.SIGHUP, previous)
