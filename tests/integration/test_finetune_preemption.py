"""gpt-finetune runs through the pretraining Trainer: preemption, requeue and exact resume at dp=2."""

from __future__ import annotations

import json
import random
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.distributed import env, free_port, signal_node, wait_for_step

pytestmark = pytest.mark.slow

REQUEUE = 75


def _rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        letters = "abcdefghijklm" if i % 2 == 0 else "nopqrstuvwxyz"
        rows.append({"text": "".join(rng.choice(letters) for _ in range(12)), "label": "ab"[i % 2]})
    return rows


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sigterm_saves_exits_75_and_the_relaunch_resumes_exactly(trained_runs, tmp_path: Path) -> None:  # noqa: ANN001
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows(64, 0)))
    val.write_text("".join(json.dumps(r) + "\n" for r in _rows(16, 1)))
    # constant lr: the relaunch may shorten max_steps without changing the schedule of the steps it shares
    args = [f"init.checkpoint={trained_runs['tp1']}", f"task.train={train}", f"task.validation={val}"]
    args += ["train.micro_batch=4", "train.global_batch=16", "train.lr=1e-3", "train.lr_schedule=constant"]
    args += ["train.warmup_fraction=0", "finetune.classifier_dropout=0", "logging.wandb=disabled"]
    args += ["logging.progress_bar=false"]
    run = tmp_path / "run"
    launch = ["bash", str(REPO / "launch" / "torchrun.sh"), "--nproc-per-node", "2"]
    launch += ["--master-port", str(free_port()), "--", "gpt-finetune", *args, f"run.dir={run}"]
    log = tmp_path / "launch.log"
    proc = subprocess.Popen(
        [*launch, "train.max_steps=2000"],
        cwd=REPO,
        env=env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_step(run, 3, [proc])
        signal_node(proc, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            signal_node(proc, signal.SIGKILL)
    assert code == REQUEUE, log.read_text()[-3000:]
    stopped = max(_losses(run))
    assert 3 <= stopped < 12, stopped
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped}"
    config = (run / "config.yaml").read_text()
    assert "distributed_optimizer: true" in config  # dp = 2 on the megatron engine: ZeRO-1

    relaunch = subprocess.run(
        [*launch, "train.max_steps=12"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300
    )
    assert relaunch.returncode == 0, relaunch.stdout[-3000:] + relaunch.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped}'}" in relaunch.stdout
    assert (run / "results.json").is_file()

    reference = tmp_path / "reference"
    result = run_cli("pretrain.finetune", *args, "train.max_steps=12", f"run.dir={reference}")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, uninterrupted = _losses(run), _losses(reference)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step
