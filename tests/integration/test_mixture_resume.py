"""A two-source mixture through gpt-pretrain: kill -9 at dp=2 in the middle of both sources' epochs,
resume at dp=1 with new weights: every step's samples are those of the dp-independent order."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.distributed import env, free_port, last_step, signal_node

pytestmark = pytest.mark.slow

ARGS = [
    "model=tiny",
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "train.save_every=20",
    "train.log_samples=true",
    "logging.wandb=disabled",
    "logging.progress_bar=false",
]


def logged(path: Path, until: int) -> dict[int, set[tuple[int, int]]]:
    """(source, id) pairs a rank trained on each step (its ``samples_rank<R>.jsonl``), up to ``until``."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: set(zip(r["sources"], r["ids"], strict=True)) for r in rows if r["step"] <= until}


def expected_batches(sources: str, steps: int, changed_at: int, weights: list[str]) -> dict[int, set]:
    """The global batches of the mixture, computed in this process (one rank), with the weights
    changed at a resume after step ``changed_at``."""
    from conf.cli import compose
    from data.mixture import MixtureLoader
    from data.stream import Layout
    from tests.conftest import opened_sources

    out: dict[int, set] = {}
    state = None
    for overrides, span in (([], range(1, changed_at + 1)), (weights, range(changed_at + 1, steps + 1))):
        mixture, _ = opened_sources(compose([sources, "run.dir=/nonexistent", *overrides]))
        loader = MixtureLoader(mixture, Layout(8, 8), 1337, 12)
        if state is not None:
            loader.load_state_dict(state)
        for step in span:
            batch = next(loader)
            out[step] = set(zip(batch["source"].tolist(), batch["ids"].tolist(), strict=True))
        state = loader.state_dict()
    return out


def test_killed_at_dp2_resumes_at_dp1_with_new_weights_exactly(
    char_shards: Path, small_char_shards: Path, tmp_path: Path
) -> None:
    listed = f"{{dir:{char_shards},weight:0.5,name:web}},{{dir:{small_char_shards},weight:0.5,name:books}}"
    sources = f"data.sources=[{listed}]"
    run = tmp_path / "run"
    args = [*ARGS, sources, f"run.dir={run}", "train.max_steps=40"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", "-m", "pretrain.train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = run / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 300
        while not (latest.is_file() and latest.read_text().strip() == "step_20" and last_step(run) > 20):
            assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no step after the step-20 checkpoint"
            time.sleep(0.02)
    finally:
        signal_node(proc, signal.SIGKILL)
        proc.wait(timeout=30)
    assert latest.read_text().strip() == "step_20"
    state = json.loads((run / "checkpoints" / "step_20" / "train_state.json").read_text())["data"]
    assert 0 < state["sources"]["books"]["position"] < 108 and state["sources"]["web"]["position"] > 0
    rank1 = logged(run / "samples_rank1.jsonl", 20)  # a dp=1 resume writes rank 0's file only

    weights = ["data.sources.0.weight=0.2", "data.sources.1.weight=0.8"]
    resumed = run_cli("pretrain.train", *args, *weights)  # one process: dp=1, and new weights
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_20'} at step 20" in resumed.stdout
    assert "data: mixture weights changed at step 20: web 0.50→0.20, books 0.50→0.80" in resumed.stdout
    rank0 = logged(run / "samples_rank0.jsonl", 40)
    trained = {s: rank0[s] | rank1.get(s, set()) for s in rank0}
    # the same global batches at dp=2 as at dp=1, and from the resumed step on the new weights' batches
    assert trained == expected_batches(sources, 40, 20, weights)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (event,) = [r for r in rows if r.get("event") == "mixture_weights"]
    assert event["step"] == 20 and event["old"] == {"web": 0.5, "books": 0.5} and event["new"]["books"] == 0.8
    train = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(train) == list(range(1, 41))
    assert train[40]["tokens/web"] + train[40]["tokens/books"] == 40 * 8 * 64
    assert train[40]["tokens/books"] - train[20]["tokens/books"] > 0.7 * 20 * 8 * 64
    last_eval = [r for r in rows if "val_loss" in r][-1]  # the session's end and checkpoint lines follow it
    assert last_eval["step"] == 40 and {"val_loss/web", "val_loss/books"} <= set(last_eval)
