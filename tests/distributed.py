"""Launch gpt-pretrain under torchrun on gloo, the way a user does, with a hard timeout and a free port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def layout_args(tp: int, pp: int, vpp: int = 1) -> list[str]:
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.vpp={vpp}"]
