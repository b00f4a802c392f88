"""The weight mapping between this project's megatron-core GPT and transformers' GPT-2, Llama, Qwen3 (and MoE).

Why a mapping and not a conversion library: every architecture option of ``model.*`` is
megatron-core's own implementation, and each of the three transformers architectures is one
fixed combination of them, so export and import are pure re-layouts of the same numbers:

| ours (``model.*``) | transformers |
|---|---|
| learned, layernorm, gelu, MHA, bias (tied or not) | ``GPT2LMHeadModel`` |
| rope, rmsnorm, swiglu, any query groups, bias or not, tied or not | ``LlamaForCausalLM`` |
| the same with ``qk_norm`` and no bias | ``Qwen3ForCausalLM`` |
| MoE (``num_experts``), with ``qk_norm`` / without | ``Qwen3MoeForCausalLM`` / ``MixtralForCausalLM`` (hf_moe.py) |

Any other combination (rope with LayerNorm, learned positions with RMSNorm, grouped-query
attention in GPT-2, ...) has no transformers equivalent and is refused in one line rather
than approximated. Two layouts differ: megatron-core fuses q, k and v into one
``linear_qkv`` whose rows are grouped per query group (``[q of the group's heads, k, v]``
for each of the groups) and SwiGLU's gate and up projections into one ``linear_fc1``
(``[gate; up]``); GPT-2's ``Conv1D`` stores weights transposed. megatron's RoPE is
non-interleaved (rotate-half), as transformers' Llama: no permutation of q/k rows is needed
(the logits tests check it).

``hf`` configs here are config.json dicts (what ``from_pretrained`` reads), so importing
needs neither a transformers model nor transformers at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from conf.errors import UserError
from pretrain.interop import hf_moe
from pretrain.interop.hf_moe import MIXTRAL, MOE_CLASSES, QWEN3_MOE, pattern

if TYPE_CHECKING:  # torch only where tensors are moved: gpt-import refuses a config.json before importing it
    import torch

GPT2, LLAMA, QWEN3 = "gpt2", "llama", "qwen3"
CLASSES = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM", QWEN3: "Qwen3ForCausalLM", **MOE_CLASSES}
QK_NORM = (QWEN3, QWEN3_MOE)  # architectures with per-head q/k norms
# (key, GPT-2's value, Llama's value): the classic and the modern shape
SHAPES = (("position", "learned", "rope"), ("norm", "layernorm", "rmsnorm"), ("mlp", "gelu", "swiglu"))
# buffers some checkpoints carry beside the weights (GPT-2's causal mask, old Llama's inverse frequencies)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
Weights = dict[str, "torch.Tensor"]


def hf_architecture(model_cfg: Mapping[str, Any]) -> str:
    """``gpt2``, ``llama`` or ``qwen3`` for a ``model`` group; anything else is a one-line UserError."""
    get = model_cfg.get
    values = {key: str(get(key, classic)) for key, classic, _ in SHAPES}
    heads, groups = int(model_cfg["num_heads"]), get("num_query_groups")
    qk_norm, bias = bool(get("qk_norm", False)), bool(get("bias", True))
    if all(values[key] == classic for key, classic, _ in SHAPES):
        if groups not in (None, heads):
            raise UserError(f"model.num_query_groups={groups}: GPT-2 has no grouped-query attention; refusing")
        if not bias:
            raise UserError("model.bias=false: GPT-2 always has biases; refusing to export")
        if qk_norm:
            raise UserError("model.qk_norm=true: GPT-2 has no QK-norm; refusing to export")
        return GPT2
    if all(values[key] == modern for key, _, modern in SHAPES):
        if hf_moe.is_moe_model(model_cfg):  # Qwen3-MoE or Mixtral (pretrain/interop/hf_moe.py)
            return hf_moe.moe_architecture(model_cfg)
        if not qk_norm:
            return LLAMA
        if bias:
            raise UserError("model.qk_norm=true with model.bias=true: Qwen3 (QK-norm) has no MLP biases; refusing")
        return QWEN3
    mixed = ", ".join(f"model.{key}={value}" for key, value in values.items())
    raise UserError(
        f"{mixed}: no transformers architecture has this combination (GPT-2: learned, layernorm, gelu; "
        "Llama: rope, rmsnorm, swiglu); refusing to export"
    )


def hf_config(model_cfg: Mapping[str, Any], vocab_size: int, eot_id: int) -> tuple[str, Any]:
    """(architecture, transformers config) of a ``model`` group with ``vocab_size`` embedding rows."""
    arch = hf_architecture(model_cfg)
    m = model_cfg
    heads, hidden, tied = int(m["num_heads"]), int(m["hidden_size"]), bool(m.get("tie_embeddings", True))
    common = {"vocab_size": vocab_size, "bos_token_id": eot_id, "eos_token_id": eot_id, "tie_word_embeddings": tied}
    if arch == GPT2:
        from transformers import GPT2Config

        return arch, GPT2Config(
            n_positions=int(m["seq_len"]),
            n_embd=hidden,
            n_layer=int(m["num_layers"]),
            n_head=heads,
            n_inner=int(m["ffn_hidden_size"]),
            activation_function="gelu",  # exact (erf), as ours; not GPT-2's tanh "gelu_new"
            layer_norm_epsilon=float(m["layernorm_eps"]),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    modern = {
        "hidden_size": hidden,
        "intermediate_size": int(m["ffn_hidden_size"]),
        "num_hidden_layers": int(m["num_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m.get("num_query_groups") or heads),
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(m["seq_len"]),
        "rms_norm_eps": float(m["layernorm_eps"]),
        "rope_theta": float(m.get("rope_theta", 10000.0)),
        "attention_bias": bool(m.get("bias", True)),
        "attention_dropout": 0.0,
        **common,
    }
    if arch in MOE_CLASSES:
        return arch, hf_moe.moe_hf_config(arch, m, modern)
    if arch == LLAMA:
        from transformers import LlamaConfig

        return arch, LlamaConfig(mlp_bias=bool(m.get("bias", True)), **modern)
    from transformers import Qwen3Config

    return arch, Qwen3Config(use_sliding_window=False, **modern)


def _split_qkv(w: torch.Tensor, groups: int, per_group: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """megatron's fused rows ``[q x per_group, k, v]`` per group (a weight [rows, in] or a bias [rows])."""
    rest = w.shape[1:]
    grouped = w.reshape(groups, per_group + 2, head_dim, *rest)
    q = grouped[:, :per_group].reshape(groups * per_group * head_dim, *rest)
    return q, grouped[:, per_group].reshape(-1, *rest), grouped[:, per_group + 1].reshape(-1, *rest)


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    import torch

    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, head_dim, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _dims(m: Mapping[str, Any]) -> tuple[int, int, int, int]:
    heads, hidden = int(m["num_heads"]), int(m["hidden_size"])
    groups = int(m.get("num_query_groups") or heads)
    return heads, groups, heads // groups, hidden // heads


def to_hf(sd: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any], vocab: int) -> Weights:
    """Our full (tp = pp = 1) state dict → the transformers architecture's, ``vocab`` embedding rows kept."""
    import torch

    arch = hf_architecture(model_cfg)
    m = model_cfg
    _, groups, per_group, head_dim = _dims(m)
    tied, bias, ffn = bool(m.get("tie_embeddings", True)), bool(m.get("bias", True)), int(m["ffn_hidden_size"])
    out: Weights = {}
    moe_layers = pattern(m)
    if arch == GPT2:
        out["transformer.wte.weight"] = sd["embedding.word_embeddings.weight"][:vocab]
        out["transformer.wpe.weight"] = sd["embedding.position_embeddings.weight"]
        out["transformer.ln_f.weight"] = sd["decoder.final_layernorm.weight"]
        out["transformer.ln_f.bias"] = sd["decoder.final_layernorm.bias"]
    else:
        out["model.embed_tokens.weight"] = sd["embedding.word_embeddings.weight"][:vocab]
        out["model.norm.weight"] = sd["decoder.final_layernorm.weight"]
    if not tied:
        out["lm_head.weight"] = sd["output_layer.weight"][:vocab]
    for i in range(int(m["num_layers"])):
        src = f"decoder.layers.{i}."
        if arch == GPT2:
            dst = f"transformer.h.{i}."
            qkv = [
                _split_qkv(sd[src + f"self_attention.linear_qkv.{p}"], groups, per_group, head_dim)
                for p in ("weight", "bias")
            ]
            out[dst + "attn.c_attn.weight"] = torch.cat(qkv[0]).t()  # Conv1D: [in, out]
            out[dst + "attn.c_attn.bias"] = torch.cat(qkv[1])
            for theirs, ours in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
                for p in ("weight", "bias"):
                    out[dst + f"{theirs}.{p}"] = sd[src + f"{ours}.{p}"]
            for theirs, ours in (
                ("attn.c_proj", "self_attention.linear_proj"),
                ("mlp.c_fc", "mlp.linear_fc1"),
                ("mlp.c_proj", "mlp.linear_fc2"),
            ):
                out[dst + theirs + ".weight"] = sd[src + ours + ".weight"].t()
                out[dst + theirs + ".bias"] = sd[src + ours + ".bias"]
            continue
        dst, attn = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "pre_mlp_layernorm.weight"]
        if arch in QK_NORM:
            out[attn + "q_norm.weight"] = sd[src + "self_attention.q_layernorm.weight"]
            out[attn + "k_norm.weight"] = sd[src + "self_attention.k_layernorm.weight"]
        for p in ("weight", "bias") if bias else ("weight",):
            q, k, v = _split_qkv(sd[src + f"self_attention.linear_qkv.{p}"], groups, per_group, head_dim)
            out |= {attn + f"q_proj.{p}": q, attn + f"k_proj.{p}": k, attn + f"v_proj.{p}": v}
            out[attn + f"o_proj.{p}"] = sd[src + f"self_attention.linear_proj.{p}"]
            if moe_layers[i]:
                out |= hf_moe.moe_to_hf(sd, src, dst, int(m["num_experts"]))
                continue
            gate, up = sd[src + f"mlp.linear_fc1.{p}"].split(ffn)  # [gate; up]: silu acts on the first half
            out[dst + f"mlp.gate_proj.{p}"], out[dst + f"mlp.up_proj.{p}"] = gate, up
            out[dst + f"mlp.down_proj.{p}"] = sd[src + f"mlp.linear_fc2.{p}"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def architecture_of(overrides: Mapping[str, Any]) -> str:
    """The transformers architecture of gpt-import's ``model.*`` overrides (a mapping they came from)."""
    if overrides["position"] == "learned":
        return GPT2
    if overrides.get("num_experts") is not None:
        return QWEN3_MOE if overrides["qk_norm"] else MIXTRAL
    return QWEN3 if overrides["qk_norm"] else LLAMA


def _rope(hf: Mapping[str, Any]) -> float:
    """rope_theta of a Llama/Qwen3 config.json (transformers 4's ``rope_theta``/``rope_scaling`` or 5's
    ``rope_parameters``); scaled or partial rotary embeddings have no megatron-core equivalent here."""
    params, scaling = dict(hf.get("rope_parameters") or {}), dict(hf.get("rope_scaling") or {})
    kinds = {params.get("rope_type", "default"), scaling.get("rope_type", scaling.get("type", "default"))}
    if kinds != {"default"}:
        shown = scaling or params
        raise UserError(f"rope_scaling={shown}: scaled RoPE is not supported (only the default); refusing to import")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        raise UserError(f"partial_rotary_factor={partial}: partial rotary embeddings are not supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_overrides(hf: Mapping[str, Any], approximate_gelu: bool = False) -> dict[str, Any]:
    """The ``model.*`` keys of a transformers config.json (GPT-2, Llama or Qwen3), refused in one line
    where it is something else. ``seq_len`` is the model's maximum; ``name``, the context actually used
    and ``vocab_multiple`` are gpt-import's to choose."""
    kind = str(hf.get("model_type", ""))
    if kind == GPT2:
        act = str(hf.get("activation_function", "gelu_new"))
        if act != "gelu" and not (approximate_gelu and act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")):
            raise UserError(
                f"activation_function={act}: this project's GELU is exact (erf); pass approximate_gelu=true "
                "to import tanh-approximated GELU as exact GELU (logits then differ slightly)"
            )
        for key, ok in (
            ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False),
            ("scale_attn_weights", True),
        ):
            if bool(hf.get(key, ok)) != ok:
                raise UserError(f"{key}={hf.get(key)}: only {key}={str(ok).lower()} is supported; refusing to import")
        hidden = int(hf["n_embd"])
        return {
            "num_layers": int(hf["n_layer"]),
            "num_heads": int(hf["n_head"]),
            "hidden_size": hidden,
            "ffn_hidden_size": int(hf.get("n_inner") or 4 * hidden),
            "seq_len": int(hf["n_positions"]),  # learned positions: at most this
            "position": "learned",
            "norm": "layernorm",
            "mlp": "gelu",
            "num_query_groups": None,
            "qk_norm": False,
            "bias": True,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
            "layernorm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        }
    if kind not in (LLAMA, QWEN3, *MOE_CLASSES):
        raise UserError(
            f"model_type={kind or '?'}: gpt-import reads transformers' gpt2, llama, qwen3, qwen3_moe and mixtral models"
        )
    if str(hf.get("hidden_act", "silu")) != "silu":
        raise UserError(f"hidden_act={hf['hidden_act']}: only SwiGLU (silu) is supported; refusing to import")
    if hf.get("sliding_window") is not None and (kind in (LLAMA, MIXTRAL) or hf.get("use_sliding_window")):
        raise UserError(f"sliding_window={hf['sliding_window']}: sliding-window attention is not supported")
    heads, hidden = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    if hf.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise UserError(f"head_dim={hf.get('head_dim')}: only hidden_size / num_attention_heads is supported")
    bias = bool(hf.get("attention_bias", False))
    if kind == LLAMA and bool(hf.get("mlp_bias", False)) != bias:
        raise UserError(f"attention_bias={bias} with mlp_bias={hf.get('mlp_bias')}: model.bias is one switch")
    if kind in QK_NORM and bias:
        raise UserError(f"attention_bias=true in {kind}: biases in attention only are not supported")
    groups = int(hf.get("num_key_value_heads") or heads)
    moe = hf_moe.moe_overrides(hf) if kind in MOE_CLASSES else {}
    return {
        "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": heads,
        "hidden_size": hidden,
        "ffn_hidden_size": int(hf["intermediate_size"]),
        "seq_len": int(hf.get("max_position_embeddings", 2048)),
        "position": "rope",
        "rope_theta": _rope(hf),
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "num_query_groups": None if groups == heads else groups,
        "qk_norm": kind in QK_NORM,
        "bias": bias,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "layernorm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        **moe,
    }


class _Source:
    """Reads a transformers state dict by name, with or without the base-model prefix, and records what it read."""

    def __init__(self, hf_sd: Mapping[str, torch.Tensor], prefix: str) -> None:
        self.hf_sd, self.prefix, self.used = hf_sd, prefix, set()

    def has(self, name: str) -> bool:
        return any(key in self.hf_sd for key in (self.prefix + name, name))

    def __call__(self, name: str) -> torch.Tensor:
        for key in (self.prefix + name, name):
            if key in self.hf_sd:
                self.used.add(key)
                return self.hf_sd[key]
        raise UserError(f"{self.prefix}{name}: missing from the model's weights; refusing to import")


def iter_from_hf(
    hf_sd: Mapping[str, torch.Tensor], overrides: Mapping[str, Any], seq_len: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) for every parameter of our model, one at a time (``hf_sd`` may load lazily:
    an importer then holds one layer beside the model). Weights the mapping did not read are refused."""
    import torch

    m = overrides
    arch = architecture_of(m)
    heads, groups, per_group, head_dim = _dims(m)
    get = _Source(hf_sd, "transformer." if arch == GPT2 else "model.")
    moe_layers = pattern(m)
    if arch == GPT2:
        yield "embedding.word_embeddings.weight", get("wte.weight")
        yield "embedding.position_embeddings.weight", get("wpe.weight")[:seq_len]
    else:
        yield "embedding.word_embeddings.weight", get("embed_tokens.weight")
    for i in range(int(m["num_layers"])):
        dst = f"decoder.layers.{i}."
        if arch == GPT2:
            src = f"h.{i}."
            for p in ("weight", "bias"):
                yield dst + f"input_layernorm.{p}", get(src + f"ln_1.{p}")
                yield dst + f"pre_mlp_layernorm.{p}", get(src + f"ln_2.{p}")
            w, b = get(src + "attn.c_attn.weight").t(), get(src + "attn.c_attn.bias")
            yield dst + "self_attention.linear_qkv.weight", _fuse_qkv(*w.chunk(3), groups, head_dim)
            yield dst + "self_attention.linear_qkv.bias", _fuse_qkv(*b.chunk(3), groups, head_dim)
            for theirs, ours in (
                ("attn.c_proj", "self_attention.linear_proj"),
                ("mlp.c_fc", "mlp.linear_fc1"),
                ("mlp.c_proj", "mlp.linear_fc2"),
            ):
                yield dst + ours + ".weight", get(src + theirs + ".weight").t()
                yield dst + ours + ".bias", get(src + theirs + ".bias")
            continue
        src, attn = f"layers.{i}.", f"layers.{i}.self_attn."
        yield dst + "input_layernorm.weight", get(src + "input_layernorm.weight")
        yield dst + "pre_mlp_layernorm.weight", get(src + "post_attention_layernorm.weight")
        if arch in QK_NORM:
            yield dst + "self_attention.q_layernorm.weight", get(attn + "q_norm.weight")
            yield dst + "self_attention.k_layernorm.weight", get(attn + "k_norm.weight")
        for p in ("weight", "bias") if m["bias"] else ("weight",):
            qkv = [get(attn + f"{x}_proj.{p}") for x in "qkv"]
            yield dst + f"self_attention.linear_qkv.{p}", _fuse_qkv(*qkv, groups, head_dim)
            yield dst + f"self_attention.linear_proj.{p}", get(attn + f"o_proj.{p}")
            if moe_layers[i]:
                yield from hf_moe.moe_from_hf(get, get.has, arch, i, int(m["num_experts"]))
                continue
            gate_up = [get(src + f"mlp.{x}_proj.{p}") for x in ("gate", "up")]
            yield dst + f"mlp.linear_fc1.{p}", torch.cat(gate_up)  # [gate; up]
            yield dst + f"mlp.linear_fc2.{p}", get(src + f"mlp.down_proj.{p}")
    yield "decoder.final_layernorm.weight", get("ln_f.weight" if arch == GPT2 else "norm.weight")
    if arch == GPT2:
        yield "decoder.final_layernorm.bias", get("ln_f.bias")
    if not m["tie_embeddings"]:
        yield "output_layer.weight", get("lm_head.weight")
    refuse_unknown(hf_sd, get.used, m)


def refuse_unknown(names: Iterable[str], used: set[str], overrides: Mapping[str, Any]) -> None:
    """One line naming the weights the mapping did not read (they would be dropped silently)."""
    unused = sorted(k for k in names if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if overrides["tie_embeddings"]:
        unused = [k for k in unused if k != "lm_head.weight"]  # a tied copy some checkpoints keep
    if unused:
        arch = architecture_of(overrides)
        more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
        raise UserError(f"{unused[0]}{more}: weights this {arch} mapping does not know; refusing to import")


def expected_shapes(overrides: Mapping[str, Any], vocab: int) -> dict[str, tuple[int, ...]]:
    """The shape config.json implies for every tensor :func:`iter_from_hf` reads, by the name it asks
    for (without the base-model prefix). gpt-import checks them against the safetensors headers
    before reading a byte: a wrong tensor is then named with both shapes, not a failed reshape."""
    m = overrides
    heads, groups, _, head_dim = _dims(m)
    hidden, ffn, q_rows, kv_rows = int(m["hidden_size"]), int(m["ffn_hidden_size"]), heads * head_dim, groups * head_dim
    if m["position"] == "learned":
        out = {"wte.weight": (vocab, hidden), "wpe.weight": (int(m["seq_len"]), hidden)}
        out |= {"ln_f.weight": (hidden,), "ln_f.bias": (hidden,)}
        # Conv1D weights are [in, out]
        linears = {"attn.c_attn": (hidden, 3 * hidden), "attn.c_proj": (hidden, hidden)}
        linears |= {"mlp.c_fc": (hidden, ffn), "mlp.c_proj": (ffn, hidden)}
        layer = {f"{n}.{p}": (hidden,) for n in ("ln_1", "ln_2") for p in ("weight", "bias")}
        layer |= {f"{n}.weight": shape for n, shape in linears.items()}
        layer |= {f"{n}.bias": shape[1:] for n, shape in linears.items()}
        prefix = "h"
    else:
        out = {"embed_tokens.weight": (vocab, hidden), "norm.weight": (hidden,)}
        # nn.Linear weights are [out, in]
        linears = {"self_attn.q_proj": (q_rows, hidden), "self_attn.k_proj": (kv_rows, hidden)}
        linears |= {"self_attn.v_proj": (kv_rows, hidden), "self_attn.o_proj": (hidden, q_rows)}
        linears |= {"mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn)}
        layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}
        if m["qk_norm"]:
            layer |= {"self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,)}
        layer |= {f"{n}.weight": shape for n, shape in linears.items()}
        if m["bias"]:
            layer |= {f"{n}.bias": shape[:1] for n, shape in linears.items()}
        prefix = "layers"
    arch, moe_layers = architecture_of(m), pattern(m)
    for i in range(int(m["num_layers"])):
        if moe_layers[i]:  # the router and experts in place of the MLP
            width = int(m.get("moe_ffn_hidden_size") or ffn)
            out |= {f"{prefix}.{i}.{n}": shape for n, shape in layer.items() if not n.startswith("mlp.")}
            out |= hf_moe.moe_shapes(arch, i, int(m["num_experts"]), hidden, width)
            continue
        out |= {f"{prefix}.{i}.{name}": shape for name, shape in layer.items()}
    if not m["tie_embeddings"]:
        out["lm_head.weight"] = (vocab, hidden)
    return out


def from_hf(
    hf_sd: Mapping[str, torch.Tensor], hf: Mapping[str, Any], approximate_gelu: bool = False
) -> tuple[dict[str, Any], Weights]:
    """(``model.*`` overrides, our full state dict) of a transformers GPT-2 / Llama / Qwen3 model."""
    overrides = model_overrides(hf, approximate_gelu)
    return overrides, {k: v.contiguous() for k, v in iter_from_hf(hf_sd, overrides, int(overrides["seq_len"]))}
