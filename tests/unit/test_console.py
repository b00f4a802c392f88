"""The periodic console line: rates averaged over the interval (work over time), elapsed time, ETA."""

from __future__ import annotations

import pytest

from pretrain.trainer import console
from pretrain.trainer.console import Interval, clock


def test_rates_are_averaged_over_the_interval_and_the_eta_counts_the_remaining_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    interval = Interval(step=0, max_steps=10)
    for step, (rate, seconds) in enumerate([(100.0, 1.0), (300.0, 3.0)], start=1):
        now[0] += seconds + 1.0  # one second of other work per step (a save, an evaluation)
        interval.add({"step": step, "loss": 1.0, "tokens_per_s": rate, "mfu": rate / 1000, "step_time_s": seconds})
    line = interval.line({"step": 2, "loss": 1.0, "tokens_per_s": 300.0, "mfu": 0.3, "step_time_s": 3.0})
    # (100*1 + 300*3) / 4 s = 250 tokens/s, not the last step's 300 nor the mean of rates (200)
    assert line.startswith("step=2/10 loss=1 ") and "tokens_per_s=250 " in line and "mfu=0.25 " in line
    assert "avg_steps=2" in line and "elapsed=0:00:06" in line and line.endswith("eta=0:00:24")  # 3 s x 8 steps
    assert "step_time_s" not in line
    now[0] += 2.0
    interval.add({"step": 3, "loss": 1.0, "tokens_per_s": 50.0, "step_time_s": 2.0})
    line = interval.line({"step": 3, "loss": 1.0, "tokens_per_s": 50.0})
    # the ETA is the session's pace (8 s over 3 steps, x 7 left), not the last interval's (2 s x 7)
    assert "tokens_per_s=50 avg_steps=1" in line and line.endswith("eta=0:00:18")


def test_clock() -> None:
    assert (clock(0), clock(61), clock(3 * 3600 + 62), clock(-5)) == ("0:00:00", "0:01:01", "3:01:02", "0:00:00")


@pytest.mark.parametrize(
    ("env", "configured", "mode"),
    [
        (None, "offline", "offline"),
        ("disabled", "offline", "disabled"),
        ("offline", "online", "offline"),
        ("online", "disabled", "disabled"),
        ("nonsense", "offline", "offline"),
    ],
)
def test_wandb_mode_is_the_config_unless_the_environment_turns_it_off_or_local(
    monkeypatch: pytest.MonkeyPatch, env: str | None, configured: str, mode: str
) -> None:
    from pretrain.trainer.metrics import wandb_mode

    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert wandb_mode(configured) == mode
