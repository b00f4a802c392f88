"""Mixture-of-Experts decoders: megatron-core's own MoE layer (router, token dispatcher, experts,
shared experts), configured from the ``model.moe_*`` keys (checked in ``conf/moe.py``).

Nothing here computes a MoE layer: the keys become ``TransformerConfig`` fields and the layer spec
becomes megatron-core's MoE spec. Two things are this project's own, both for the same reason
as :class:`~pretrain.model.gpt.SeededTransformerLayer` (every layout starts from the same model):
each expert's initial weights depend on its global index only, not on which expert-parallel
rank builds it (:class:`SeededSequentialMLP`); and the FLOP count of a token counts the experts
it is routed to (its *active* parameters).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import utils
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP

from conf.moe import moe_layer_pattern

ROUTER_DTYPES = {"fp32": "fp32", "fp64": "fp64", "model": None}  # model.moe_router_dtype -> megatron's


def is_moe(model_cfg: Any) -> bool:
    """Whether the model has MoE layers (a config saved before the MoE keys existed is dense)."""
    return getattr(model_cfg, "num_experts", None) is not None


def moe_fields(model_cfg: Any) -> dict[str, Any]:
    """The ``model.moe_*`` keys as megatron-core ``TransformerConfig`` fields ({} for a dense model).

    ``moe_norm_topk_prob`` is Hugging Face's name for megatron's choice of where the softmax is:
    over the k chosen logits (renormalised, Mixtral / Qwen3) or over all experts before choosing
    (``moe_router_pre_softmax``, OLMoE)."""
    if not is_moe(model_cfg):
        return {}
    m = model_cfg
    balancing = str(m.moe_load_balancing)
    return {
        "num_moe_experts": int(m.num_experts),
        "moe_router_topk": int(m.moe_topk),
        "moe_ffn_hidden_size": int(m.moe_ffn_hidden_size or m.ffn_hidden_size),
        "moe_layer_freq": moe_layer_pattern(m),
        "moe_shared_expert_intermediate_size": int(m.moe_shared_expert_size) if m.moe_shared_expert_size else None,
        "moe_router_score_function": str(m.moe_score_function),
        "moe_router_pre_softmax": not bool(m.moe_norm_topk_prob),
        "moe_router_load_balancing_type": balancing,
        "moe_aux_loss_coeff": float(m.moe_aux_loss_coeff) if balancing != "none" else 0.0,
        "moe_z_loss_coeff": float(m.moe_z_loss_coeff) or None,
        "moe_router_enable_expert_bias": bool(m.moe_expert_bias),
        "moe_router_bias_update_rate": float(m.moe_expert_bias_rate),
        "moe_expert_capacity_factor": None if m.moe_capacity_factor is None else float(m.moe_capacity_factor),
        "moe_token_drop_policy": str(m.moe_drop_policy),
        "moe_router_dtype": ROUTER_DTYPES[str(m.moe_router_dtype)],
        "moe_grouped_gemm": False,
    }


class SeededSequentialMLP(SequentialMLP):
    """megatron-core's ``SequentialMLP`` whose expert ``g`` is initialised from (layer seed, g).

    megatron builds a rank's local experts in a row from the default generator, so at ep=2 the
    second rank's experts 4..7 would get the draws of experts 0..3 of one process. The base seed
    is drawn from the generator as the layer left it (seeded per global layer, and everything
    built before the experts draws full-size weights at any layout), each expert reseeds from
    ``base + g``, and the generator continues from ``base - 1`` for what follows (shared experts).
    """

    def __init__(self, num_local_experts: int, config: Any, submodules: Any, pg_collection: Any = None) -> None:
        base = int(torch.randint(1, 2**31 - 1, ()))
        super().__init__(0, config, submodules, pg_collection=pg_collection)
        self.num_local_experts = num_local_experts
        first = utils.get_pg_rank(self.ep_group) * num_local_experts
        for i in range(num_local_experts):
            torch.manual_seed(base + first + i)
            ffn = self.config.moe_ffn_hidden_size
            self.local_experts.append(
                MLP(self.config, submodules, ffn_hidden_size=ffn, is_expert=True, tp_group=self.tp_group)
            )
        torch.manual_seed(base - 1)


def use_seeded_experts(layer: Any, column: type | None = None, row: type | None = None) -> Any:
    """A MoE layer spec with :class:`SeededSequentialMLP` as its experts and, given, the linear
    layers of the local spec in the experts and the shared expert (in place; returns the MLP's submodules)."""
    mlp = layer.submodules.mlp.submodules
    mlp.experts.module = SeededSequentialMLP
    if column is not None and row is not None:
        for part in (mlp.experts.submodules, mlp.shared_experts.submodules):
            part.linear_fc1, part.linear_fc2 = column, row
    return mlp


def active_mlp_params(model_cfg: Any) -> tuple[float, int]:
    """(matmul weights of one token's MLP per layer, averaged over layers; MoE layers) for the FLOP count:
    a MoE layer counts its router, the ``moe_topk`` experts a token visits and the shared expert."""
    d, ffn, layers = int(model_cfg.hidden_size), int(model_cfg.ffn_hidden_size), int(model_cfg.num_layers)
    per_unit = 3 if getattr(model_cfg, "mlp", "gelu") == "swiglu" else 2  # matrices of d x width
    if not is_moe(model_cfg):
        return float(per_unit * d * ffn), 0
    pattern = moe_layer_pattern(model_cfg)
    expert = int(model_cfg.moe_ffn_hidden_size or ffn)
    shared = int(model_cfg.moe_shared_expert_size or 0)
    moe = per_unit * d * (int(model_cfg.moe_topk) * expert + shared) + d * int(model_cfg.num_experts)
    n_moe = sum(pattern)
    return (n_moe * moe + (layers - n_moe) * per_unit * d * ffn) / layers, n_moe
