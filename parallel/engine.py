"""The engine boundary: what the Trainer may ask of an engine (megatron-core or DeepSpeed).

An engine owns the model, the optimizer and the LR schedule for this rank, and hides how
micro-batches are scheduled (pipeline or not) and how gradients are reduced (DDP,
distributed optimizer, ZeRO). It knows nothing of the model or of the task: it receives a
:class:`ModelSpec` (how to build one chunk of the model, and the task's forward step with
its loss) and the layout. Both engines take the same constructor arguments
(:data:`EngineFactory`), and the Trainer uses nothing but the :class:`Engine` protocol.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

ENGINES = {
    "megatron": "parallel.megatron_engine:MegatronEngine",
    "deepspeed": "parallel.deepspeed_engine:DeepSpeedEngine",
}

# megatron-core's ``forward_step_func``: (iterator of micro-batches, model) → (output, loss_func), where
# ``loss_func(output) → (mean loss of the micro-batch, {name: sum})``; the named sums are added over
# micro-batches and ranks into the step's totals (``loss_sum`` / ``tokens`` give the step's loss).
ForwardStep = Callable[[Any, torch.nn.Module], tuple[Any, Callable[[Any], tuple[torch.Tensor, dict]]]]


@dataclass(frozen=True)
class ModelSpec:
    """Everything model- or task-specific an engine needs, supplied from above (``pretrain/``).

    ``config(**layout)`` makes megatron-core's ``TransformerConfig`` of the model; the engine passes
    the layout (tp, pp, vpp, sequence parallelism, dtypes) and hands the result to ``build``.
    (A function, not a finished config: ``TransformerConfig`` derives fields from the layout.)
    """

    config: Callable[..., Any]  # (**layout fields) → megatron.core.transformer.TransformerConfig
    build: Callable[[Any, int | None], torch.nn.Module]  # (layout-complete config, vp_stage) → one chunk, on CPU
    forward_step: ForwardStep
    batch_shape: Callable[[dict[str, torch.Tensor]], tuple[int, int]]  # micro-batch → (seq length, sequences)
    # after each train step, on every rank (a collective): the model's own metrics of the step
    # (a MoE model's router losses and expert load), given the micro-batches this rank ran
    step_metrics: Callable[[int], dict[str, Any]] | None = None


@dataclass
class StepResult:
    loss: float  # mean loss over the global batch
    grad_norm: float
    lr: float
    skipped: bool = False
    totals: dict[str, float] = field(default_factory=dict)  # the loss function's named sums
    metrics: dict[str, Any] = field(default_factory=dict)  # ModelSpec.step_metrics, logged as they are


class SaveHandle(Protocol):
    """A save whose files are still being written in the background (opaque to the Trainer):
    the checkpoint dir registers its commit with ``on_done`` and hands it to the writer queue."""

    def on_done(self, fn: Callable[[], None]) -> None: ...

    def schedule(self, queue: Any) -> None: ...


class Engine(Protocol):
    """The constructor builds; everything else is per step or per checkpoint."""

    def train_step(
        self, micro_batches: list[dict[str, torch.Tensor]], accept: Callable[[float], bool] | None = None
    ) -> StepResult:
        """One optimizer step over this rank's micro-batches of the global batch. ``accept`` (a
        collective, the same answer on every rank) sees the global-batch loss before the update
        and may refuse it: the step is then skipped (no update, no schedule step)."""

    def eval_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """The loss function's named sums over these micro-batches, in eval mode, reduced over
        data-parallel (and pipeline) ranks."""

    def save(self, directory: Path, state: dict[str, Any], async_save: bool = False) -> SaveHandle | None:
        """Write model + optimizer + schedule (+ the train state) into an existing empty directory;
        with ``async_save`` returns the handle of the background write, else None."""

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore model + optimizer + schedule from ``directory``; returns the saved train state."""

    def unwrapped_model(self) -> torch.nn.Module:
        """The first model chunk without wrappers (for sampling)."""


# (cfg, topology, model spec) → Engine: the one constructor signature of both engines
EngineFactory = Callable[[Any, Any, ModelSpec], Engine]


def engine_class(name: str) -> EngineFactory:
    """The engine named by ``parallel.engine``, imported only when used (DeepSpeed is slow to import)."""
    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


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


def layout_config(config: Callable[..., Any], topo: Any, bf16: bool) -> Any:
    """The model's ``TransformerConfig`` with this rank's layout and precision filled in: the one
    place where parallelism reaches the model (megatron-core reads it in every layer)."""
    return config(
        tensor_model_parallel_size=topo.tp,
        pipeline_model_parallel_size=topo.pp,
        virtual_pipeline_model_parallel_size=topo.vpp if topo.vpp > 1 else None,
        sequence_parallel=topo.sequence_parallel,
        expert_model_parallel_size=topo.ep,
        moe_token_dispatcher_type=topo.moe_dispatcher,
        # gloo matches messages between two ranks in order; with pp=2 (next == prev) a
        # batched send of activations and gradients can be received swapped
        batch_p2p_comm=torch.cuda.is_available(),
        # bf16: megatron-core mixed precision (bf16 params and compute, fp32 main weights
        # and grads in the optimizer), the same path on CPU and GPU
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
    )
