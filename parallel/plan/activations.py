"""Bytes saved for backward per micro-batch, per layer and per pipeline stage, for this
implementation's local (CPU) spec: torch norms, SDPA core attention, megatron-core's linear layers.

Counted the way ``benchmarks/plan_census.py`` measures them (``saved_tensors_hooks``, one count per
storage): each tensor below is one that autograd keeps until backward. The GPU / Transformer Engine
path saves differently (fused LayerNorm+linear keeps the norm's input, not its output; flash
attention keeps q, k, v, the output and the softmax statistics, never the scores); for it
:func:`korthikanti` gives Korthikanti et al. 2022's per-layer formula without the softmax term,
which is what the planner uses for ``model.spec=te``. Only the local spec is measurable here.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.plan.params import Shape


@dataclass(frozen=True)
class Micro:
    """One rank's view of a micro-batch: sequence, rows, and how the layer is laid out."""

    seq: int
    rows: int
    tp: int
    sp: bool
    dtype_bytes: int  # activations are in the parameters' dtype (bf16 or fp32)
    batch_first: bool  # tp = pp = 1 with SDPA: [b, s, h], no permute copies (pretrain/model/gpt.py)
    attention: str = "sdpa"  # sdpa | megatron (unfused: scores and softmax saved)

    @property
    def tokens(self) -> int:
        return self.seq * self.rows

    @property
    def local_tokens(self) -> int:
        """Tokens of the residual stream on this rank: 1/tp of them with sequence parallelism."""
        return self.tokens // self.tp if self.sp else self.tokens


def _norm(shape: Shape, m: Micro) -> int:
    """A norm's saved tensors: LayerNorm keeps its input and mean / rstd (in the activations'
    dtype); torch's RMSNorm computes in fp32 and keeps the fp32 input, the fp32 normalised
    input and rstd."""
    n, h = m.local_tokens, shape.hidden
    if shape.layernorm:
        return n * h * m.dtype_bytes + 2 * n * m.dtype_bytes
    return 2 * n * h * 4 + n * 4


def _attention(shape: Shape, m: Micro, recompute: str) -> dict[str, int]:
    """Core attention and what feeds it. SDPA on CPU keeps q, k, v, its output and the fp32
    logsumexp; grouped k / v stay at their group count (SDPA's ``enable_gqa``). Batch-first
    (tp = pp = 1) q, k, v are views of the qkv projection (or of the rotary outputs) and the
    output feeds ``linear_proj`` as a view; seq-first they are contiguous copies, and so is the
    output."""
    e, t, tokens = m.dtype_bytes, m.tp, m.tokens
    heads, q_width, kv_width = shape.heads // t, shape.heads // t * shape.head_dim, shape.groups // t * shape.head_dim
    qkv = tokens * (q_width + 2 * kv_width) * e
    rotated = tokens * (q_width + kv_width) * e if not shape.learned_positions else 0
    lse = tokens * heads * 4
    context = tokens * q_width * e
    items: dict[str, int] = {}
    if m.attention == "megatron":  # unfused: scores, softmax, then context
        items["attention_inputs"] = qkv + rotated
        items["scores_softmax"] = 2 * m.rows * heads * m.seq * m.seq * e
        items["proj_input"] = context
        return items
    if recompute == "selective":  # the checkpointed core attention keeps its inputs only
        items["core_attention_inputs"] = qkv + rotated  # q, k, v: views of qkv (q, k: of the rotary outputs)
        items["proj_input"] = context
        return items
    if m.batch_first:
        items["qkv"] = qkv  # SDPA's views of it (v's, with rotary positions)
        if rotated:
            items["rotary_outputs"] = rotated
        items["sdpa_out"] = context + lse  # also linear_proj's input (a view)
    else:
        items["sdpa_inputs"] = qkv  # [b, heads, s, d] copies
        items["sdpa_out"] = context + lse
        items["proj_input"] = context  # [s, b, h] copy
    return items


def _mlp(shape: Shape, m: Micro) -> int:
    """GELU keeps fc1's output and its own; SwiGLU at tp = 1 (pretrain/model/layers.py ``LocalMLP``)
    the gate and up outputs, silu's and the product; megatron's SwiGLU above tp = 1 also the
    whole fc1 output and ``x_linear + offset``."""
    return _glu_factor(shape, m) * m.tokens * shape.ffn // m.tp * m.dtype_bytes


def _glu_factor(shape: Shape, m: Micro) -> int:
    """Saved FFN-wide tensors per token of an MLP (:func:`_mlp`'s rule: LocalMLP's two linears at tp = 1)."""
    if not shape.gated:
        return 2
    return 4 if m.tp == 1 and not m.sp else 5


def _moe(shape: Shape, m: Micro) -> dict[str, int]:
    """megatron-core's MoE layer (router, token dispatch, ``SequentialMLP`` experts, shared expert),
    calibrated on moe-tiny's census (within 1% at tp = 1). The router keeps its input and fp32
    scores; every token goes to ``topk`` experts, so the dispatched copies, each expert's SwiGLU /
    GELU (megatron's path: probabilities applied inside) and the outputs weighted at the combine
    count ``topk`` times the tokens. With tensor parallelism the dispatcher gathers the sequence
    shards, each rank computing 1/tp of every expert's width; expert parallelism moves tokens
    between ranks, ``topk`` copies per token on average per rank."""
    n, h, e, k = m.local_tokens, shape.hidden, m.dtype_bytes, shape.topk
    routed = m.tokens * k
    width = m.tokens * k * shape.moe_ffn // m.tp * e
    items = {
        "router": n * h * e + 3 * n * shape.experts * 4 + n * k * 8,
        "dispatched": routed * h * e + 2 * routed * 8,
        "experts": _glu_factor(shape, m) * width,
        "combine": routed * h * e + routed * 4,
    }
    if shape.shared_ffn:  # its input is the router's (one storage); megatron's MLP path
        items["shared_expert"] = _glu_factor(shape, m) * m.tokens * shape.shared_ffn // m.tp * e
    return items


def layer(shape: Shape, m: Micro, recompute: str = "none", moe: bool = False) -> dict[str, int]:
    """Saved bytes of one transformer layer for one micro-batch, itemised (``moe``: a MoE layer)."""
    n, h, e = m.local_tokens, shape.hidden, m.dtype_bytes
    if recompute == "full":  # only the layer's input survives the forward
        return {"layer_input": n * h * e}
    items = {"input_norm": _norm(shape, m), "qkv_input": n * h * e}  # megatron keeps the SP shard
    items.update(_attention(shape, m, recompute))
    items["mlp_norm"] = _norm(shape, m)
    items.update(_moe(shape, m) if moe else {"fc1_input": n * h * e, "mlp": _mlp(shape, m)})
    return items


def embedding(shape: Shape, m: Micro) -> dict[str, int]:
    """The first stage's token (and position) indices; above tp = 1 the vocab-parallel embedding
    keeps its masked indices and mask."""
    ids = m.rows * (m.seq + 1) * 8 if m.tp == 1 else m.tokens * 9
    return {"embedding_indices": ids + (m.tokens * 8 if shape.learned_positions else 0)}


def rotary_tables(shape: Shape, m: Micro) -> int:
    """cos and sin [s, 1, 1, d], computed once per forward of a chunk and kept by every layer."""
    return 0 if shape.learned_positions else 2 * m.seq * shape.head_dim * m.dtype_bytes


def head(shape: Shape, m: Micro) -> dict[str, int]:
    """The last stage before the loss: the final norm and the output layer's input."""
    return {"final_norm": _norm(shape, m), "output_input": m.local_tokens * shape.hidden * m.dtype_bytes}


def loss(shape: Shape, m: Micro) -> dict[str, int]:
    """The loss keeps fp32 log-probabilities (tp = 1) or softmax (vocab-parallel) [tokens, vocab / tp],
    the targets and the loss mask; the logits' gradient is as large while the backward runs."""
    saved = m.tokens * shape.vocab // m.tp * 4
    small = m.tokens * (8 + 4 + (1 if m.tp > 1 else 0)) + 4
    return {"logits.saved": saved + small, "logits.grad": saved}


@dataclass(frozen=True)
class StageActivations:
    """What one pipeline stage saves for backward, at its peak (the first backward after warm-up)."""

    flights: int  # chunk-micro-batches held (megatron-core's schedule)
    per_chunk: int  # one chunk's layers, one micro-batch
    extra: int  # per chunk-micro-batch besides the layers: token indices (first stage)
    shared: int  # kept once whatever the micro-batches in flight: rotary tables
    head: int  # final norm + output layer input, last stage (one micro-batch at a time)
    loss: int  # the saved log-probabilities, last stage
    recompute: int  # what a layer rebuilt during its backward adds (recompute=selective|full)

    @property
    def saved_peak(self) -> int:
        """The peak of saved bytes: the head and loss are freed before the first layer is rebuilt."""
        held = self.flights * (self.per_chunk + self.extra) + self.shared
        return held + max(self.head + self.loss, self.recompute)


def stage(
    shape: Shape,
    m: Micro,
    recompute: str,
    *,
    layers: int,
    first: bool,
    last: bool,
    flights: int,
    rotary_sets: int,
    gpu_spec: bool = False,
    moe_layers: int = 0,
) -> StageActivations:
    """One pipeline stage: ``flights`` chunk-micro-batches of ``layers`` layers each, ``moe_layers``
    of them MoE layers (each the local spec's count of :func:`_moe` beyond the dense MLP's)."""
    moe_extra = 0
    if moe_layers and recompute != "full":
        dense = layer(shape, m, recompute)
        moe_extra = sum(layer(shape, m, recompute, moe=True).values()) - sum(dense.values())
    if gpu_spec:
        per_layer, full = korthikanti(shape, m, recompute), korthikanti(shape, m, "none")
        rebuilt = full - per_layer if recompute != "none" else 0
    else:
        items = layer(shape, m, recompute)
        per_layer, full_items = sum(items.values()), layer(shape, m, "none")
        rebuilt = 0
        if recompute == "full":  # the layer's saved tensors (its input is already held), cos/sin again
            rebuilt = sum(full_items.values()) - per_layer + rotary_tables(shape, m)
        elif recompute == "selective":  # the core attention again, once the layer's MLP was freed
            attention = sum(_attention(shape, m, "none").values()) - sum(_attention(shape, m, "selective").values())
            mlp = full_items["mlp_norm"] + full_items["fc1_input"] + full_items["mlp"]
            rebuilt = max(attention - mlp, 0)
    # full recompute: the checkpoint keeps the rotary frequencies instead of cos/sin
    tables = (
        0 if shape.learned_positions else rotary_tables(shape, m) if recompute != "full" else m.seq * shape.head_dim * 4
    )
    return StageActivations(
        flights=flights,
        per_chunk=layers * per_layer + moe_layers * moe_extra,
        extra=sum(embedding(shape, m).values()) if first else 0,
        shared=rotary_sets * tables,
        head=sum(head(shape, m).values()) if last else 0,
        loss=loss(shape, m)["logits.saved"] if last else 0,
        recompute=rebuilt,
    )


def korthikanti(shape: Shape, m: Micro, recompute: str, flash: bool = True) -> int:
    """Bytes per layer of Korthikanti et al. 2022 (Reducing Activation Recomputation, eq. 2-5) for
    16-bit activations: sbh(34 + 5as/h)/t with SP, sbh(10 + (24 + 5as/h)/t) without, 2sbh for full
    recompute. The 5as/h term is the materialised softmax (and its dropout mask): Transformer
    Engine's fused / flash attention never stores it, so it counts only with ``flash=False``, as
    selective recompute would. The 34 keeps the paper's GPT-3 layer (GELU MLP of 4h, LayerNorm,
    dropout masks): an upper bound for dropout-free SwiGLU models."""
    s, b, h, a, t = m.seq, m.rows, shape.hidden, shape.heads, m.tp
    scale = m.dtype_bytes / 2
    if recompute == "full":
        return int(2 * s * b * h / (t if m.sp else 1) * scale)
    attention = 0 if recompute == "selective" or flash else 5 * a * s / h
    if m.sp:
        return int(s * b * h * (34 + attention) / t * scale)
    return int(s * b * h * (10 + (24 + attention) / t) * scale)


def in_flight(pp: int, vpp: int, pp_rank: int, micro_batches: int) -> int:
    """Chunk-micro-batches whose activations a stage holds at its peak in megatron-core's schedules
    (``get_pp_rank_microbatches``): 1F1B warms up pp - rank - 1 forwards; interleaved warms up
    2(pp - rank - 1) + (vpp - 1)pp; both hold one more at the first backward."""
    total = micro_batches * vpp
    if pp == 1:
        return 1
    warmup = pp - pp_rank - 1 if vpp == 1 else 2 * (pp - pp_rank - 1) + (vpp - 1) * pp
    return min(warmup + 1, total)
