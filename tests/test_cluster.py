"""Cluster operations on localhost (CPU, gloo), launched the way users launch them.

Two "nodes" are two ``launch/torchrun.sh --nnodes 2 --node-rank R`` processes on
127.0.0.1, each in its own session so a test can signal or kill one node's whole
process tree (launcher, torchrun agent, rank) like slurm or a node failure does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel.watchdog import WATCHDOG_EXIT_CODE
from tests.conftest import REPO, run_cli
from tests.distributed import free_port, losses

pytestmark = pytest.mark.slow

REQUEUE = 75
LAUNCH = REPO / "launch" / "torchrun.sh"
ARGS = [
    "model=tiny",
    "train.micro_batch=6",
    "train.global_batch=12",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "logging.progress_bar=false",
]


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # torchrun
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def start_node(node: int, nnodes: int, port: int, log: Path, *args: str) -> subprocess.Popen:
    cmd = ["bash", str(LAUNCH), "--nnodes", str(nnodes), "--nproc-per-node", "1", "--node-rank", str(node)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), "--", "pretrain.train", *ARGS, *args]
    out = log.open("w")
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((r["step"] for r in rows if "loss" in r), default=0)


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while last_step(run_dir) < step:
        assert all(p.poll() is None for p in procs), "a node exited before the run reached the step"
        assert time.monotonic() < deadline, f"no step {step} in {timeout} s"
        time.sleep(0.05)


def signal_node(proc: subprocess.Popen, sig: signal.Signals) -> None:
    """Signal every process of one node: launcher, torchrun agent and ranks (torchrun starts
    ranks in their own sessions, so a process-group signal would miss them; slurm signals
    the whole job step)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            signal_node(p, signal.SIGKILL)
            p.wait(timeout=30)


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


def test_preempted_two_node_run_requeues_and_resumes_on_one_node(char_shards: Path, tmp_path: Path) -> None:
    steps = 120
    common = [f"data.dir={char_shards}", f"train.max_steps={steps}", "train.save_every=0"]
    ref = tmp_path / "ref"
    result = run_cli("pretrain.train", *ARGS, *common, f"run.dir={ref}", "logging.wandb=disabled")
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "run"
    args = [*common, f"run.dir={run}", "logging.wandb=offline"]
    port = free_port()
    nodes = [start_node(i, 2, port, tmp_path / f"node{i}.log", *args) for i in (0, 1)]
    try:
        wait_for_step(run, 5, nodes)
        signal_node(nodes[1], signal.SIGTERM)  # what slurm does to every process of node 1's step
        codes = [p.wait(timeout=180) for p in nodes]
    finally:
        kill_all(nodes)
    logs = [(tmp_path / f"node{i}.log").read_text() for i in (0, 1)]
    assert codes == [REQUEUE, REQUEUE], logs[0][-3000:] + logs[1][-3000:]
    stopped = latest_step(run)
    assert 5 <= stopped < steps
    assert "rank 1: got SIGTERM" in logs[1] and f"step {stopped}: SIGTERM: saving a checkpoint" in logs[0]
    assert "Logging error" not in logs[1]  # torchrun handled the signal once
    assert last_step(run) == stopped
    wandb_id = (run / "wandb_id").read_text().strip()

    one = start_node(0, 1, free_port(), tmp_path / "resume.log", *args)
    try:
        assert one.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    finally:
        kill_all([one])
    assert (
        f"resumed from {run / 'checkpoints' / f'step_{stopped}'} at step {stopped}"
        in (tmp_path / "resume.log").read_text()
    )
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, steps + 1))
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst < 1e-4, f"resumed losses differ from the uninterrupted run by {worst}"
    # the resumed job continued the same wandb run
    assert (run / "wandb_id").read_text().strip() == wandb_id
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(wandb_id) for p in offline)


def _watchdog_case(char_shards: Path, tmp_path: Path, how: signal.Signals) -> tuple[str, float]:
    """Stop node 1 (killed or frozen) after a checkpoint; node 0 must fail with the watchdog's message."""
    timeout_s = 15
    run = tmp_path / "run"
    args = [f"data.dir={char_shards}", f"run.dir={run}", "train.max_steps=240", "train.save_every=20"]
    args += [f"parallel.timeout_s={timeout_s}", "logging.wandb=disabled"]
    port = free_port()
    nodes = [start_node(i, 2, port, tmp_path / f"node{i}.log", *args) for i in (0, 1)]
    try:
        wait_for_step(run, 25, nodes)
        signal_node(nodes[1], how)
        start = time.monotonic()
        code = nodes[0].wait(timeout=timeout_s + 60)
        elapsed = time.monotonic() - start
    finally:
        kill_all(nodes)
    log = (tmp_path / "node0.log").read_text()
    assert code == WATCHDOG_EXIT_CODE, log[-3000:]
    assert elapsed < timeout_s + 20, f"node 0 took {elapsed:.0f} s to fail"
    complete = latest_step(run)
    assert complete >= 20 and complete % 20 == 0

    one = start_node(0, 1, free_port(), tmp_path / "resume.log", *args)
    try:
        assert one.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    finally:
        kill_all([one])
    assert f"at step {complete}" in (tmp_path / "resume.log").read_text()
    assert last_step(run) == 240
    return log, elapsed


def test_killed_node_fails_the_other_with_the_watchdog_message(char_shards: Path, tmp_path: Path) -> None:
    log, _ = _watchdog_case(char_shards, tmp_path, signal.SIGKILL)
    line = next(x for x in log.splitlines() if x.startswith("watchdog:"))
    assert line.startswith("watchdog: rank 0 of 2, step ") and "operation '" in line, line


def test_hung_node_fails_the_other_within_the_timeout(char_shards: Path, tmp_path: Path) -> None:
    """A frozen peer (no socket error, as when a node's network dies) is caught by the timeout."""
    log, elapsed = _watchdog_case(char_shards, tmp_path, signal.SIGSTOP)
    line = next(x for x in log.splitlines() if x.startswith("watchdog:"))
    assert "rank 0 of 2, step " in line and ("parallel.timeout_s=15" in line or "timed out" in line.lower()), line
    assert elapsed >= 14, f"failed after {elapsed:.1f} s, before the 15 s timeout"
