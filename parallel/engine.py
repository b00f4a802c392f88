"""The engine interface the training loop talks to (megatron-core and DeepSpeed).

An engine owns the model, the optimizer and the LR schedule for this rank, and
hides how micro-batches are scheduled (pipeline or not) and how gradients are
reduced (DDP, distributed optimizer, ZeRO). The loop only sees global steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass
class StepResult:
    loss: float  # mean token loss over the global batch
    grad_norm: float
    lr: float
    skipped: bool = False
    totals: dict[str, float] = field(default_factory=dict)  # the loss function's named sums


class Engine(Protocol):
    """Build is the constructor; everything else is per step or per checkpoint."""

    def train_step(
        self, micro_batches: list[dict[str, torch.Tensor]], accept: Callable[[float], bool] | None = None
    ) -> StepResult:
        """One optimizer step over this rank's micro-batches of the global batch. ``accept`` (a
        collective, the same answer on every rank) sees the global-batch loss before the update
        and may refuse it: the step is then skipped (no update, no schedule step)."""

    def eval_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """(sum of masked token losses, number of tokens), reduced over data-parallel ranks."""

    def save(self, directory: Path, common: dict[str, Any], async_save: bool = False) -> Any:
        """Write model + optimizer + schedule (+ ``common``) into an existing empty directory.

        With ``async_save`` (megatron engine) returns megatron-core's ``AsyncRequest`` for
        the shard writing, to be scheduled and finalized by the caller; else None."""

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore model + optimizer + schedule from ``directory``; returns ``common``."""

    def unwrapped_model(self) -> torch.nn.Module:
        """The first model chunk without wrappers (for generation)."""


def lr_scheduler(optimizer: Any, train: Any) -> Any:
    """megatron-core's ``OptimizerParamScheduler`` from the ``train`` config group, for either
    engine: linear warmup from 0, then cosine / linear / constant decay to ``lr * min_lr_ratio``;
    weight decay per param group (``wd_mult``). Stepped after each applied optimizer step.

    On resume the config in effect wins over the checkpoint's schedule (megatron's
    ``override_opt_param_scheduler``): only the step count is restored and the lr is
    recomputed at it, so a relaunch with another lr, schedule or max_steps does what it says."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = int(train.lr_decay_steps or train.max_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=float(train.lr),
        min_lr=float(train.lr) * float(train.min_lr_ratio),
        # megatron needs warmup < decay; a run shorter than its warmup warms up for all of it
        lr_warmup_steps=min(int(train.warmup_steps), max(decay_steps - 1, 0)),
        lr_decay_steps=max(decay_steps, 1),
        lr_decay_style=str(train.lr_schedule),
        start_wd=float(train.weight_decay),
        end_wd=float(train.weight_decay),
        wd_incr_steps=int(train.max_steps),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
