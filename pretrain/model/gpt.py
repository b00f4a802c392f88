"""The GPT decoder as a megatron-core ``GPTModel``: the only module that knows megatron's model API.

Pre-norm decoder blocks. The classic shape is GPT-1/GPT-2's (learned absolute positions,
LayerNorm, GELU MLP, biases, tied embeddings); the modern options are megatron-core's own
implementations, selected by its ``TransformerConfig`` (``model.*`` keys, conf/groups.py):
rotary positions, RMSNorm, SwiGLU, grouped-query attention, QK-norm, no biases, untied
output layer. Parallelism reaches the model only through megatron-core: its
``TransformerConfig`` (the engine fills in tp, pp and sequence parallelism) and
``parallel_state`` (which pipeline stage this chunk is).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from conf.errors import UserError
from conf.groups import ModelConfig
from pretrain.model.layers import (
    BatchFirstEmbedding,
    BatchFirstRotaryEmbedding,
    LocalColumnParallelLinear,
    LocalMLP,
    LocalRowParallelLinear,
    SDPAttention,
    norm_class,
    use_local_rotary,
)
from pretrain.model.moe import active_mlp_params, moe_fields, use_seeded_experts


def padded_vocab_size(vocab_size: int, model_cfg: ModelConfig) -> int:
    """Pad the tokenizer's vocabulary; independent of tp so checkpoints reshard."""
    multiple = int(model_cfg.vocab_multiple)
    return int(math.ceil(vocab_size / multiple) * multiple)


# ``model.recompute``: megatron-core's activation recomputation. selective: the core attention
# (softmax(QK^T)V, the activations that grow with seq^2); full: every layer's input is kept and the
# whole layer recomputed in backward (one layer per unit).
RECOMPUTE: dict[str, dict[str, Any]] = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def architecture(model_cfg: ModelConfig) -> dict[str, Any]:
    """The ``model`` group's architecture options as megatron-core ``TransformerConfig`` fields.

    Keys absent from an older checkpoint's config mean the classic GPT-2 shape."""
    mlp = str(model_cfg.mlp)
    groups = model_cfg.num_query_groups
    return {
        "normalization": "RMSNorm" if model_cfg.norm == "rmsnorm" else "LayerNorm",
        "gated_linear_unit": mlp == "swiglu",
        "activation_func": F.silu if mlp == "swiglu" else F.gelu,
        "num_query_groups": int(groups) if groups else None,
        "add_bias_linear": bool(model_cfg.bias),
        "qk_layernorm": bool(model_cfg.qk_norm),
        **RECOMPUTE[str(model_cfg.recompute)],
    }


def transformer_config(model_cfg: ModelConfig, **layout: Any) -> TransformerConfig:
    """megatron-core's config from the ``model`` group; ``layout`` (tp, pp, sequence parallelism,
    dtypes) comes from the engine (``parallel.engine.layout_config``); without it, one process."""
    if model_cfg.hidden_size % model_cfg.num_heads:
        raise UserError(
            f"model.hidden_size={model_cfg.hidden_size} is not divisible by model.num_heads={model_cfg.num_heads}"
        )
    return TransformerConfig(
        num_layers=int(model_cfg.num_layers),
        hidden_size=int(model_cfg.hidden_size),
        num_attention_heads=int(model_cfg.num_heads),
        ffn_hidden_size=int(model_cfg.ffn_hidden_size),
        hidden_dropout=float(model_cfg.dropout),
        attention_dropout=float(model_cfg.dropout),
        init_method_std=float(model_cfg.init_std),
        layernorm_epsilon=float(model_cfg.layernorm_eps),
        **architecture(model_cfg),
        **moe_fields(model_cfg),
        # the same full-weight init at every tp and device: a tp=2 run starts where a tp=1 run does
        use_cpu_initialization=True,
        **layout,
        # fusions that need CUDA kernels or Apex
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        persist_layer_norm=False,
    )


class GPT(GPTModel):
    """megatron-core's ``GPTModel`` with a fused cross-entropy at tp = 1, batch-first when it can.

    megatron's vocab-parallel cross-entropy does three all-reduces over the tp group and
    ~10 elementwise passes over the logits even when the group has one rank (a visible share of a
    ``model=tiny`` CPU step); ``F.cross_entropy`` is the same loss in one fused kernel.

    megatron lays activations out [s, b, h] because sequence parallelism splits dim 0 and
    pipeline stages exchange [s, b, h] buffers. Without either (tp = pp = 1) and with
    :class:`SDPAttention` as the core attention, nothing needs that layout: ``batch_first``
    keeps the embeddings [b, s, h], so q/k/v reach SDPA as views with contiguous rows and
    the transposes (and their backward copies) disappear. Layers, norms and MLPs act on the
    last dimension and do not care. Outputs are the same in both layouts: loss [b, s],
    logits [b, s, vocab].
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        attentions = [m for m in self.modules() if isinstance(m, DotProductAttention)]
        self.batch_first = (
            cfg.tensor_model_parallel_size == 1
            and cfg.pipeline_model_parallel_size == 1
            and cfg.context_parallel_size == 1
            and not cfg.sequence_parallel
            and bool(attentions)
            and all(isinstance(m, SDPAttention) for m in attentions)
            and cfg.num_moe_experts is None  # megatron's MoE layer reads [s, b] (sequence-level aux loss)
        )
        if self.batch_first:
            for m in attentions:
                m.batch_first = True
            if self.pre_process:
                self.embedding.__class__ = BatchFirstEmbedding
            if self.position_embedding_type == "rope":
                self.rotary_pos_emb.__class__ = BatchFirstRotaryEmbedding
        for m in self.modules():
            if type(m) is MLP and isinstance(m.linear_fc1, LocalColumnParallelLinear):
                m.__class__ = LocalMLP  # (after construction: megatron passes tp_group only to MLP itself)
        if self.post_process and isinstance(self.output_layer, tensor_parallel.ColumnParallelLinear):
            self.output_layer.__class__ = LocalColumnParallelLinear  # F.linear at tp = 1
            self.output_layer._set_fused(cfg)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:
        output = super().forward(input_ids, position_ids, attention_mask, **kwargs)
        if self.batch_first and kwargs.get("labels") is None and self.post_process:
            return output.transpose(0, 1)  # megatron returned [b, s, V] "transposed" to [s, b, V]
        return output

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.batch_first:  # logits [b, s, vocab]
            b, s, vocab = logits.shape
            return F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1), reduction="none").view(b, s)
        if self.config.tensor_model_parallel_size > 1:
            return super().compute_language_model_loss(labels, logits)
        s, b, vocab = logits.shape  # labels: [b, s]
        flat = labels.transpose(0, 1).reshape(-1)
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), flat, reduction="none")
        return loss.view(s, b).transpose(0, 1).contiguous()


class SeededTransformerLayer(TransformerLayer):
    """A transformer layer whose initial weights depend only on (seed, global layer number).

    megatron-core draws initial weights from the default generator in build order, so a
    pipeline stage that starts at layer 3 would get other weights than a single process
    does. Reseeding per global layer (with ``use_cpu_initialization``, which also makes
    tp-sharded weights slices of the same full matrix) gives every (tp, pp, vpp) layout
    the same initial model for a seed.
    """

    def __init__(
        self, config: TransformerConfig, submodules: Any, layer_number: int = 1, *, init_seed: int, **kwargs: Any
    ) -> None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"), pp_rank)
        torch.manual_seed(init_seed + 1000 * (layer_number + offset))
        super().__init__(config, submodules, layer_number, **kwargs)


def transformer_engine_usable() -> bool:
    """Transformer Engine needs CUDA and the ``transformer_engine`` package."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _layer_spec(
    config: TransformerConfig, spec: str, attention: str, num_experts: int | None = None
) -> tuple[ModuleSpec, Any]:
    """(layer spec, final norm class) for ``model.spec`` = auto | te | local; with ``num_experts``
    a MoE layer (megatron-core's MoE spec, experts seeded per global index: ``pretrain/model/moe.py``).

    ``te``: megatron-core's Transformer Engine spec (fused LayerNorm+linear, TE's fused
    attention). ``local``: the local spec with :class:`LayerNorm` and, for
    ``attention=sdpa``, :class:`SDPAttention`. ``auto`` takes TE where it is usable (CUDA
    with transformer_engine installed), else local. Both specs save the same checkpoint
    keys (megatron maps the local norms onto TE's fused names), so a checkpoint moves
    between them.
    """
    if spec == "auto":
        spec = "te" if transformer_engine_usable() else "local"
    if spec == "te":
        if not transformer_engine_usable():
            raise UserError("model.spec=te needs CUDA and the transformer_engine package; use model.spec=local")
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer = get_gpt_layer_with_transformer_engine_spec(num_experts, False, qk_layernorm=config.qk_layernorm)
        if num_experts is not None:
            use_seeded_experts(layer)
        return layer, TENorm
    if spec != "local":
        raise UserError(f"model.spec={spec}: expected auto, te or local")
    layer: ModuleSpec = get_gpt_layer_local_spec(num_experts, False, qk_layernorm=config.qk_layernorm)
    norm = norm_class(config)
    if attention == "sdpa":
        layer.submodules.self_attention.submodules.core_attention = SDPAttention
    elif attention != "megatron":
        raise UserError(f"model.attention={attention}: expected sdpa or megatron")
    layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = norm
    attention, mlp = layer.submodules.self_attention.submodules, layer.submodules.mlp.submodules
    if config.qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = norm
    attention.linear_qkv, attention.linear_proj = LocalColumnParallelLinear, LocalRowParallelLinear
    if num_experts is not None:
        use_seeded_experts(layer, LocalColumnParallelLinear, LocalRowParallelLinear)
    else:
        mlp.linear_fc1, mlp.linear_fc2 = LocalColumnParallelLinear, LocalRowParallelLinear
    use_local_rotary()
    return layer, norm


def decoder_spec(
    config: TransformerConfig, seed: int, vp_stage: int | None = None, attention: str = "sdpa", spec: str = "local"
) -> TransformerBlockSubmodules:
    """The layer specs of :func:`_layer_spec` for this stage, seeded per global layer number; MoE
    and dense layers as ``config.moe_layer_freq`` interleaves them (megatron-core's reading)."""
    layer, final_norm = _layer_spec(config, spec, attention)
    kinds = [layer]
    if config.num_moe_experts is not None:
        kinds.append(_layer_spec(config, spec, attention, config.num_moe_experts)[0])
    for kind in kinds:
        kind.module = SeededTransformerLayer
        kind.params = {**kind.params, "init_seed": seed}
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    pattern = config.moe_layer_freq if config.num_moe_experts is not None else [0] * config.num_layers
    offset = get_transformer_layer_offset(config, vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[kinds[k] for k in pattern[offset : offset + count]], layer_norm=final_norm
    )


def build_gpt(
    model_cfg: ModelConfig, vocab_size: int, config: TransformerConfig, vp_stage: int | None = None, seed: int = 1234
) -> GPTModel:
    """One GPT (or this rank's pipeline stage of it) with the local megatron spec.

    Initial weights are a function of ``seed`` only, not of the parallel layout.
    """
    if parallel_state.model_parallel_is_initialized():
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    else:
        pre = post = True
    torch.manual_seed(seed)  # embeddings (first stage)
    model = GPT(
        config=config,
        transformer_layer_spec=decoder_spec(config, seed, vp_stage, str(model_cfg.attention), str(model_cfg.spec)),
        vocab_size=padded_vocab_size(vocab_size, model_cfg),
        max_sequence_length=int(model_cfg.seq_len),
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=bool(model_cfg.tie_embeddings),
        position_embedding_type="rope" if model_cfg.position == "rope" else "learned_absolute",
        rotary_base=float(model_cfg.rope_theta),
        vp_stage=vp_stage,
    )
    # leave the default generator (dropout) independent of how many layers this stage built
    pp_rank = parallel_state.get_pipeline_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    torch.manual_seed(seed + 100 * pp_rank + 7)
    return model


def position_ids(batch: int, seq_len: int) -> torch.Tensor:
    return torch.arange(seq_len).repeat(batch, 1)  # contiguous: embedding lookups of an expand() are slow on CPU


def flops_per_token(model_cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (N = non-embedding matmul params + output layer; a MoE layer's
    active ones) plus attention scores and values (6·layers·seq·d, PaLM appendix B convention)."""
    d, layers = int(model_cfg.hidden_size), int(model_cfg.num_layers)
    heads = int(model_cfg.num_heads)
    kv = d // heads * int(model_cfg.num_query_groups or heads)  # key and value widths
    mlp = active_mlp_params(model_cfg)[0]  # a MoE layer: the experts a token is routed to
    matmul_params = layers * (2 * d * d + 2 * d * kv + mlp) + d * padded_vocab_size(vocab_size, model_cfg)
    return 6.0 * matmul_params + 6.0 * layers * seq_len * d
