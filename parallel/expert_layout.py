"""Expert parallelism's place in the layout, checked before any process group (``parallel.ep``).

megatron-core lays the expert layers out on the same ranks as the dense ones, regrouped:
the dense layers see tp x pp x dp = world, the experts see etp x ep x edp x pp = world with the
expert tensor-parallel size etp = tp here, so ``ep`` must divide ``dp`` (and the experts
split evenly: ``ep`` divides ``model.num_experts``). Expert-data-parallel = dp / ep ranks hold
the same experts and reduce their gradients (and shard their optimizer state) among themselves.
"""

from __future__ import annotations

from typing import Any

from conf.errors import UserError
from parallel.capabilities import EngineCapabilities


def check_experts(cfg: Any, tp: int, dp: int, caps: EngineCapabilities) -> int:
    """``parallel.ep`` for this layout (1 for a dense model), or a one-line :class:`UserError`."""
    par, model = cfg.parallel, cfg.model
    ep = int(getattr(par, "ep", 1) or 1)
    experts = getattr(model, "num_experts", None)
    if experts is None:
        if ep > 1:
            raise UserError(f"parallel.ep={ep} needs a MoE model (model.num_experts; e.g. model=moe-tiny)")
        return 1
    if not caps.moe:
        raise UserError(
            f"model.num_experts={experts} with parallel.engine={caps.name}: MoE models train on "
            "parallel.engine=megatron (megatron-core's MoE layer and expert-parallel groups)"
        )
    if ep < 1:
        raise UserError(f"parallel.ep={ep}: must be >= 1")
    if dp % ep:
        raise UserError(f"parallel.ep={ep} does not divide dp={dp} (world size / (parallel.tp*parallel.pp))")
    if experts % ep:
        raise UserError(f"model.num_experts={experts} is not divisible by parallel.ep={ep}")
    if tp > 1 and not bool(par.sequence_parallel):
        raise UserError(
            f"model.num_experts with parallel.tp={tp} needs parallel.sequence_parallel=true "
            "(megatron-core's MoE layer refuses tensor parallelism without it)"
        )
    for key in ("moe_ffn_hidden_size", "moe_shared_expert_size"):
        width = getattr(model, key, None)
        if width is not None and width % tp:
            raise UserError(f"model.{key}={width} is not divisible by parallel.tp={tp}")
    return ep
