"""Tasks: what the one :class:`~pretrain.trainer.loop.Trainer` trains.

A task supplies the model (a :class:`~parallel.engine.ModelSpec`: how to build it and its
forward step with the loss), its batches (with an exact, dp-independent state), what it
logs per step, its evaluation, and what it checks and records in a checkpoint. Pretraining
(:mod:`pretrain.tasks.lm`: L1 over shards) and fine-tuning (:mod:`pretrain.tasks.finetune`:
L3 = L2 + λ·L1 over labeled examples) are the two tasks; everything else (resume, saves,
preemption, watchdog, skip policy, metrics) is the Trainer's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from parallel.engine import Engine, ModelSpec, StepResult
from parallel.run_config import Groups, Run
from parallel.topology import Topology
from parallel.train_state import TrainState


class InLoopEvaluation(Protocol):
    """What the Trainer calls of ``pretrain/eval/in_loop.py``'s evaluator."""

    def due(self, step: int, last: bool) -> bool: ...

    def run(self, engine: Engine, topo: Topology, step: int, beat: Callable[[], None]) -> dict[str, Any]: ...


class Task(Protocol):
    command: str  # the console script (named in run-dir errors)
    vocab_size: int  # the tokenizer's (recorded in the train state; a task may add tokens to its model)
    files: tuple[Path, ...]  # copied into every step dir (the tokenizer), so a step stands alone
    seq_len: int | None  # the data's sequence length for the preflight's estimate; None: the model's
    in_loop_eval: InLoopEvaluation | None  # lm-eval tasks run during training (eval.every_steps), or None

    def configure(self, groups: Groups) -> dict[str, Any]:
        """The groups this task settles (e.g. the pretrained model's shape, derived max_steps, resolved
        data dirs), as new group instances by name: the Run is built from them, and config.yaml and
        the checkpoints record the result."""

    def check_resume(self, config: Run, state: TrainState, step_dir: Path) -> bool:
        """Refuse (one line) a checkpoint this task cannot continue; returns whether its
        loader state is to be restored."""

    def model_spec(self, config: Run, resuming: bool) -> ModelSpec:
        """The model and its loss; ``resuming``: the weights come from the run's checkpoint."""

    def start(self, config: Run, topo: Topology) -> None:
        """Open the batches for this rank (their state is loaded next, when resuming)."""

    def describe(self) -> str:
        """What the run trains on, for the start banner (the data or the task file)."""

    def eval_description(self) -> str:
        """What an evaluation covers, announced before it runs ("N windows of the validation split")."""

    def begin(self, run_dir: Path, step: int) -> None:
        """Training starts (or resumes) at ``step``: open any per-run files of the task."""

    def next_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def resume_events(self) -> list[dict[str, Any]]:
        """What restoring the loader state changed (``metrics.jsonl`` events, e.g. a mixture's new weights)."""

    def checkpoint_extras(self) -> dict[str, Any]:
        """What the task records in the train state (``TrainState.data_identity`` / ``.task``)."""

    def step_record(self, result: StepResult, step_time: float, step: int) -> dict[str, Any]:
        """The task's fields of a step's ``metrics.jsonl`` line."""

    def cadence(self, config: Run) -> tuple[int, int]:
        """(evaluate every N steps, save every N steps); 0 = only at the end, -1 = never."""

    def evaluate(self, engine: Engine, topo: Topology, beat: Callable[[], None]) -> dict[str, float]:
        """The task's evaluation on the current weights, as ``metrics.jsonl`` fields."""

    def finish(
        self, engine: Engine, topo: Topology, step: int, last_eval: dict[str, float] | None, trained: bool
    ) -> dict:
        """After the last step, or at once (``trained`` false) when the run was already done: final outputs."""
