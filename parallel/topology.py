"""The parallel layout, derived once from the config and the world size (torchtitan's ParallelDims).

Everything about tp / pp / vpp / dp is computed and validated here, before any
process group exists, so that a bad layout is a one-line error instead of a hang
or a shape mismatch deep inside megatron-core. ``init()`` then creates the process
groups (gloo on CPU, nccl on GPU) and megatron-core's ``parallel_state``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from conf.errors import UserError
from parallel.capabilities import capabilities
from parallel.expert_layout import check_experts


def _check_engine(par: Any, tp: int, pp: int) -> str:
    """Which engine, and whether it supports the requested ZeRO stage / offload / layout."""
    engine, stage, offload = par.engine, par.zero_stage, par.offload  # values checked by ParallelConfig.check
    caps = capabilities(engine)
    if caps.zero_stages == (0,):
        if stage:
            raise UserError(
                f"parallel.zero_stage={stage} needs parallel.engine=deepspeed "
                "(megatron's ZeRO-1 is parallel.distributed_optimizer=true)"
            )
        if offload != "none" and not caps.offload:
            raise UserError(f"parallel.offload={offload} needs parallel.engine=deepspeed")
        return engine
    if stage not in caps.zero_stages:
        raise UserError(f"parallel.zero_stage={stage}: expected 0, 1, 2 or 3")
    if pp > 1 and not caps.pipeline:
        raise UserError(
            f"parallel.pp={pp} with parallel.engine=deepspeed: DeepSpeed pipelines need its own PipelineModule "
            "and do not combine with ZeRO-2/3; use parallel.engine=megatron for pipeline parallelism"
        )
    if stage == 3 and tp > 1:
        raise UserError(f"parallel.zero_stage=3 with parallel.tp={tp}: use ZeRO-1/2 with tensor parallelism")
    if offload == "cpu" and stage == 0:
        raise UserError("parallel.offload=cpu needs parallel.zero_stage >= 1 (it offloads ZeRO's optimizer state)")
    return engine


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    vpp: int
    dp: int
    sequence_parallel: bool
    ep: int = 1  # expert parallelism (parallel/expert_layout.py): ep divides dp
    moe_dispatcher: str = "alltoall"  # megatron-core's token dispatcher (MoE models; "auto" resolved)

    @classmethod
    def from_config(cls, cfg: Any, world_size: int | None = None, rank: int | None = None) -> Topology:
        """Validate the layout of ``cfg``'s groups (typed: ``cfg.parallel``, ``cfg.model``, ``cfg.train``,
        ``cfg.data`` or None) for ``world_size`` processes (default: torchrun's WORLD_SIZE)."""
        world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        par, model, train = cfg.parallel, cfg.model, cfg.train
        tp, pp, vpp = par.tp, par.pp, par.vpp
        if world % (tp * pp):
            raise UserError(f"world size {world} is not divisible by parallel.tp*parallel.pp={tp}*{pp}")
        dp = world // (tp * pp)
        if model.num_heads % tp:
            raise UserError(f"model.num_heads={model.num_heads} is not divisible by parallel.tp={tp}")
        groups = model.num_query_groups or model.num_heads
        if groups % tp:
            raise UserError(f"model.num_query_groups={groups} is not divisible by parallel.tp={tp}")
        if model.ffn_hidden_size % tp:
            raise UserError(f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by parallel.tp={tp}")
        if model.vocab_multiple % tp:
            raise UserError(f"model.vocab_multiple={model.vocab_multiple} is not divisible by parallel.tp={tp}")
        if model.num_layers % (pp * vpp):
            raise UserError(
                f"model.num_layers={model.num_layers} is not divisible by parallel.pp*parallel.vpp={pp}*{vpp}"
            )
        if vpp > 1 and pp == 1:
            raise UserError(f"parallel.vpp={vpp} needs parallel.pp > 1")
        if train.global_batch % (train.micro_batch * dp):
            raise UserError(
                f"train.global_batch={train.global_batch} is not divisible by "
                f"train.micro_batch*dp={train.micro_batch}*{dp}"
            )
        micro_batches = train.global_batch // (train.micro_batch * dp)
        if vpp > 1 and micro_batches % pp:  # megatron-core's interleaved schedule raises mid-step otherwise
            raise UserError(
                f"parallel.vpp={vpp}: the interleaved schedule needs the micro-batches per step ({micro_batches} = "
                f"train.global_batch/(train.micro_batch*dp)) to be a multiple of parallel.pp={pp}"
            )
        if getattr(cfg, "data", None) is not None and cfg.data.num_streams % dp:
            raise UserError(f"data.num_streams={cfg.data.num_streams} is not divisible by dp={dp}")
        caps = capabilities(_check_engine(par, tp, pp))
        if not caps.async_save and train.async_save:
            raise UserError(
                f"train.async_save=true: only the megatron engine saves asynchronously (parallel.engine={par.engine})"
            )
        if not caps.lr_mult and train.lr_mult:
            raise UserError("train.lr_mult: per-parameter learning rates need parallel.engine=megatron")
        if not caps.qk_norm_with_tp and tp > 1 and model.qk_norm:
            raise UserError(  # megatron's finalize_model_grads sums them by name; DeepSpeed does not
                "model.qk_norm=true with parallel.engine=deepspeed needs parallel.tp=1 "
                "(the replicated q/k norm gradients are not summed over tp there)"
            )
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        # DeepSpeed does not all-reduce sequence-parallel LayerNorm grads over tp: TP without SP there
        sp = bool(par.sequence_parallel) and tp > 1 and caps.sequence_parallel
        ep = check_experts(cfg, tp, dp, caps)
        dispatcher = str(getattr(par, "moe_dispatcher", "auto"))
        if dispatcher == "auto":
            dispatcher = "alltoall" if ep > 1 else "allgather"
        return cls(world, rank, local_rank, tp, pp, vpp, dp, sp, ep, dispatcher)

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_data_parallel_rank()
        return 0

    def init(self, seed: int, timeout_s: float = 600.0) -> None:
        """Create process groups and megatron-core's parallel_state; seed every RNG."""
        import torch.distributed as dist
        from megatron.core import parallel_state, tensor_parallel

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)
            # one process needs no rendezvous (and no port); torchrun/srun provide MASTER_*
            store = dist.HashStore() if self.world_size == 1 else None
            dist.init_process_group(
                "nccl" if torch.cuda.is_available() else "gloo",
                store=store,
                rank=self.rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=self.tp,
                pipeline_model_parallel_size=self.pp,
                virtual_pipeline_model_parallel_size=self.vpp if self.vpp > 1 else None,
                expert_model_parallel_size=self.ep,
            )
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    @staticmethod
    def destroy() -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def compute_device() -> torch.device:
    """Where this rank computes: its GPU (set by :meth:`Topology.init`) when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
