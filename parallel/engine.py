"""The engine interface the training loop talks to (megatron-core now, DeepSpeed next).

An engine owns the model, the optimizer and the LR schedule for this rank, and
hides how micro-batches are scheduled (pipeline or not) and how gradients are
reduced (DDP, distributed optimizer, ZeRO). The loop only sees global steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass
class StepResult:
    loss: float  # mean token loss over the global batch
    grad_norm: float
    lr: float
    skipped: bool = False


class Engine(Protocol):
    """Build is the constructor; everything else is per step or per checkpoint."""

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over this rank's micro-batches of the global batch."""

    def eval_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """(sum of masked token losses, number of tokens), reduced over data-parallel ranks."""

    def save(self, directory: Path, common: dict[str, Any]) -> None:
        """Write model + optimizer + schedule (+ ``common``) into an existing empty directory."""

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore model + optimizer + schedule from ``directory``; returns ``common``."""

    def unwrapped_model(self) -> torch.nn.Module:
        """The first model chunk without wrappers (for generation)."""
