"""Elastic runs on localhost: a node range (``launch/torchrun.sh --nnodes 1:2``), a node lost mid-run
and a new one joining.

Two "nodes" are two launchers on 127.0.0.1 meeting at a c10d rendezvous, each in its own session
so that the test can kill one node's whole process tree (launcher, torchrun agent, rank) as a
node failure does. The survivor's rank fails on the dead peer (the watchdog's line), its torchrun
restarts it at the smaller world, and it resumes from the last checkpoint at dp = 1. A launcher
started later joins the rendezvous; the survivor's torchrun stops its rank (SIGTERM: a checkpoint at
the next step boundary), and both resume from that checkpoint at dp = 2.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from pretrain.trainer import goodput
from pretrain.trainer.metrics import read_metrics
from tests.conftest import REPO
from tests.distributed import env, free_port, last_step, losses, signal_node, torchrun
from tests.integration.test_cluster import ARGS, kill_all, render_sbatch

LAUNCH = REPO / "launch" / "torchrun.sh"
# short rendezvous timeouts: a dead node's heartbeat expires after 5 s, a round closes 3 s after its
# first node. Not 2 attempts: a node's last heartbeat while it joins a round can be 2-3 s older than its
# first one after (a 1 s poll, then one interval), so with a 2 s expiry the node drops itself from the
# rendezvous state, stops heartbeating, and a node that joins later finds it dead and starts alone
RDZV_CONF = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=5"


def start_elastic_node(port: int, log: Path, hosts_store: bool, *args: str) -> subprocess.Popen:
    cmd = ["bash", str(LAUNCH), "--nnodes", "1:2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(port), "--max-restarts", "1", "--rdzv-conf", f"{RDZV_CONF},is_host={hosts_store}"]
    cmd += ["--", "pretrain.train", *ARGS, *args]
    run_env = {**env(), "RDZV_ID": f"elastic-{port}"}
    out = log.open("w")
    return subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("event") == name]


def session_steps(run_dir: Path, session: int) -> list[int]:
    """The steps that session ``session`` (0: the first) logged."""
    rows = read_metrics(run_dir)
    starts = [i for i, r in enumerate(rows) if r.get("event") == goodput.SESSION_START] + [len(rows)]
    if len(starts) <= session + 1:
        return []
    return [r["step"] for r in rows[starts[session] : starts[session + 1]] if "loss" in r]


def wait_until(done: Callable[[], object], what: str, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert all(p.poll() is None for p in procs), f"a node exited before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.02)


def rank_of(node: subprocess.Popen) -> psutil.Process:
    """The node's one rank: its torchrun agent's child."""
    agent = next(p for p in psutil.Process(node.pid).children() if "torchrun_agent.py" in " ".join(p.cmdline()))
    (rank,) = agent.children()
    return rank


def pending(pid: int, sig: signal.Signals) -> bool:
    """Whether ``sig`` waits for stopped process ``pid`` (Linux: its /proc status masks)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return bool((int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)) >> (sig - 1) & 1)


def resumed_by_hand(run: Path, copy: Path, step: int) -> None:
    """``copy``: ``run`` as it was when its step-``step`` checkpoint was the newest (later checkpoints,
    steps and sessions gone)."""
    shutil.copytree(run, copy)
    for later in (copy / "checkpoints").glob("step_*"):
        if int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").write_text(f"step_{step}\n")
    kept = []
    for line in (copy / "metrics.jsonl").read_text().splitlines(keepends=True):
        record = json.loads(line)
        if record["step"] == step and record.get("event") == goodput.SESSION_START:
            break  # the sessions that resumed from this checkpoint
        kept += [line] if record["step"] <= step else []
    (copy / "metrics.jsonl").write_text("".join(kept))


@pytest.mark.slow
def test_a_lost_node_the_job_goes_on_at_dp1_and_a_new_node_grows_it_back(char_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [f"data.dir={char_shards}", "train.max_steps=30", "train.save_every=10", "train.keep_last=5"]
    args += ["parallel.timeout_s=30", "logging.wandb=disabled", f"run.dir={run}"]
    port = free_port()
    # node 0 hosts the rendezvous store (on one host either agent could; on a cluster the one at
    # MASTER_ADDR does, and losing it ends the job); both start at once, so they meet in the first round
    nodes = [start_elastic_node(port, tmp_path / f"node{i}.log", i == 0, *args) for i in (0, 1)]
    try:
        wait_until(lambda: (run / "checkpoints" / "step_10").is_dir() and last_step(run) >= 12, "step 12", nodes)
        signal_node(nodes[1], signal.SIGKILL)  # node 1 is lost: launcher, agent and rank
        nodes[1].wait(timeout=30)
        # no relaunch by hand: node 0's torchrun restarts its rank, which trains at dp = 1; frozen there,
        # it waits for the new node however long that takes to start
        wait_until(lambda: session_steps(run, 1), "step at dp = 1", nodes[:1])
        rank = rank_of(nodes[0])
        rank.send_signal(signal.SIGSTOP)
        assert max(session_steps(run, 1)) < 30, "node 0's rank finished at dp = 1 before the new node could join"
        nodes.append(start_elastic_node(port, tmp_path / "node2.log", False, *args))  # node 2 joins the job
        joined = time.time()

        def stopped_for_the_new_node() -> bool:  # node 0's torchrun saw node 2 waiting and stopped its rank
            assert len(events(run, goodput.SESSION_START)) == 2, "node 2 started a job of its own"
            return pending(rank.pid, signal.SIGTERM)

        wait_until(stopped_for_the_new_node, "SIGTERM from node 0's torchrun", [nodes[0], nodes[2]])
        rank.send_signal(signal.SIGCONT)  # it saves at the next step boundary and exits
        codes = [nodes[0].wait(timeout=300), nodes[2].wait(timeout=300)]
    finally:
        kill_all(nodes)
    log0, log2 = ((tmp_path / f"node{i}.log").read_text() for i in (0, 2))
    assert codes == [0, 0], log0[-3000:] + log2[-3000:]
    assert [s["world_size"] for s in events(run, goodput.SESSION_START)] == [2, 1, 2], log0[-3000:]
    # the survivor's rank named the failure, then torchrun restarted it (c10d ranks the nodes by
    # arrival, so the survivor was rank 0 or rank 1 of the first session)
    assert re.search(r"watchdog: rank [01] of 2, step \d+, operation", log0), log0[-3000:]
    shrunk, grown = events(run, "resize")
    assert (shrunk["dp_from"], shrunk["dp_to"], shrunk["step"]) == (2, 1, 10), shrunk
    assert shrunk["global_batch"] == 12 and shrunk["accumulation_to"] == 2
    assert "resize: dp 2 -> 1 (world 2 -> 1; tp=1 pp=1 kept)" in log0
    regrown_at = session_steps(run, 1)[-1]  # the dp = 1 session's last step: its SIGTERM checkpoint
    assert (grown["dp_from"], grown["dp_to"], grown["step"]) == (1, 2, regrown_at), grown
    assert grown["global_batch"] == 12 and (grown["accumulation_from"], grown["accumulation_to"]) == (2, 1)
    assert f"step {regrown_at}: SIGTERM: saving a checkpoint and exiting" in log0, log0[-3000:]
    assert "resize: dp 1 -> 2 (world 1 -> 2; tp=1 pp=1 kept)" in log0 + log2  # rank 0 is on either node
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 31))  # each step once
    recomputed = events(run, goodput.RECOMPUTED)  # only the shrink's: the regrow lost no step
    assert len(recomputed) == 1 and recomputed[0]["first"] == 11 and recomputed[0]["last"] >= 12
    acc = goodput.account(read_metrics(run))
    assert len(acc.sessions) == 3 and acc.recomputed_steps == recomputed[0]["steps"] and acc.productive_steps == 30
    first = events(run, goodput.SESSION_START)[2]["time"] + next(
        r["startup_s"] for r in read_metrics(run) if r.get("step") == regrown_at + 1 and "startup_s" in r
    )
    print(f"regrow: {first - joined:.1f} s from node 2's start to the first step at dp = 2")

    # the same checkpoints resumed by hand: step 10 at dp = 1 (one process), step `regrown_at` at dp = 2
    hand1, hand2 = tmp_path / "hand1", tmp_path / "hand2"
    resumed_by_hand(run, hand1, 10)
    resumed_by_hand(run, hand2, regrown_at)
    by_hand = [a for a in args if not a.startswith("run.dir=")]
    cmd = [sys.executable, "-m", "pretrain.train", *ARGS, *by_hand, f"run.dir={hand1}"]
    with subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as one:
        try:  # beside the two-rank resume
            assert "resize: dp 1 -> 2" in torchrun(2, *ARGS, *by_hand, f"run.dir={hand2}").stdout
            out = one.communicate(timeout=300)[0]
        finally:
            one.kill()
    assert one.returncode == 0 and "resize: dp 2 -> 1" in out, out[-3000:]
    got, dp1, dp2 = losses(run), losses(hand1), losses(hand2)
    worst = max(abs(got[s] - dp1[s]) for s in range(11, regrown_at + 1))
    assert worst <= 1e-6, f"the elastic job's losses at dp=1 differ from a resume at dp=1 by hand by {worst}"
    worst = max(abs(got[s] - dp2[s]) for s in range(regrown_at + 1, 31))
    assert worst <= 1e-6, f"the elastic job's losses after the regrow differ from a resume at dp=2 by hand by {worst}"


def test_sbatch_renders_a_node_range_for_elastic_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIN_NODES", "1")
    result, log = render_sbatch(tmp_path, srun_rc=0)
    assert result.returncode == 0, result.stderr
    srun = next(line for line in log.splitlines() if line.startswith("srun "))
    assert "--no-kill" in srun and "--nnodes 1:2" in srun
    torchruns = [line for line in log.splitlines() if "torchrun_agent.py" in line]
    assert len(torchruns) == 2
    for line in torchruns:  # a range: the c10d rendezvous on the first host, whatever SLURM_NODEID says
        assert "--nnodes 1:2" in line and "--node_rank" not in line and "--max_restarts 3" in line
        assert "--rdzv_backend c10d --rdzv_endpoint gpu-node-a:29500 --rdzv_id 4242" in line


def test_launcher_refuses_a_malformed_node_range() -> None:
    for bad in ("2:1", "0:2", "1:x"):
        cmd = ["bash", str(LAUNCH), "--nnodes", bad, "--nproc-per-node", "1", "--", "pretrain.train"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and f"--nnodes {bad}: expected N or MIN:MAX" in done.stderr, done.stderr


def test_a_world_that_cannot_hold_tp_times_pp_stops_in_one_line() -> None:
    """What a shrunk elastic job meets when the survivors are fewer than tp x pp: every restart stops
    with this one line (exit 2, ``conf.cli``) before any process group or file."""
    from conf.cli import compose
    from conf.errors import UserError
    from parallel.run_config import Run

    cfg = compose(["data.dir=unused", "model=tiny", "parallel.tp=2"])
    assert Run.from_config(cfg, world_size=2, rank=0).layout.dp == 1
    with pytest.raises(UserError) as refused:
        Run.from_config(cfg, world_size=1, rank=0)
    assert str(refused.value) == "world size 1 is not divisible by parallel.tp*parallel.pp=2*1"
