"""The parameters of one model chunk from the config's shapes alone: names, shapes and order as
megatron-core's ``GPTModel`` (local spec, pretrain/model/gpt.py) builds them on one tensor-parallel rank.

The planner must never build a model (a 175B plan runs on a laptop), so the shapes are derived here
from the same rules megatron-core applies: embeddings on the first pipeline stage (first virtual
chunk), the final norm and output layer on the last (an output weight there only when it is untied,
or tied across stages), row-parallel biases replicated over tp, column-parallel ones split.
``tests/unit/test_plan_memory.py`` keeps the listing equal to a built model's ``named_parameters``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from conf.groups import ModelConfig
from conf.moe import moe_layer_pattern

GPT2_VOCAB = 50257  # the vocabulary assumed when neither the caller nor a data manifest gives one


def padded_vocab(vocab_size: int, model: ModelConfig) -> int:
    """pretrain/model/gpt.py ``padded_vocab_size``: padded to ``model.vocab_multiple`` (tp-independent)."""
    multiple = int(model.vocab_multiple)
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass(frozen=True)
class Shape:
    """The dimensions the parameter and activation counts need, read once from ``model.*``."""

    layers: int
    hidden: int
    heads: int
    groups: int  # key/value heads
    head_dim: int
    ffn: int
    seq_len: int  # positions of the learned position embedding
    vocab: int  # padded
    gated: bool  # SwiGLU: fc1 produces 2 x ffn
    bias: bool
    layernorm: bool  # LayerNorm (weight + bias) or RMSNorm (weight)
    qk_norm: bool
    learned_positions: bool
    tied: bool
    # Mixture-of-Experts (model.num_experts): 0 experts = dense
    experts: int = 0
    topk: int = 0
    moe_ffn: int = 0  # one expert's width
    shared_ffn: int = 0  # the shared expert's width (0: none)
    moe_pattern: tuple[int, ...] = ()  # 1 for each MoE layer

    def is_moe(self, layer: int) -> bool:
        """Whether global layer ``layer`` (0-based) is a MoE layer."""
        return bool(self.moe_pattern) and bool(self.moe_pattern[layer])

    @classmethod
    def from_config(cls, model: ModelConfig, vocab_size: int) -> Shape:
        heads = int(model.num_heads)
        return cls(
            layers=int(model.num_layers),
            hidden=int(model.hidden_size),
            heads=heads,
            groups=int(model.num_query_groups or heads),
            head_dim=int(model.hidden_size) // heads,
            ffn=int(model.ffn_hidden_size),
            seq_len=int(model.seq_len),
            vocab=padded_vocab(vocab_size, model),
            gated=str(model.mlp) == "swiglu",
            bias=bool(model.bias),
            layernorm=str(model.norm) != "rmsnorm",
            qk_norm=bool(model.qk_norm),
            learned_positions=str(model.position) != "rope",
            tied=bool(model.tie_embeddings),
            **_moe_shape(model),
        )


def _moe_shape(model: ModelConfig) -> dict[str, object]:
    """Shape's MoE fields of ``model`` (a config saved before MoE existed is dense)."""
    experts = getattr(model, "num_experts", None)
    if experts is None:
        return {}
    return {
        "experts": int(experts),
        "topk": int(model.moe_topk),
        "moe_ffn": int(model.moe_ffn_hidden_size or model.ffn_hidden_size),
        "shared_ffn": int(model.moe_shared_expert_size or 0),
        "moe_pattern": tuple(moe_layer_pattern(model)),
    }


Params = list[tuple[str, tuple[int, ...]]]  # (name as in named_parameters, shape on this tp rank)


def _norm(prefix: str, width: int, shape: Shape) -> Params:
    out: Params = [(f"{prefix}.weight", (width,))]
    return out + [(f"{prefix}.bias", (width,))] if shape.layernorm else out


def moe_params(shape: Shape, tp: int, prefix: str, ep: int = 1) -> Params:
    """A MoE layer's router, this ep rank's experts (split over tp like an MLP: expert tp = tp) and
    the shared expert, in megatron-core's module order (biases: refused with MoE)."""
    units = 2 if shape.gated else 1
    out: Params = [(f"{prefix}.router.weight", (shape.experts, shape.hidden))]
    for e in range(shape.experts // ep):
        expert = f"{prefix}.experts.local_experts.{e}"
        out.append((f"{expert}.linear_fc1.weight", (units * shape.moe_ffn // tp, shape.hidden)))
        out.append((f"{expert}.linear_fc2.weight", (shape.hidden, shape.moe_ffn // tp)))
    if shape.shared_ffn:
        out.append((f"{prefix}.shared_experts.linear_fc1.weight", (units * shape.shared_ffn // tp, shape.hidden)))
        out.append((f"{prefix}.shared_experts.linear_fc2.weight", (shape.hidden, shape.shared_ffn // tp)))
    return out


def is_expert(name: str) -> bool:
    """An expert's parameter: reduced over the expert-data-parallel group when ep > 1."""
    return ".experts.local_experts." in name


def layer_params(shape: Shape, tp: int, index: int = 0, ep: int = 1, layer: int | None = None) -> Params:
    """One transformer layer on one tp rank, in megatron-core's module order; ``index`` names it
    within its chunk, ``layer`` (default: ``index``) is its global number (0-based: MoE or dense)."""
    h, d = shape.hidden, shape.head_dim
    qkv = (shape.heads + 2 * shape.groups) * d // tp
    fc1 = (2 if shape.gated else 1) * shape.ffn // tp
    p = f"decoder.layers.{index}"
    out = _norm(f"{p}.input_layernorm", h, shape)
    out.append((f"{p}.self_attention.linear_proj.weight", (h, shape.heads * d // tp)))
    if shape.bias:
        out.append((f"{p}.self_attention.linear_proj.bias", (h,)))  # row-parallel: replicated over tp
    out.append((f"{p}.self_attention.linear_qkv.weight", (qkv, h)))
    if shape.bias:
        out.append((f"{p}.self_attention.linear_qkv.bias", (qkv,)))
    if shape.qk_norm:
        out += _norm(f"{p}.self_attention.q_layernorm", d, shape) + _norm(f"{p}.self_attention.k_layernorm", d, shape)
    out += _norm(f"{p}.pre_mlp_layernorm", h, shape)
    if shape.is_moe(index if layer is None else layer):
        return out + moe_params(shape, tp, f"{p}.mlp", ep)
    out.append((f"{p}.mlp.linear_fc1.weight", (fc1, h)))
    if shape.bias:
        out.append((f"{p}.mlp.linear_fc1.bias", (fc1,)))
    out.append((f"{p}.mlp.linear_fc2.weight", (h, shape.ffn // tp)))
    if shape.bias:
        out.append((f"{p}.mlp.linear_fc2.bias", (h,)))
    return out


@dataclass(frozen=True)
class Chunk:
    """One model chunk (a pipeline stage, or one virtual stage of it) on one tp rank."""

    pp_rank: int
    vp_stage: int
    layers: int
    pre_process: bool  # holds the embeddings
    post_process: bool  # holds the final norm, output layer and loss
    params: Params
    moe_layers: int = 0  # of ``layers``, the MoE ones

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.params)


def chunk_params(shape: Shape, tp: int, pre: bool, post: bool, layers: int, ep: int = 1, offset: int = 0) -> Params:
    """``named_parameters`` of one chunk: embeddings, its layers (global numbers from ``offset``),
    final norm, output layer."""
    h, v = shape.hidden, shape.vocab
    out: Params = []
    if pre:
        out.append(("embedding.word_embeddings.weight", (v // tp, h)))
        if shape.learned_positions:
            out.append(("embedding.position_embeddings.weight", (shape.seq_len, h)))
    for i in range(layers):
        out += layer_params(shape, tp, i, ep, offset + i)
    if post:
        out += _norm("decoder.final_layernorm", h, shape)
        # tied at one stage: the output layer multiplies by the embedding itself (no weight of its own);
        # tied across stages: the last stage keeps a copy, all-reduced with the first stage's grads
        if not (shape.tied and pre):
            out.append(("output_layer.weight", (v // tp, h)))
    return out


def chunks(shape: Shape, tp: int, pp: int, vpp: int, ep: int = 1) -> list[list[Chunk]]:
    """Every pipeline stage's chunks (``[pp_rank][vp_stage]``), layers split evenly as the
    topology requires (``num_layers`` divisible by pp * vpp), megatron-core's interleaving: chunk
    ``vp`` of stage ``rank`` holds layers from ``vp * layers / vpp + rank * per_chunk``; experts
    split over ``ep``."""
    per_chunk = shape.layers // (pp * vpp)
    stages = []
    for rank in range(pp):
        row = []
        for vp in range(vpp):
            pre, post = rank == 0 and vp == 0, rank == pp - 1 and vp == vpp - 1
            offset = vp * (shape.layers // vpp) + rank * per_chunk
            params = chunk_params(shape, tp, pre, post, per_chunk, ep, offset)
            moe = sum(shape.is_moe(offset + i) for i in range(per_chunk))
            row.append(Chunk(rank, vp, per_chunk, pre, post, params, moe))
        stages.append(row)
    return stages


def total_params(shape: Shape) -> int:
    """The whole model's parameter count (one process, no tensor parallelism)."""
    return sum(c.numel for c in chunks(shape, 1, 1, 1)[0])
