"""Step time of a run on given hardware, from the config and the topology alone (never a model).

Each rank runs ``m`` micro-batches through its pipeline stage; the slowest stage sets the pace, and
the pipeline adds ``(pp - 1) / vpp`` micro-batch times of bubble (1F1B, interleaved). One micro-batch
on a stage costs its matrix products (forward + 2x backward) at the hardware's rate, fused causal
attention, element-wise passes over the activations at memory bandwidth, the recomputation asked for,
tensor-parallel collectives (4 all-gathers / reduce-scatters per layer with sequence parallelism, the
same bytes as 2 + 2 all-reduces without) and pipeline sends. After the last micro-batch: gradient
reduction over dp (the engines do not overlap it: megatron ``overlap_grad_reduce=False``, DeepSpeed
``overlap_comm=False``), the optimizer step at memory bandwidth, DeepSpeed's per-micro-batch ZeRO-2
reductions and ZeRO-3 parameter gathers, and offload's host traffic. Every term is exposed time; the
model does not overlap what the engines do not.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from parallel.capabilities import capabilities
from parallel.plan.hardware import Hardware
from parallel.plan.memory import resolve_vocab_and_seq
from parallel.plan.params import Shape, chunks, is_expert
from parallel.run_config import Run
from parallel.topology import Topology

# element-wise passes over a layer's activations (forward + backward, bytes = passes x tokens x width x
# dtype): norms, residual adds, bias adds, layout copies on the hidden width; GELU / SwiGLU on the FFN width
H_PASSES = 40
F_PASSES = {"gelu": 8, "swiglu": 14}
DROPOUT_PASSES = 6  # mask generation and application, three sites per layer
CE_PASSES = 6  # fp32 logits: softmax, loss, gradient
# AdamW step bytes per parameter: read param, grad, 2 moments; write param, moments; grad norm + clip
ADAM_BYTES = 40
ADAM_BF16_EXTRA = 6  # bf16: read the fp32 main copy, write the bf16 weights
# DeepSpeed's host work beyond megatron's, in layer launches (hardware.layer_overhead_us): (per layer and
# micro-batch: gradient hooks, ZeRO-3's fetch / release of each module; per step), by ZeRO stage; fitted
# at dp=2 on the CPU against 2- and 8-layer runs (benchmarks/README.md)
DEEPSPEED_HOST = {0: (0.0, 0.0), 1: (0.0, 1.0), 2: (1.6, 1.0), 3: (5.8, 7.0)}


@dataclass
class StepTime:
    """Seconds per step, by term (exposed time, summing to ``step_s``), and what follows from it."""

    terms: dict[str, float]
    tokens_per_step: int
    model_flops_per_token: float
    world_size: int
    peak_flops: float
    notes: list[str] = field(default_factory=list)

    @property
    def step_s(self) -> float:
        return sum(self.terms.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def mfu(self) -> float:
        """Model FLOPs (6N + attention, no recomputation) per second over all devices' peak."""
        return self.model_flops_per_token * self.tokens_per_s / (self.world_size * self.peak_flops)


def model_flops_per_token(shape: Shape, seq: int) -> float:
    """pretrain/model/gpt.py ``flops_per_token``: 6 x matmul parameters (output layer included) +
    6 x layers x seq x hidden (attention scores and values, PaLM's convention)."""
    h, kv = shape.hidden, shape.head_dim * shape.groups
    units = 3 if shape.gated else 2
    moe = sum(shape.moe_pattern)  # MoE layers count the router and the experts a token visits
    mlp = (shape.layers - moe) * units * h * shape.ffn
    mlp += moe * (units * h * (shape.topk * shape.moe_ffn + shape.shared_ffn) + h * shape.experts)
    matmul = shape.layers * (2 * h * h + 2 * h * kv) + mlp + h * shape.vocab
    return 6.0 * matmul + 6.0 * shape.layers * seq * h


@dataclass(frozen=True)
class Stage:
    """What the time model needs of one pipeline stage on one tp rank."""

    layers: int
    chunks: int
    pre: bool  # embeddings
    post: bool  # output layer and loss
    params: int
    moe_layers: int = 0  # of ``layers``
    expert_params: int = 0  # of ``params``: this ep rank's experts (reduced over dp / ep ranks)


@functools.lru_cache(maxsize=256)
def stages(shape: Shape, tp: int, pp: int, vpp: int, ep: int = 1) -> tuple[Stage, ...]:
    """Every pipeline stage (cached: a search asks for the same ones many times)."""
    return tuple(
        Stage(
            sum(c.layers for c in row),
            len(row),
            any(c.pre_process for c in row),
            any(c.post_process for c in row),
            sum(c.numel for c in row),
            sum(c.moe_layers for c in row),
            sum(math.prod(s) for c in row for n, s in c.params if ep > 1 and is_expert(n)),
        )
        for row in chunks(shape, tp, pp, vpp, ep)
    )


@dataclass(frozen=True)
class Links:
    """Bandwidth of each group's collectives (megatron's rank order: tp fastest, then dp, then pp)."""

    tp: float
    dp: float
    pp: float
    ep: float = 0.0  # the expert-parallel group: ep ranks tp apart

    @classmethod
    def of(cls, topo: Topology, hw: Hardware) -> Links:
        per_node = hw.gpus_per_node

        def bw(span: int) -> float:
            return hw.intra_bw if span <= per_node else hw.inter_bw

        return cls(bw(topo.tp), bw(topo.tp * topo.dp), bw(topo.tp * topo.dp * topo.pp), bw(topo.tp * topo.ep))


def estimate_time(
    cfg: Run,
    topo: Topology,
    hw: Hardware,
    vocab_size: int | None = None,
    seq_len: int | None = None,
) -> StepTime:
    """The step time of ``cfg`` at ``topo`` on ``hw`` (``parallel.distributed_optimizer`` true / false /
    auto = dp > 1), with its terms."""
    vocab, seq = resolve_vocab_and_seq(cfg, vocab_size, seq_len)
    shape = Shape.from_config(cfg.model, vocab)
    par, train, model = cfg.parallel, cfg.train, cfg.model
    tp, pp, vpp, dp, sp = topo.tp, topo.pp, topo.vpp, topo.dp, topo.sequence_parallel
    b = int(train.micro_batch)
    m = int(train.global_batch) // (b * dp)
    e = 2 if bool(train.bf16) else 4
    n = b * seq  # tokens of one micro-batch
    h, f, hd = shape.hidden, shape.ffn, shape.head_dim
    links = Links.of(topo, hw)
    comm = hw.collective_s
    recompute = str(model.recompute)
    engine = str(par.engine)
    notes: list[str] = []

    # one layer, one micro-batch, on one tp rank: forward GEMMs, then forward + backward of everything
    qkv = (shape.heads + 2 * shape.groups) * hd // tp
    fc1 = (2 if shape.gated else 1) * f // tp
    linears = ((h, qkv), (shape.heads * hd // tp, h), (h, fc1), (f // tp, h))  # (in, out) on this tp rank
    gemm_fwd = sum(hw.gemm_s(n, k, o, e) for k, o in linears)
    gemm_all = sum(hw.linear_s(n, k, o, e) for k, o in linears)  # forward, the input's and weight's gradients
    attention = hw.attention_s(b, shape.heads // tp, max(1, shape.groups // tp), seq, hd, e)
    passes_h = H_PASSES + (DROPOUT_PASSES if float(model.dropout) > 0 else 0)
    elem_bytes = n * e * (passes_h * h / (tp if sp else 1) + F_PASSES[str(model.mlp)] * f / tp)
    elementwise = hw.elementwise_s(elem_bytes)
    act_bytes = n * h * e
    # per layer 2 all-gathers + 2 reduce-scatters forward and again backward (SP), or 2 + 2 all-reduces
    if sp:
        tp_layer = 4 * (comm("all-gather", act_bytes, tp, links.tp) + comm("reduce-scatter", act_bytes, tp, links.tp))
    else:
        tp_layer = 4 * comm("all-reduce", act_bytes, tp, links.tp)
    # the embedding's output and the output layer's input: a reduce-scatter and an all-gather, and back
    tp_ends = (
        comm("all-gather", act_bytes, tp, links.tp) + comm("reduce-scatter", act_bytes, tp, links.tp)
        if sp
        else 2 * comm("all-reduce", act_bytes, tp, links.tp)
    )
    moe = _moe_layer(shape, topo, hw, links, n, e, model.mlp)
    redo = 0.0
    if recompute == "full":  # the layer's forward again in backward, its collectives included
        redo = gemm_fwd + attention / 3.5 + elementwise / 3 + tp_layer / 2
    elif recompute == "selective":  # core attention's forward again
        redo = attention / 3.5

    # launching a layer's ops costs hw.layer_overhead_s of host time; a GPU runs them asynchronously, so
    # only what its kernels do not cover is exposed; a CPU computes what it launches, so all of it is
    zero_engine = capabilities(engine).zero
    zero = int(par.zero_stage) if zero_engine else 0
    per_layer, per_step = DEEPSPEED_HOST[zero] if zero_engine else (0.0, 0.0)
    host = hw.layer_overhead_s * (1 + per_layer)
    work = gemm_all + attention + elementwise + redo + tp_layer
    dispatch = host if not hw.asynchronous else max(0.0, host - work)

    def stage_terms(stage: Stage) -> dict[str, float]:
        out = {
            "matmul": stage.layers * gemm_all + stage.moe_layers * moe["matmul"],
            "attention": stage.layers * attention,
            "elementwise": stage.layers * elementwise + stage.moe_layers * moe["elementwise"],
            "recompute": stage.layers * redo,
            "tp_comm": stage.layers * tp_layer + stage.moe_layers * moe["tp_comm"],
            "ep_comm": stage.moe_layers * moe["ep_comm"],
            "pp_p2p": 0.0,
            "overhead": stage.layers * dispatch,
        }
        if stage.post:
            v = shape.vocab // tp
            out["matmul"] += hw.linear_s(n, h, v, e)
            out["elementwise"] += hw.elementwise_s(CE_PASSES * n * shape.vocab / tp * 4 + 4 * act_bytes)
            out["tp_comm"] += tp_ends / 2 + 3 * comm("all-reduce", n * 4, tp, links.tp)  # + the loss's 3
        if stage.pre:
            out["elementwise"] += hw.elementwise_s(4 * act_bytes)
            out["tp_comm"] += tp_ends / 2
        if pp > 1:  # activations forward, their gradients backward, per chunk
            sent = act_bytes / (tp if sp else 1)
            out["pp_p2p"] = 2 * stage.chunks * comm("send", sent, 2, links.pp)
        return out

    all_stages = stages(shape, tp, pp, vpp, topo.ep)
    per_stage = [stage_terms(stage) for stage in all_stages]
    slowest = max(range(pp), key=lambda r: sum(per_stage[r].values()))
    micro = per_stage[slowest]
    terms = {k: m * v for k, v in micro.items()}
    terms["pp_bubble"] = (pp - 1) / vpp * sum(micro.values())
    terms["overhead"] += per_step * hw.layer_overhead_s

    # after the micro-batches: gradients over dp, the optimizer step (the stage with the most parameters;
    # its experts' gradients over the dp / ep ranks holding the same experts)
    largest = max(all_stages, key=lambda st: st.params)
    params, experts = largest.params - largest.expert_params, largest.expert_params
    caps = capabilities(engine)
    stage = int(par.zero_stage) if caps.zero else 0
    sharded = cfg.optimizer_sharded
    grad_bytes = 4 if caps.grad_reduce_fp32 else e  # megatron reduces in fp32 (grad_reduce_in_fp32)
    grads, weights = params * grad_bytes, params * e
    buckets = max(1, math.ceil(params / min(5e8, max(params, h * h)))) if caps.grad_buckets else 1
    bw = links.dp

    def dp_comm(kind: str, nbytes: float) -> float:  # in buckets: one latency each
        extra = (buckets - 1) * hw.latency(kind) if dp > 1 else 0.0
        return comm(kind, nbytes, dp, bw) + extra

    if not caps.zero or stage in (0, 1):
        reduce = dp_comm("reduce-scatter" if sharded else "all-reduce", grads)
    else:  # ZeRO-2/3 reduce-scatter every micro-batch's gradients
        reduce = m * dp_comm("reduce-scatter", grads)
    gather = dp_comm("all-gather", weights) if sharded else 0.0
    if stage == 3:  # each module's weights gathered before its forward and its backward, every micro-batch
        # (norms and biases stay whole: below stage3_param_persistence_threshold = 10 x hidden)
        modules = [k * o for k, o in linears] * shape.layers + [shape.vocab * h]
        gather = 2 * m * sum(comm("all-gather", numel * e, dp, bw) for numel in modules)
    terms["dp_comm"] = reduce + (gather if stage != 3 else 0.0)
    if experts:  # megatron's expert buffer: reduced (and gathered) over dp / ep ranks
        edp = dp // topo.ep
        terms["dp_comm"] += comm("reduce-scatter" if sharded else "all-reduce", experts * grad_bytes, edp, bw)
        terms["dp_comm"] += comm("all-gather", experts * e, edp, bw) if sharded else 0.0
    terms["zero3_gather"] = gather if stage == 3 else 0.0
    if pp > 1 and shape.tied:  # the embedding's gradient, all-reduced between the first and last stage
        terms["dp_comm"] += comm("all-reduce", shape.vocab // tp * h * 4, 2, links.pp)
    owned = (params / dp + experts / (dp // topo.ep)) if sharded else params + experts
    step_bytes = owned * (ADAM_BYTES + (ADAM_BF16_EXTRA if e == 2 else 0))
    offload = caps.offload and str(par.offload) == "cpu"
    terms["optimizer"] = step_bytes / (hw.host_bw if offload else hw.memory_bw)
    terms["offload_pcie"] = 0.0
    if offload:  # gradients to the host, updated weights back; ZeRO-3 also streams parameters in
        terms["offload_pcie"] = owned * (grad_bytes + e) / hw.pcie_bw
        if stage == 3:
            terms["offload_pcie"] += 2 * m * owned * e / hw.pcie_bw
    if recompute != "none":
        notes.append(f"model.recompute={recompute}: its forward work is the 'recompute' term (not in MFU)")
    if sum(shape.moe_pattern):
        notes.append("MoE: matmul and model FLOPs count the experts a token is routed to (balanced load)")
    return StepTime(
        terms=terms,
        tokens_per_step=int(train.global_batch) * seq,
        model_flops_per_token=model_flops_per_token(shape, seq),
        world_size=topo.world_size,
        peak_flops=hw.peak_flops,
        notes=notes,
    )


def _moe_layer(shape: Shape, topo: Topology, hw: Hardware, links: Links, n: int, e: int, mlp: str) -> dict[str, float]:
    """What a MoE layer costs beyond the dense layer's terms (its MLP replaced), one micro-batch of
    ``n`` tokens on one rank: the router, each token's ``topk`` expert MLPs (with balanced load each
    rank runs ``n x topk`` of them at 1/tp of the width; tp gathers the sequence shards first), the
    shared expert, and the token dispatch: an all-to-all over ep forward and back, twice (dispatch
    and combine), plus the gather / reduce-scatter over tp with sequence parallelism."""
    if not sum(shape.moe_pattern):
        return {"matmul": 0.0, "elementwise": 0.0, "tp_comm": 0.0, "ep_comm": 0.0}
    tp, h, units = topo.tp, shape.hidden, 2 if shape.gated else 1
    routed = n * shape.topk
    dense = hw.linear_s(n, h, units * shape.ffn // tp, e) + hw.linear_s(n, shape.ffn // tp, h, e)
    moe = hw.linear_s(n // (tp if topo.sequence_parallel else 1), h, shape.experts, 4)  # the router (fp32)
    moe += hw.linear_s(routed, h, units * shape.moe_ffn // tp, e) + hw.linear_s(routed, shape.moe_ffn // tp, h, e)
    if shape.shared_ffn:
        moe += hw.linear_s(n, h, units * shape.shared_ffn // tp, e) + hw.linear_s(n, shape.shared_ffn // tp, h, e)
    passes = F_PASSES[mlp]
    width = routed * shape.moe_ffn + n * shape.shared_ffn - n * shape.ffn
    elementwise = hw.elementwise_s(e * (passes * width / tp + 6 * routed * h))  # + permute / unpermute copies
    tokens = routed * h * e / (tp if topo.sequence_parallel else 1)
    comm = hw.collective_s
    ep_comm = 4 * comm("all-to-all", tokens, topo.ep, links.ep)
    tp_comm = 0.0
    if topo.sequence_parallel:
        tp_comm = 2 * (
            comm("all-gather", routed * h * e, tp, links.tp) + comm("reduce-scatter", routed * h * e, tp, links.tp)
        )
    return {"matmul": moe - dense, "elementwise": elementwise, "tp_comm": tp_comm, "ep_comm": ep_comm}
