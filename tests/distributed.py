"""Launch gpt-pretrain under torchrun on gloo, the way a user does, with a hard timeout and a free port."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

PORT_BLOCK = 1500  # ports per pytest-xdist worker, below the kernel's ephemeral range (32768-60999 on Linux)


def free_port() -> int:
    """A free port for a launcher to bind, chosen below the ephemeral range and in this pytest-xdist
    worker's own block: a port from ``bind(0)`` is an ephemeral one, which the kernel may hand to any
    other socket (gloo opens many) between this check and the launcher's bind, and two workers could
    pick the same one."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    low = 20000 + PORT_BLOCK * (worker % 8)
    for port in random.sample(range(low, low + PORT_BLOCK), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + PORT_BLOCK}")


def torchrun(nproc: int, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m pretrain.train ARGS``; one thread per rank (gloo hangs, so: timeout)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "pretrain.train",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stderr[-4000:]}"
    return result


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def step_metrics(run_dir: Path) -> dict[int, dict]:
    """The training lines of ``metrics.jsonl`` by step (loss and what else the step logged)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def layout_args(tp: int, pp: int, vpp: int = 1) -> list[str]:
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.vpp={vpp}"]


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # torchrun
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}


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
