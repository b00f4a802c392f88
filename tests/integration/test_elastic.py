"""Elastic runs on localhost: a node range (``launch/torchrun.sh --nnodes 1:2``), a node lost mid-run.

Two "nodes" are two launchers on 127.0.0.1 meeting at a c10d rendezvous, each in its own session
so that the test can kill one node's whole process tree (launcher, torchrun agent, rank) as a
node failure does. The survivor's rank fails on the dead peer (the watchdog's line), its torchrun
restarts it at the smaller world, and it resumes from the last checkpoint at dp = 1.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.trainer import goodput
from pretrain.trainer.metrics import read_metrics
from tests.conftest import REPO, run_cli
from tests.distributed import env, free_port, last_step, losses, signal_node
from tests.integration.test_cluster import ARGS, kill_all, render_sbatch

LAUNCH = REPO / "launch" / "torchrun.sh"
# short rendezvous timeouts: a dead node's heartbeat expires after 2 s, a shrunk round closes 3 s later
RDZV_CONF = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=2"


def start_elastic_node(port: int, log: Path, hosts_store: bool, *args: str) -> subprocess.Popen:
    cmd = ["bash", str(LAUNCH), "--nnodes", "1:2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(port), "--max-restarts", "1", "--rdzv-conf", f"{RDZV_CONF},is_host={hosts_store}"]
    cmd += ["--", "pretrain.train", *ARGS, *args]
    run_env = {**env(), "RDZV_ID": f"elastic-{port}"}
    out = log.open("w")
    return subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("event") == name]


def resumed_by_hand(run: Path, copy: Path, step: int) -> None:
    """``copy``: ``run`` as it was when its step-``step`` checkpoint was the newest (later steps and lines gone)."""
    shutil.copytree(run, copy)
    for later in (copy / "checkpoints").glob("step_*"):
        if int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").write_text(f"step_{step}\n")
    lines = (copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    (copy / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


@pytest.mark.slow
def test_lost_node_the_job_goes_on_at_dp1_from_the_last_checkpoint(char_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [f"data.dir={char_shards}", "train.max_steps=20", "train.save_every=10", "train.keep_last=5"]
    args += ["parallel.timeout_s=30", "logging.wandb=disabled"]
    port = free_port()
    # node 0 hosts the rendezvous store (on one host either agent could; on a cluster the one at
    # MASTER_ADDR does, and losing it ends the job); both start at once, so they meet in the first round
    nodes = [start_elastic_node(port, tmp_path / f"node{i}.log", i == 0, *args, f"run.dir={run}") for i in (0, 1)]
    try:
        deadline = time.monotonic() + 240
        while not ((run / "checkpoints" / "step_10").is_dir() and last_step(run) >= 12):
            assert all(p.poll() is None for p in nodes), "a node exited before the run reached step 12"
            assert time.monotonic() < deadline, "no step 12 in 240 s"
            time.sleep(0.05)
        signal_node(nodes[1], signal.SIGKILL)  # node 1 is lost: launcher, agent and rank
        nodes[1].wait(timeout=30)
        code = nodes[0].wait(timeout=300)  # no relaunch by hand: node 0's torchrun restarts its rank
    finally:
        kill_all(nodes)
    log = (tmp_path / "node0.log").read_text()
    assert code == 0, log[-4000:]
    assert [s["world_size"] for s in events(run, goodput.SESSION_START)] == [2, 1], log[-3000:]
    # the survivor's rank named the failure, then torchrun restarted it (c10d ranks the nodes by
    # arrival, so the survivor was rank 0 or rank 1 of the first session)
    assert re.search(r"watchdog: rank [01] of 2, step \d+, operation", log), log[-3000:]
    resized = events(run, "resize")
    assert len(resized) == 1 and resized[0]["dp_from"] == 2 and resized[0]["dp_to"] == 1, resized
    assert resized[0]["step"] == 10 and resized[0]["global_batch"] == 12 and resized[0]["accumulation_to"] == 2
    assert "resize: dp 2 -> 1 (world 2 -> 1; tp=1 pp=1 kept)" in log
    assert sorted(losses(run)) == list(range(1, 21))
    recomputed = events(run, goodput.RECOMPUTED)
    assert len(recomputed) == 1 and recomputed[0]["first"] == 11 and recomputed[0]["last"] >= 12
    acc = goodput.account(read_metrics(run))
    assert len(acc.sessions) == 2 and acc.recomputed_steps == recomputed[0]["steps"] and acc.productive_steps == 20

    hand = tmp_path / "hand"  # the same checkpoint resumed at dp = 1 by hand
    resumed_by_hand(run, hand, 10)
    result = run_cli("pretrain.train", *ARGS, *args, f"run.dir={hand}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resize: dp 2 -> 1" in result.stdout
    got, want = losses(run), losses(hand)
    worst = max(abs(got[s] - want[s]) for s in range(11, 21))
    assert worst <= 1e-6, f"the elastic job's losses differ from a resume at dp=1 by hand by {worst}"


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
