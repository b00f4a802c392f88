"""In process: what a resumed run refuses or reports against its checkpoint (pretrain/trainer/resume_checks.py), and
the loss-spike skipping whose history a checkpoint carries (pretrain/trainer/skip_policy.py)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conf import test_hooks
from conf.cli import compose
from conf.errors import UserError
from parallel.train_state import TrainState
from pretrain.trainer.resume_checks import check_resume, config_changes
from pretrain.trainer.skip_policy import MIN_HISTORY, SkipPolicy
from tests.conftest import run_of


def saved_state(cfg: object, engine: str = "megatron") -> TrainState:
    """The train state a run of ``cfg`` writes (what the resume checks read of it)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return TrainState.from_dict(json.loads(json.dumps(TrainState(4, config, 67, engine=engine).to_dict())))


def test_a_zero_stage_change_at_resume_is_refused_naming_the_stage(tmp_path: Path) -> None:
    base = ["data.dir=unused", f"run.dir={tmp_path}"]
    zero1, zero2 = compose([*base, "parallel=zero1"]), compose([*base, "parallel=zero2"])
    state, step_dir = saved_state(zero1, engine="deepspeed"), tmp_path / "checkpoints" / "step_4"
    check_resume(run_of(zero1), state, step_dir)  # the same stage resumes
    line = f"run.dir={tmp_path} holds a parallel.zero_stage=1 checkpoint; resume it with that stage"
    with pytest.raises(UserError, match=re.escape(line)):
        check_resume(run_of(zero2), state, step_dir)
    check_resume(run_of(zero2), dataclasses.replace(state, weights_only=True), step_dir)  # weights only: any stage


def test_betas_weight_decay_and_grad_clip_changes_at_resume_are_reported(tmp_path: Path) -> None:
    base = ["data.dir=unused", f"run.dir={tmp_path}"]
    saved = compose(base)
    state = saved_state(saved)
    assert config_changes(run_of(saved), state) == []
    changed = ["train.beta1=0.8", "train.beta2=0.95", "train.weight_decay=0.01", "train.grad_clip=0.5"]
    events = config_changes(run_of(compose([*base, *changed])), state)
    assert {e["event"] for e in events} == {"config_change"}
    assert sorted((e["key"], e["old"], e["new"]) for e in events) == [
        ("train.beta1", 0.9, 0.8),
        ("train.beta2", 0.99, 0.95),
        ("train.grad_clip", 1.0, 0.5),
        ("train.weight_decay", 0.1, 0.01),
    ]


def decide(policy: SkipPolicy, losses: list[float]) -> list[tuple[bool, str]]:
    out = []
    for loss in losses:
        policy.step += 1
        out.append((policy.accept(loss), policy.reason))
    return out


def test_a_loss_spike_is_skipped_once_there_is_history_and_a_resume_decides_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(test_hooks.SWITCH, raising=False)  # no injected faults
    policy = SkipPolicy(2.0, max_skipped=3)
    # fewer than MIN_HISTORY applied steps: no mean to compare with, a loss of 2.2 x the others is applied
    assert decide(policy, [3.0] * (MIN_HISTORY - 1) + [6.6]) == [(True, "")] * MIN_HISTORY
    state = json.loads(json.dumps(policy.state_dict()))  # as the checkpoint's train state holds it
    after = [6.8, 6.6, 7.0, 3.0]  # the applied steps' mean: 3.36 (6.8 > 2 x 3.36), then 3.65 (7.0 < 2 x 3.65)
    decisions = decide(policy, after)
    spike = "loss 6.8 > train.spike_factor=2 x recent mean 3.36"
    assert decisions == [(False, spike), (True, ""), (True, ""), (True, "")]
    assert policy.total == 1 and policy.consecutive == 0
    resumed = SkipPolicy(2.0, max_skipped=3)
    resumed.load_state_dict(state)
    assert decide(resumed, after) == decisions
    fresh = SkipPolicy(2.0, max_skipped=3)  # without the history the spike would be applied
    assert decide(fresh, after)[0] == (True, "")
    assert decide(SkipPolicy(None, max_skipped=3), [3.0] * MIN_HISTORY + [100.0])[-1] == (True, "")  # off
