"""Stragglers named: a rank slowed on purpose (``conf/test_hooks.py``) is named within
``parallel.straggler_windows`` windows, and a run's normal stretch names nobody."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.trainer.stragglers import describe
from tests.distributed import torchrun

EVERY, WINDOWS, SLOW_FROM, STEPS = 10, 3, 201, 230  # named at the last step


@pytest.mark.slow
def test_a_slowed_rank_is_named_and_a_normal_run_names_nobody(
    char_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1's forward passes are 50 ms slower from step 201: 200 normal steps name nobody, then rank 1
    is named once, by the third slow window."""
    monkeypatch.setenv("GPT_TEST_HARNESS", "1")
    monkeypatch.setenv("GPT_FAULT_SLOW_RANK", "1")
    monkeypatch.setenv("GPT_FAULT_SLOW_FROM", str(SLOW_FROM))
    run = tmp_path / "run"
    args = ["model=tiny", "train.micro_batch=2", "train.global_batch=4", "train.eval_every=0", "train.eval_batches=1"]
    args += ["train.sample_tokens=0", "logging.progress_bar=false", "train.save_every=-1", "logging.wandb=disabled"]
    args += [f"parallel.straggler_every={EVERY}", f"parallel.straggler_windows={WINDOWS}"]
    result = torchrun(2, f"data.dir={char_shards}", f"run.dir={run}", f"train.max_steps={STEPS}", *args)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    named = [r for r in rows if r.get("event") == "straggler"]
    assert len(named) == 1, named  # nobody in the 200 normal steps; rank 1 once per streak
    event = named[0]
    assert event["rank"] == 1 and event["step"] == SLOW_FROM - 1 + EVERY * WINDOWS, event
    assert event["compute_s"] > 1.5 * event["median_s"] and event["host"]
    line = next(x for x in result.stdout.splitlines() if x.startswith("straggler: "))
    assert line == describe(event) and f"rank 1 on {event['host']}" in line
