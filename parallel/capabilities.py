"""What each engine supports, in one table, and the decisions derived from it.

The trainer, the preflight, ``gpt-plan``'s memory and time models and the layout checks all need
to know, for instance, whether the optimizer state is sharded over dp: that is decided here once
(:func:`shards_optimizer`), and every "engine X cannot do Y" refusal reads the table
(:func:`refuse_unsupported`) instead of comparing engine names where it happens to be needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conf.errors import UserError


@dataclass(frozen=True)
class EngineCapabilities:
    name: str
    zero_stages: tuple[int, ...]  # parallel.zero_stage values
    offload: bool  # parallel.offload=cpu
    pipeline: bool  # parallel.pp > 1
    distributed_optimizer: bool  # megatron's ZeRO-1 (parallel.distributed_optimizer)
    sequence_parallel: bool  # SP's LayerNorm grads all-reduced over tp
    lr_mult: bool  # per-parameter learning-rate multipliers (train.lr_mult, fine-tuning's head lr)
    qk_norm_with_tp: bool  # replicated q/k-norm grads summed over tp
    async_save: bool  # train.async_save
    grad_reduce_fp32: bool  # gradients reduced in fp32 whatever the compute dtype
    grad_buckets: bool  # gradients reduced in several buckets (DeepSpeed's reduce_bucket_size), else one buffer
    moe: bool = False  # MoE models (model.num_experts) with expert parallelism (parallel.ep); parallel/expert_layout.py

    @property
    def zero(self) -> bool:
        """Sharding by ZeRO stage (parallel.zero_stage), rather than megatron's distributed optimizer."""
        return self.zero_stages != (0,)


ENGINES = {
    "megatron": EngineCapabilities(
        "megatron",
        zero_stages=(0,),
        offload=False,
        pipeline=True,
        distributed_optimizer=True,
        sequence_parallel=True,
        lr_mult=True,
        qk_norm_with_tp=True,
        async_save=True,
        grad_reduce_fp32=True,
        grad_buckets=False,
        moe=True,  # megatron-core's MoE layer, dispatchers and expert-parallel groups
    ),
    "deepspeed": EngineCapabilities(
        "deepspeed",
        zero_stages=(0, 1, 2, 3),
        offload=True,
        pipeline=False,
        distributed_optimizer=False,
        sequence_parallel=False,
        lr_mult=False,
        qk_norm_with_tp=False,
        async_save=False,
        grad_reduce_fp32=False,
        grad_buckets=True,
        # the model is megatron-core's MoE layer, whose router, dispatcher and expert groups need
        # megatron's parallel_state and finalize_model_grads; DeepSpeed-MoE is another model
        moe=False,
    ),
}


def capabilities(engine: str) -> EngineCapabilities:
    try:
        return ENGINES[str(engine)]
    except KeyError:
        raise UserError(f"parallel.engine={engine}: expected {' or '.join(ENGINES)}") from None


def shards_optimizer(engine: str, distributed_optimizer: object, zero_stage: int, dp: int) -> bool:
    """Whether the optimizer state is sharded over dp: megatron's distributed optimizer (``auto``: on
    when dp > 1, where it saves memory; at dp = 1 it only costs a share of every step), or ZeRO >= 1."""
    caps = capabilities(engine)
    if not caps.distributed_optimizer:
        return int(zero_stage) >= 1
    value = str(distributed_optimizer).lower()
    return dp > 1 if value == "auto" else value == "true"


def distributed_optimizer_in_effect(cfg: Any, dp: int, saved: Any = None) -> bool:
    """``parallel.distributed_optimizer`` (true / false / auto) as a bool, against the checkpoint being
    resumed (``saved``, a TrainState): its optimizer state only loads into the same kind of optimizer
    (at any tp/pp/dp), so ``auto`` keeps what it used, and an explicit other value is refused."""
    value, engine = str(cfg.parallel.distributed_optimizer).lower(), str(cfg.parallel.engine)
    previous = None if saved is None else saved.distributed_optimizer
    if not capabilities(engine).distributed_optimizer:
        return False  # ZeRO is parallel.zero_stage there
    if value == "auto":
        return bool(previous) if previous is not None else shards_optimizer(engine, value, 0, dp)
    if value not in ("true", "false"):
        raise UserError(f"parallel.distributed_optimizer={value}: expected true, false or auto")
    wanted = value == "true"
    if previous is not None and wanted != previous:
        raise UserError(
            f"parallel.distributed_optimizer={value}, but the checkpoint in run.dir={cfg.run.dir} was written "
            f"with distributed_optimizer={str(previous).lower()}: pass that value (or auto)"
        )
    return wanted
