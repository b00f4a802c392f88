"""The GPT decoder as a megatron-core ``GPTModel``: the only module that knows megatron's model API.

Pre-LN decoder blocks with learned absolute positions and tied input/output
embeddings (GPT-1/GPT-2). Parallelism reaches the model only through megatron-core:
its ``TransformerConfig`` (the engine fills in tp, pp and sequence parallelism) and
``parallel_state`` (which pipeline stage this chunk is).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from omegaconf import DictConfig

from conf.errors import UserError


def padded_vocab_size(vocab_size: int, model_cfg: DictConfig) -> int:
    """Pad the tokenizer's vocabulary; independent of tp so checkpoints reshard."""
    multiple = int(model_cfg.vocab_multiple)
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_config(model_cfg: DictConfig, **layout: Any) -> TransformerConfig:
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


class LayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm that also works with sequence parallelism.

    megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism (its fused norms
    need Apex/TE). With SP each TP rank normalises its own slice of the sequence, so
    the weight/bias gradients are partial sums; tagging the parameters
    ``sequence_parallel`` makes megatron's ``finalize_model_grads`` all-reduce them over TP.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


class SDPAttention(DotProductAttention):
    """megatron-core's core attention computed by ``torch.nn.functional.scaled_dot_product_attention``.

    megatron's local ``DotProductAttention`` materialises scores with baddbmm, masks, softmaxes
    and multiplies in separate kernels; SDPA fuses them (flash / memory-efficient kernels on
    GPU, a fused kernel on CPU). Same inputs ([s, b, heads, head_dim] per TP partition), same
    output ([s, b, hidden per partition]), same dropout RNG handling, so TP/SP/PP are unchanged.
    """

    batch_first = False  # set by :class:`GPT` when the whole model runs [b, s, h]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences and attention bias are not supported")
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
        if self.batch_first:  # [b, s, heads, head_dim]: views with nanoGPT's strides, no copies
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        else:  # [s, b, heads, head_dim]: positions b·heads·d apart are slow for SDPA on CPU; copy
            q, k, v = (t.permute(1, 2, 0, 3).contiguous() for t in (query, key, value))  # [b, heads, s, head_dim]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        mask = None if attention_mask is None else ~attention_mask  # megatron: True = masked out
        dropout = self.config.attention_dropout if self.training else 0.0
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout and not self.config.sequence_parallel
            else (contextlib.nullcontext())
        )
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale
            )
        s, b = context.shape[2], context.shape[0]
        if self.batch_first:
            return context.transpose(1, 2).reshape(b, s, self.hidden_size_per_partition)
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)


class _FusedBiasAtTp1:
    """At tp = 1 (no sequence parallelism) a megatron linear is just a linear layer: compute it
    with ``F.linear`` (one ``addmm``, bias fused, torch's own autograd) instead of megatron's
    custom autograd function plus a separate bias add -- and a deferred ``skip_bias_add`` bias
    too, returning ``None`` as the bias: megatron's MLP and bias-dropout-add accept that, and
    dropout(x + b) + residual is the same either way. Above tp = 1 megatron's path runs.
    """

    def _set_fused(self, config: TransformerConfig) -> None:
        self.fused_tp1 = config.tensor_model_parallel_size == 1 and not config.sequence_parallel


class LocalColumnParallelLinear(_FusedBiasAtTp1, tensor_parallel.ColumnParallelLinear):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._set_fused(kwargs["config"])

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: Any = None):  # noqa: ANN201
        if self.fused_tp1:
            return F.linear(input_, self.weight if weight is None else weight, self.bias), None
        return super().forward(input_, weight, runtime_gather_output)


class LocalRowParallelLinear(_FusedBiasAtTp1, tensor_parallel.RowParallelLinear):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._set_fused(kwargs["config"])

    def forward(self, input_: torch.Tensor):  # noqa: ANN201
        if self.fused_tp1:
            return F.linear(input_, self.weight, self.bias), None
        return super().forward(input_)


class BatchFirstEmbedding(LanguageModelEmbedding):
    """Word + position embeddings left in [b, s, h] (megatron transposes to [s, b, h] here)."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tokentype_ids: Any = None) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if self.config.fp32_residual_connection:
            embeddings = embeddings.float()
        return self.embedding_dropout(embeddings)


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
        )
        if self.batch_first:
            for m in attentions:
                m.batch_first = True
            self.embedding.__class__ = BatchFirstEmbedding
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


def _layer_spec(spec: str, attention: str) -> tuple[ModuleSpec, Any]:
    """(layer spec, final norm class) for ``model.spec`` = auto | te | local.

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

        return get_gpt_layer_with_transformer_engine_spec(), TENorm
    if spec != "local":
        raise UserError(f"model.spec={spec}: expected auto, te or local")
    layer: ModuleSpec = get_gpt_layer_local_spec()
    if attention == "sdpa":
        layer.submodules.self_attention.submodules.core_attention = SDPAttention
    elif attention != "megatron":
        raise UserError(f"model.attention={attention}: expected sdpa or megatron")
    layer.submodules.input_layernorm = LayerNorm
    layer.submodules.pre_mlp_layernorm = LayerNorm
    attention, mlp = layer.submodules.self_attention.submodules, layer.submodules.mlp.submodules
    attention.linear_qkv, attention.linear_proj = LocalColumnParallelLinear, LocalRowParallelLinear
    mlp.linear_fc1, mlp.linear_fc2 = LocalColumnParallelLinear, LocalRowParallelLinear
    return layer, LayerNorm


def decoder_spec(
    config: TransformerConfig, seed: int, vp_stage: int | None = None, attention: str = "sdpa", spec: str = "local"
) -> TransformerBlockSubmodules:
    """The layer spec of :func:`_layer_spec` with layers seeded per global layer number."""
    layer, final_norm = _layer_spec(spec, attention)
    layer.module = SeededTransformerLayer
    layer.params = {**layer.params, "init_seed": seed}
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=final_norm)


def build_gpt(
    model_cfg: DictConfig, vocab_size: int, config: TransformerConfig, vp_stage: int | None = None, seed: int = 1234
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
        transformer_layer_spec=decoder_spec(
            config, seed, vp_stage, str(model_cfg.get("attention", "sdpa")), str(model_cfg.get("spec", "auto"))
        ),
        vocab_size=padded_vocab_size(vocab_size, model_cfg),
        max_sequence_length=int(model_cfg.seq_len),
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=bool(model_cfg.tie_embeddings),
        position_embedding_type="learned_absolute",
        vp_stage=vp_stage,
    )
    # leave the default generator (dropout) independent of how many layers this stage built
    pp_rank = parallel_state.get_pipeline_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    torch.manual_seed(seed + 100 * pp_rank + 7)
    return model


def position_ids(batch: int, seq_len: int) -> torch.Tensor:
    return torch.arange(seq_len).repeat(batch, 1)  # contiguous: embedding lookups of an expand() are slow on CPU


def flops_per_token(model_cfg: DictConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (N = non-embedding matmul params + output layer) plus
    attention scores and values (6·layers·seq·d, PaLM appendix B convention)."""
    d, layers = int(model_cfg.hidden_size), int(model_cfg.num_layers)
    ffn = int(model_cfg.ffn_hidden_size)
    matmul_params = layers * (4 * d * d + 2 * d * ffn) + d * padded_vocab_size(vocab_size, model_cfg)
    return 6.0 * matmul_params + 6.0 * layers * seq_len * d
