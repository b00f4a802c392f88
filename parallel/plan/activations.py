"""Bytes saved for backward per micro-batch, per layer and per pipeline stage, for this
implementation's local (CPU) spec: torch norms, SDPA core attention, megatron-core's linear layers.

Counted the way ``benchmarks/plan_census.py`` measures them (``saved_tensors_hooks``, one count per
storage): each tensor below is one that autograd keeps until backward. The GPU / Transformer Engine
path saves a little differently (fused LayerNorm+linear keeps the norm's input, not its output;
flash attention keeps q, k, v, the output and the softmax statistics); for it :func:`korthikanti`
gives Korthikanti et al. 2022's per-layer formula, which is what the planner uses when
``model.spec`` resolves to ``te``. Only the local spec is measurable on this machine.
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
    """A norm's saved input and statistics (fp32 mean / rstd per token)."""
    stats = (2 if shape.layernorm else 1) * 4 * m.local_tokens
    return m.local_tokens * shape.hidden * m.dtype_bytes + stats


def layer(shape: Shape, m: Micro, recompute: str = "none") -> dict[str, int]:
    """Saved bytes of one transformer layer for one micro-batch, itemised."""
    e, t, n, tokens = m.dtype_bytes, m.tp, m.local_tokens, m.tokens
    h, d = shape.hidden, shape.head_dim
    heads, groups = shape.heads // t, shape.groups // t
    if recompute == "full":  # only the layer's input survives the forward
        return {"layer_input": n * h * e}
    items: dict[str, int] = {}
    items["input_norm"] = _norm(shape, m)
    items["qkv_input"] = n * h * e  # the norm's output (megatron keeps the sequence shard with SP)
    qkv = tokens * (heads + 2 * groups) * d * e
    q_k = tokens * (heads + groups) * d * e
    attn: dict[str, int] = {}
    if not shape.learned_positions:
        attn["rope"] = qkv + q_k  # q, k views (the qkv output) and their rotate_half copies
    if m.batch_first:
        attn["sdpa_qkv"] = q_k if "rope" in attn else qkv  # views of the rope outputs / of qkv
    else:
        attn["sdpa_qkv"] = tokens * 3 * heads * d * e  # contiguous [b, heads, s, d] copies
    if shape.groups != shape.heads and m.batch_first:
        attn["gqa_repeat"] = tokens * 2 * heads * d * e
    attn["sdpa_out"] = tokens * heads * d * e + tokens * heads * 4  # output + logsumexp (fp32)
    if m.attention == "megatron":
        attn["scores"] = m.rows * heads * m.seq * m.seq * (e + e)  # softmax output + its input
    if recompute == "selective":  # the core attention's inputs only
        attn = {"core_attention_inputs": q_k + tokens * groups * d * e if "rope" in attn else qkv}
    items.update(attn)
    items["proj_input"] = tokens * heads * d * e
    items["mlp_norm"] = _norm(shape, m)
    items["fc1_input"] = n * h * e
    ffn = shape.ffn // t
    if shape.gated:
        items["mlp"] = tokens * ffn * e * 4  # fc1 output (2f), silu(x1), product (fc2's input)
    else:
        items["mlp"] = tokens * ffn * e * 2  # fc1 output (gelu's input), gelu output (fc2's input)
    return items


def embedding(shape: Shape, m: Micro) -> dict[str, int]:
    """The first stage: token (and position) indices."""
    return {"embedding_indices": m.tokens * 8 * (2 if shape.learned_positions else 1)}


def head(shape: Shape, m: Micro) -> dict[str, int]:
    """The last stage before the loss: the final norm and the output layer's input."""
    n, e = m.local_tokens, m.dtype_bytes
    return {"final_norm": _norm(shape, m), "output_input": n * shape.hidden * e}


def loss(shape: Shape, m: Micro) -> dict[str, int]:
    """The loss: fp32 log-probabilities [tokens, vocab / tp] saved, and the logits' gradient of the
    same size while the backward runs."""
    saved = m.tokens * shape.vocab // m.tp * 4
    return {"logits.saved": saved, "logits.grad": saved}


def korthikanti(shape: Shape, m: Micro, recompute: str) -> int:
    """Bytes per layer of Korthikanti et al. 2022 (Reducing Activation Recomputation, eq. 2-5):
    sbh(34 + 5as/h)/t with SP, selective drops the 5as/h term, full keeps 2sbh; 16-bit activations."""
    s, b, h, a, t = m.seq, m.rows, shape.hidden, shape.heads, m.tp
    scale = m.dtype_bytes / 2
    if recompute == "full":
        return int(2 * s * b * h / (t if m.sp else 1) * scale)
    attention = 0 if recompute == "selective" else 5 * a * s / h
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
