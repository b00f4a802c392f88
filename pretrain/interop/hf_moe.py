"""The Mixture-of-Experts part of the transformers mapping (``hf_weights.py`` holds the rest).

A MoE model here is the modern decoder (Llama's or Qwen3's attention and norms) whose MLPs are
megatron-core MoE layers, and two transformers classes express some of them exactly:

| ours (``model.*``) | transformers |
|---|---|
| qk_norm, MoE and dense layers in any order, top-k renormalised or not | ``Qwen3MoeForCausalLM`` |
| no qk_norm, every layer MoE, top-k renormalised | ``MixtralForCausalLM`` |

(Qwen3-MoE's ``mlp_only_layers`` name the dense layers, ``norm_topk_prob`` the renormalisation.)

Both route with a softmax router without bias and run every token through its experts at
inference (dropless), with no shared expert: a sigmoid router, the expert bias, a capacity factor
or shared experts change what the model computes at inference and are refused in one line. The
training-only terms (load-balancing and z-loss weights) are not part of the function: the
load-balancing weight travels as ``router_aux_loss_coef``. ``OlmoeForCausalLM`` normalises q and
k over all heads at once (ours, per head) and is refused.

Layouts: megatron keeps expert ``e`` of a layer as ``experts.local_experts.<e>.linear_fc1`` (rows
``[gate; up]``) and ``linear_fc2``; transformers 5 holds a layer's experts as two 3-D parameters
(``experts.gate_up_proj`` [E, 2f, d] with the same ``[gate; up]`` rows, ``experts.down_proj``
[E, d, f]) and saves them per expert (Qwen3-MoE: ``experts.<e>.{gate,up,down}_proj``, Mixtral:
``block_sparse_moe.experts.<e>.{w1,w3,w2}``), the names checkpoints on the Hub carry. Export fills
the in-memory parameters; import reads the saved names (or the 3-D ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from conf.errors import UserError
from conf.moe import moe_layer_pattern

if TYPE_CHECKING:
    import torch

QWEN3_MOE, MIXTRAL = "qwen3_moe", "mixtral"
MOE_CLASSES = {QWEN3_MOE: "Qwen3MoeForCausalLM", MIXTRAL: "MixtralForCausalLM"}


def _get(m: Any, key: str, default: Any = None) -> Any:  # noqa: ANN401
    """A ``model`` key of a config group (attributes) or of gpt-import's overrides (a mapping)."""
    return m.get(key, default) if isinstance(m, Mapping) else getattr(m, key, default)


def is_moe_model(m: Any) -> bool:  # noqa: ANN401
    return _get(m, "num_experts") is not None


def moe_architecture(m: Any) -> str:  # noqa: ANN401
    """``qwen3_moe`` or ``mixtral`` for a MoE ``model`` group (the modern shape already checked);
    anything no transformers class computes is a one-line UserError."""
    refuse = {
        "model.moe_score_function=sigmoid": _get(m, "moe_score_function", "softmax") != "softmax",
        "model.moe_expert_bias=true": bool(_get(m, "moe_expert_bias", False)),
        f"model.moe_capacity_factor={_get(m, 'moe_capacity_factor')}": _get(m, "moe_capacity_factor") is not None,
        f"model.moe_shared_expert_size={_get(m, 'moe_shared_expert_size')}": bool(_get(m, "moe_shared_expert_size")),
    }
    for what, bad in refuse.items():
        if bad:
            raise UserError(
                f"{what}: transformers' MoE classes route with a softmax, dropless, without shared experts; "
                "refusing to export"
            )
    if bool(_get(m, "bias", True)):
        raise UserError("model.bias=true: transformers' MoE classes have no linear biases; refusing to export")
    if bool(_get(m, "qk_norm", False)):
        return QWEN3_MOE
    if not all(moe_layer_pattern(_Keys(m))):
        raise UserError(
            f"model.moe_layer_freq={_get(m, 'moe_layer_freq')} without model.qk_norm: Mixtral has no dense layers "
            "(Qwen3-MoE, with QK-norm, has); refusing to export"
        )
    if not bool(_get(m, "moe_norm_topk_prob", True)):
        raise UserError(
            "model.moe_norm_topk_prob=false without model.qk_norm: Mixtral renormalises the top-k weights "
            "(Qwen3-MoE, with QK-norm, may not); refusing to export"
        )
    return MIXTRAL


class _Keys:
    """Attribute view of a mapping (``moe_layer_pattern`` reads attributes)."""

    def __init__(self, m: Any) -> None:  # noqa: ANN401
        self.m = m

    def __getattr__(self, key: str) -> Any:  # noqa: ANN401
        return _get(self.m, key)


def pattern(m: Any) -> list[int]:  # noqa: ANN401
    """1 for each MoE layer (dense models: none)."""
    return moe_layer_pattern(_Keys(m)) if is_moe_model(m) else [0] * int(_get(m, "num_layers"))


def moe_hf_config(arch: str, m: Any, modern: dict[str, Any]) -> Any:  # noqa: ANN401
    """The transformers config of a MoE ``model`` group (``modern``: the Llama/Qwen3 keys)."""
    experts, topk = int(_get(m, "num_experts")), int(_get(m, "moe_topk"))
    width = int(_get(m, "moe_ffn_hidden_size") or _get(m, "ffn_hidden_size"))
    routing = {"num_experts_per_tok": topk, "router_aux_loss_coef": float(_get(m, "moe_aux_loss_coeff"))}
    if arch == MIXTRAL:
        from transformers import MixtralConfig

        dense = {**modern, "intermediate_size": width}
        dense.pop("attention_bias")
        return MixtralConfig(
            num_local_experts=experts, router_jitter_noise=0.0, sliding_window=None, **dense, **routing
        )
    from transformers import Qwen3MoeConfig

    dense_layers = [i for i, moe in enumerate(pattern(m)) if not moe]
    return Qwen3MoeConfig(
        num_experts=experts,
        moe_intermediate_size=width,
        decoder_sparse_step=1,
        mlp_only_layers=dense_layers,
        norm_topk_prob=bool(_get(m, "moe_norm_topk_prob", True)),
        use_sliding_window=False,
        **modern,
        **routing,
    )


def mlp_prefix(arch: str) -> str:
    """Where a layer's MoE block lives in the saved weights."""
    return "block_sparse_moe." if arch == MIXTRAL else "mlp."


def moe_to_hf(sd: Mapping[str, torch.Tensor], src: str, dst: str, experts: int) -> dict[str, torch.Tensor]:
    """One MoE layer's router and experts, ours (``src`` = ``decoder.layers.<i>.``) → transformers'
    in-memory parameters (``dst`` = ``model.layers.<i>.``)."""
    import torch

    local = [f"{src}mlp.experts.local_experts.{e}." for e in range(experts)]
    return {
        dst + "mlp.gate.weight": sd[src + "mlp.router.weight"],
        dst + "mlp.experts.gate_up_proj": torch.stack([sd[p + "linear_fc1.weight"] for p in local]),
        dst + "mlp.experts.down_proj": torch.stack([sd[p + "linear_fc2.weight"] for p in local]),
    }


def _saved_names(arch: str, i: int, e: int) -> tuple[str, str, str]:
    """(gate, up, down) of expert ``e`` of layer ``i`` as checkpoints save them (without ``model.``)."""
    if arch == MIXTRAL:
        base = f"layers.{i}.block_sparse_moe.experts.{e}."
        return base + "w1.weight", base + "w3.weight", base + "w2.weight"
    base = f"layers.{i}.mlp.experts.{e}."
    return base + "gate_proj.weight", base + "up_proj.weight", base + "down_proj.weight"


def moe_from_hf(
    get: Callable[[str], torch.Tensor], has: Callable[[str], bool], arch: str, i: int, experts: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """One MoE layer, transformers' (saved per expert, or 3-D) → ours: (our name, tensor)."""
    import torch

    fused = not has(_saved_names(arch, i, 0)[0]) and has(f"layers.{i}.mlp.experts.gate_up_proj")
    dst, block = f"decoder.layers.{i}.mlp.", f"layers.{i}.{'mlp.' if fused else mlp_prefix(arch)}"
    yield dst + "router.weight", get(block + "gate.weight")
    if fused:
        gate_up, down = get(f"layers.{i}.mlp.experts.gate_up_proj"), get(f"layers.{i}.mlp.experts.down_proj")
    for e in range(experts):
        ours = f"{dst}experts.local_experts.{e}."
        if fused:
            yield ours + "linear_fc1.weight", gate_up[e]
            yield ours + "linear_fc2.weight", down[e]
            continue
        gate, up, down_e = (get(name) for name in _saved_names(arch, i, e))
        yield ours + "linear_fc1.weight", torch.cat([gate, up])  # [gate; up]
        yield ours + "linear_fc2.weight", down_e


def moe_shapes(arch: str, i: int, experts: int, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    """The saved shape of every tensor of MoE layer ``i`` (nn.Linear: [out, in])."""
    out = {f"layers.{i}.{mlp_prefix(arch)}gate.weight": (experts, hidden)}
    for e in range(experts):
        gate, up, down = _saved_names(arch, i, e)
        out |= {gate: (width, hidden), up: (width, hidden), down: (hidden, width)}
    return out


def moe_overrides(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model.*`` MoE keys of a Qwen3-MoE or Mixtral config.json (one line where it is something else)."""
    kind = str(hf.get("model_type"))
    layers = int(hf["num_hidden_layers"])
    if kind == MIXTRAL:
        experts, width = int(hf.get("num_local_experts", 8)), int(hf["intermediate_size"])
        layer_freq: Any = 1
        norm_topk = True
    else:
        experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)) or 0)
        width = int(hf["moe_intermediate_size"])
        step, dense = int(hf.get("decoder_sparse_step", 1)), set(hf.get("mlp_only_layers") or [])
        moe = [int(i not in dense and experts > 0 and (i + 1) % step == 0) for i in range(layers)]
        if not any(moe):
            raise UserError("qwen3_moe without MoE layers (num_experts, mlp_only_layers): import it as qwen3")
        layer_freq = 1 if all(moe) else moe
        norm_topk = bool(hf.get("norm_topk_prob", False))
    topk = int(hf.get("num_experts_per_tok", 2))
    if not 1 <= topk <= experts:
        raise UserError(f"num_experts_per_tok={topk} with {experts} experts; refusing to import")
    return {
        "num_experts": experts,
        "moe_topk": topk,
        "moe_ffn_hidden_size": width,
        "moe_layer_freq": layer_freq,
        "moe_norm_topk_prob": norm_topk,
        "moe_aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.01)),
    }
