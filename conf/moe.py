"""Checks of the Mixture-of-Experts keys (``model.num_experts``, ``model.moe_*``, ``parallel.ep``).

Each combination megatron-core would reject with an assertion deep inside a layer (or accept and
compute something else than asked) is refused here in one line naming the key, before any work.
The checks that need the world size (ep divides dp, experts split evenly) are in
``parallel/expert_layout.py``.
"""

from __future__ import annotations

from typing import Any

from conf.errors import UserError

SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")
DROP_POLICIES = ("probs", "position")
ROUTER_DTYPES = ("fp32", "fp64", "model")
DISPATCHERS = ("auto", "alltoall", "allgather")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key}={value}: expected {' or '.join(choices)}")


def moe_layer_pattern(model: Any) -> list[int]:
    """1 for each MoE layer, 0 for each dense one (megatron-core's reading of ``moe_layer_freq``):
    an int N makes layers 0, N, 2N, ... MoE; a list gives one 0/1 per layer."""
    freq, layers = model.moe_layer_freq, int(model.num_layers)
    if isinstance(freq, bool) or not isinstance(freq, int):
        pattern = list(freq) if not isinstance(freq, str) else None
        if pattern is None or len(pattern) != layers or any(v not in (0, 1) or isinstance(v, bool) for v in pattern):
            raise UserError(
                f"model.moe_layer_freq={freq}: expected an integer >= 1 or a list of {layers} zeros and ones "
                "(1 = MoE layer), one per layer"
            )
        return [int(v) for v in pattern]
    if freq < 1:
        raise UserError(f"model.moe_layer_freq={freq}: must be >= 1 (1: every layer is MoE)")
    return [1 if i % freq == 0 else 0 for i in range(layers)]


def check_moe(model: Any) -> None:
    """The ``model.moe_*`` keys of a MoE model (``model.num_experts`` set)."""
    experts, topk = int(model.num_experts), int(model.moe_topk)
    if experts < 1:
        raise UserError(f"model.num_experts={experts}: must be >= 1 (or null: a dense model)")
    if not 1 <= topk <= experts:
        raise UserError(f"model.moe_topk={topk}: must be in [1, model.num_experts={experts}]")
    for key in ("moe_ffn_hidden_size", "moe_shared_expert_size"):
        value = getattr(model, key)
        if value is not None and value < 1:
            raise UserError(f"model.{key}={value}: must be >= 1 (or null)")
    if not any(moe_layer_pattern(model)):
        raise UserError(f"model.moe_layer_freq={model.moe_layer_freq}: no layer is a MoE layer")
    _one_of("model.moe_score_function", model.moe_score_function, SCORE_FUNCTIONS)
    _one_of("model.moe_load_balancing", model.moe_load_balancing, LOAD_BALANCING)
    _one_of("model.moe_drop_policy", model.moe_drop_policy, DROP_POLICIES)
    _one_of("model.moe_router_dtype", model.moe_router_dtype, ROUTER_DTYPES)
    for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        if getattr(model, key) < 0:
            raise UserError(f"model.{key}={getattr(model, key):g}: must be >= 0")
    if model.moe_expert_bias_rate <= 0:
        raise UserError(f"model.moe_expert_bias_rate={model.moe_expert_bias_rate:g}: must be > 0")
    if model.moe_capacity_factor is not None and model.moe_capacity_factor <= 0:
        raise UserError(f"model.moe_capacity_factor={model.moe_capacity_factor:g}: must be > 0 (or null: dropless)")
    sigmoid = model.moe_score_function == "sigmoid"
    if model.moe_expert_bias and not sigmoid:
        raise UserError("model.moe_expert_bias=true needs model.moe_score_function=sigmoid (megatron-core's rule)")
    if topk == 1 and not sigmoid and model.moe_norm_topk_prob:
        raise UserError(
            "model.moe_topk=1 with model.moe_norm_topk_prob=true: a softmax over one expert is 1 and the router "
            "gets no gradient; set model.moe_norm_topk_prob=false"
        )
    if topk > 1 and sigmoid and not model.moe_norm_topk_prob:
        raise UserError(
            "model.moe_score_function=sigmoid renormalises the top-k weights: set model.moe_norm_topk_prob=true"
        )
    if model.bias:
        raise UserError(
            "model.num_experts with model.bias=true: MoE models here have no linear biases; set model.bias=false"
        )


def check_moe_parallel(par: Any) -> None:
    """``parallel.ep`` and ``parallel.moe_dispatcher`` alone (their fit to the world: parallel/expert_layout.py)."""
    if par.ep < 1:
        raise UserError(f"parallel.ep={par.ep}: must be >= 1")
    _one_of("parallel.moe_dispatcher", par.moe_dispatcher, DISPATCHERS)
