"""The layers the local (CPU) spec swaps into megatron-core's GPT: norms that work with sequence
parallelism, SDPA as the core attention, ``F.linear`` at tp = 1, and batch-first embeddings.

Each keeps megatron-core's interface and parameter names, so checkpoints move between this spec
and Transformer Engine's.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer import attention as megatron_attention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP


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


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm, tagged for sequence parallelism like :class:`LayerNorm` (no bias)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


def norm_class(config: TransformerConfig) -> type[torch.nn.Module]:
    """The local norm for ``config.normalization`` (megatron-core's own names)."""
    return RMSNorm if config.normalization == "RMSNorm" else LayerNorm


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
        # GQA: SDPA's own enable_gqa on CPU (no copies of k/v); elsewhere repeat the groups, as
        # the flash kernels' GQA support is not verified here
        gqa = groups > 1 and query.device.type == "cpu"
        if groups > 1 and not gqa:
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
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa
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


class LocalMLP(MLP):
    """megatron-core's MLP; at tp = 1 a SwiGLU is two ``F.linear`` over the halves of fc1's weight.

    megatron's unfused gated path computes fc1 as one [.., 2f] output and chunks it, so the
    backward concatenates the two halves' gradients (a full copy per layer); views of the
    weight give the same function without it. A MoE expert (``per_token_scale``: each token's
    routing weight, applied to the activation as megatron does) keeps one fc1 matmul (its few rows
    make the operator count, not the copy, the cost) and skips only megatron's Python around it,
    when it has no fc2 bias (megatron would add that bias scaled too). Anything else runs
    megatron's forward.
    """

    def forward(self, hidden_states: torch.Tensor, per_token_scale: Any = None, **kwargs: Any):  # noqa: ANN201
        c, fc1 = self.config, self.linear_fc1
        plain_swiglu = (
            (per_token_scale is None or self.linear_fc2.bias is None)
            and c.gated_linear_unit
            and c.activation_func is F.silu
            and not c.use_te_activation_func
            and not c.bias_activation_fusion
            and c.activation_func_clamp_value is None
            and c.glu_linear_offset == 0
            and getattr(fc1, "fused_tp1", False)
        )
        if not plain_swiglu:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        if per_token_scale is not None:
            # an expert sees a few rows: one fc1 matmul and a chunk of its output (megatron's own
            # order of operations) costs fewer operators than two half-width matmuls and their backward
            gate, up = F.linear(hidden_states, fc1.weight, fc1.bias).chunk(2, dim=-1)
            h = F.silu(gate) * up
            return self.linear_fc2((h * per_token_scale.unsqueeze(-1)).to(h.dtype))
        w_gate, w_up = fc1.weight.chunk(2, dim=0)
        b_gate, b_up = fc1.bias.chunk(2) if fc1.bias is not None else (None, None)
        h = F.silu(F.linear(hidden_states, w_gate, b_gate)) * F.linear(hidden_states, w_up, b_up)
        return self.linear_fc2(h)


_megatron_apply_rotary = megatron_attention.apply_rotary_pos_emb
_rotary_cache: list[Any] = [None, None, None, None]  # freqs, dtype, cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    t: torch.Tensor,
    freqs: torch.Tensor,
    config: TransformerConfig,
    cu_seqlens: torch.Tensor | None = None,
    mscale: float = 1.0,
    cp_group: Any = None,
) -> torch.Tensor:
    """megatron-core's unfused RoPE (rotate-half, full rotary dim) with cos/sin computed once per forward.

    megatron's version recomputes cos and sin of the same frequencies for q and k of every
    layer and concatenates an empty pass-through slice (a full copy, forward and backward).
    Every other case (fusion, packed sequences, interleaved, partial rotary dim, mscale, MLA)
    goes to megatron's own function.
    """
    if (
        cu_seqlens is not None
        or config.apply_rope_fusion
        or config.rotary_interleaved
        or config.multi_latent_attention
        or mscale != 1.0
        or freqs.shape[-1] != t.shape[-1]
    ):
        return _megatron_apply_rotary(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
    cache = _rotary_cache
    if cache[0] is not freqs or cache[1] != t.dtype:  # one frequency tensor reaches every layer
        cache[:] = [freqs, t.dtype, freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)]
    return t * cache[2] + _rotate_half(t) * cache[3]


apply_rotary_pos_emb.__wrapped__ = _megatron_apply_rotary  # type: ignore[attr-defined]  # for cpu_compat/targets.py


def use_local_rotary() -> None:
    """Route megatron's attention to :func:`apply_rotary_pos_emb` (it calls the module-level name)."""
    megatron_attention.apply_rotary_pos_emb = apply_rotary_pos_emb


class BatchFirstEmbedding(LanguageModelEmbedding):
    """Word (+ learned position) embeddings left in [b, s, h] (megatron transposes to [s, b, h] here)."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tokentype_ids: Any = None) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids)
        if self.add_position_embedding:
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.config.fp32_residual_connection:
            embeddings = embeddings.float()
        return self.embedding_dropout(embeddings)


class BatchFirstRotaryEmbedding(RotaryEmbedding):
    """megatron-core's rotary embedding for [b, s, h] activations: the sequence length is dim 1 and
    the frequencies [s, 1, 1, d] are returned as [1, s, 1, d], so they broadcast over q/k laid out
    [b, s, heads, d] in megatron's own ``apply_rotary_pos_emb``."""

    def get_rotary_seq_len(
        self,
        inference_context: Any,
        transformer: Any,
        transformer_input: torch.Tensor,
        transformer_config: TransformerConfig,
        packed_seq_params: Any = None,
        **kwargs: Any,
    ) -> int:
        if inference_context is not None or packed_seq_params is not None:
            return super().get_rotary_seq_len(
                inference_context, transformer, transformer_input, transformer_config, packed_seq_params, **kwargs
            )
        return transformer_input.size(1)

    def forward(
        self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group: Any = None
    ) -> torch.Tensor:
        return super().forward(max_seq_len, offset, packed_seq, cp_group).transpose(0, 1)
