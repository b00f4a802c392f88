"""Per-rank memory of a training run, from the config and the topology, without building a model.

Model states (parameters, gradients, optimizer) follow the engines' own layouts: megatron-core's
DDP buffers and distributed optimizer (``parallel/plan/buffers.py``), DeepSpeed ZeRO 0-3 flat
partitions (``parallel/plan/zero.py``). Activations are the bytes saved for backward by the local
spec (``parallel/plan/activations.py``) times the micro-batches a pipeline stage holds at its peak.
``benchmarks/plan_accuracy.py`` compares every term with a census of a real run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from parallel.capabilities import capabilities
from parallel.plan import activations as act
from parallel.plan.buffers import ddp_buffer
from parallel.plan.params import GPT2_VOCAB, Chunk, Shape, chunks, is_expert

if TYPE_CHECKING:  # the planner imports no torch (gpt-plan starts fast)
    from parallel.run_config import Run
    from parallel.topology import Topology

ADAM_STEP_BYTES = 4  # torch AdamW keeps a one-element fp32 ``step`` tensor per parameter tensor


@dataclass
class RankMemory:
    """One rank role's bytes, by kind; ``items`` itemises each kind (``kind.detail``: bytes)."""

    where: str  # e.g. "pp stage 0 (tp rank 0, dp rank 0)"
    params: int  # on the device
    grads: int
    optimizer: int  # Adam moments + fp32 master copy, after sharding; 0 if offloaded
    activations: int  # peak saved-for-backward bytes incl. pipeline in-flight micro-batches
    comm_buffers: int  # gradient buckets, all-gather buffers
    logits: int  # logits and loss of the last stage
    cpu_offload: int = 0  # bytes in host memory (DeepSpeed offload)
    items: dict[str, int] = field(default_factory=dict)
    transient: list[str] = field(default_factory=list)  # item keys alive only in forward/backward

    @property
    def total(self) -> int:
        """Device bytes."""
        return self.params + self.grads + self.optimizer + self.activations + self.comm_buffers + self.logits

    @property
    def model_states(self) -> int:
        """Parameters + gradients + optimizer, wherever they live (device and host)."""
        return self.params + self.grads + self.optimizer + self.cpu_offload

    @property
    def at_optimizer_step(self) -> int:
        """Model states and buffers (device and host) alive when the optimizer update begins: what a
        census of the live tensors counts then (``parallel.plan.census``)."""
        gone = sum(self.items.get(k, 0) for k in self.transient)
        return self.model_states + self.comm_buffers - gone


@dataclass
class MemoryPlan:
    ranks: list[RankMemory]  # one per distinct rank role (at least one per pipeline stage)

    @property
    def largest(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)


@dataclass(frozen=True)
class StepRegime:
    """What the estimate needs beyond the shapes, resolved once from the config."""

    engine: str
    zero_stage: int
    offload: bool
    distributed_optimizer: bool
    bf16: bool
    micro_batch: int
    micro_batches: int  # per step on one dp rank
    seq: int
    recompute: str
    spec: str  # local | te
    attention: str

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.bf16 else 4


def resolve_vocab_and_seq(cfg: Run, vocab_size: int | None, seq_len: int | None) -> tuple[int, int]:
    """The vocabulary and window length: given, else the data manifest's, else GPT-2's vocabulary
    and ``model.seq_len``."""
    if vocab_size is not None and seq_len is not None:
        return vocab_size, seq_len
    manifest = None
    if cfg.data is not None and cfg.data.dir:
        from conf.errors import UserError
        from data.shards import load_manifest

        try:
            manifest = load_manifest(cfg.data.dir)
        except (UserError, OSError, ValueError, KeyError):
            manifest = None
    vocab = vocab_size if vocab_size is not None else (manifest.vocab_size if manifest else GPT2_VOCAB)
    seq = seq_len if seq_len is not None else (manifest.seq_len if manifest else int(cfg.model.seq_len))
    return int(vocab), int(seq)


def _run(cfg: Run, topo: Topology, seq: int) -> StepRegime:
    par, train, model = cfg.parallel, cfg.train, cfg.model
    spec = str(model.spec)
    if spec == "auto":
        spec = "local"  # the planner runs anywhere; ask for model.spec=te to plan the GPU spec
    return StepRegime(
        engine=str(par.engine),
        zero_stage=int(par.zero_stage),
        offload=str(par.offload) == "cpu",
        distributed_optimizer=cfg.distributed_optimizer,
        bf16=bool(train.bf16),
        micro_batch=int(train.micro_batch),
        micro_batches=int(train.global_batch) // (int(train.micro_batch) * topo.dp),
        seq=seq,
        recompute=str(model.recompute),
        spec=spec,
        attention=str(model.attention),
    )


def _megatron_states(stage: list[Chunk], topo: Topology, run: StepRegime, shape: Shape) -> list[dict[str, int]]:
    """Items of each dp rank of one pipeline stage under megatron-core (the buffers are laid out once)."""
    e = run.dtype_bytes
    buffers, expert_buffers = [], []
    ep = topo.ep
    for chunk in stage:
        # megatron's DDP keeps expert parameters (ep > 1) in their own buffer, reduced and sharded over
        # the dp / ep ranks that hold the same experts; at ep = 1 they are ordinary parameters
        for own, group in ((buffers, topo.dp), (expert_buffers, topo.dp // ep)):
            params = [(n, s) for n, s in chunk.params if (ep > 1 and is_expert(n)) == (own is expert_buffers)]
            if params or own is buffers:
                numels = [_numel(s) for _, s in params]
                shared = [_shared(name, chunk, topo, shape) for name, _ in params]
                own.append(ddp_buffer(numels, shared, group, run.distributed_optimizer))
    padded = sum(b.numel for b in buffers + expert_buffers)
    common = {"params.weights": padded * e, "grads.main_grad_buffer": padded * 4}  # grad_reduce_in_fp32
    received = sum(1 for c in stage if not c.pre_process)
    if received:  # each chunk fed by a previous stage keeps its last input and that input's grad
        tokens = run.seq * run.micro_batch // (topo.tp if topo.sequence_parallel else 1)
        common["comm_buffers.pipeline_input_and_grad"] = received * 2 * tokens * shape.hidden * e
    if topo.sequence_parallel:  # megatron's GlobalMemoryBuffer: the all-gathered [s, b, h] input
        common["comm_buffers.sp_allgather"] = run.seq * run.micro_batch * shape.hidden * e
    per_rank = []
    for dp_rank in range(topo.dp):
        edp_rank = dp_rank % (topo.dp // ep)
        own = sum(b.shard_numel[dp_rank] for b in buffers) + sum(b.shard_numel[edp_rank] for b in expert_buffers)
        items = {**common, "optimizer.adam_moments": own * 8}
        if run.bf16:
            items["optimizer.fp32_master"] = own * 4
        tensors = sum(b.shard_tensors[dp_rank] for b in buffers) + sum(
            b.shard_tensors[edp_rank] for b in expert_buffers
        )
        items["optimizer.adam_step"] = tensors * ADAM_STEP_BYTES
        per_rank.append(items)
    return per_rank


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _shared(name: str, chunk: Chunk, topo: Topology, shape: Shape) -> bool:
    """megatron marks the tied embedding ``shared_embedding`` only when it spans pipeline stages."""
    if not shape.tied or topo.pp == 1:
        return False
    return (chunk.pre_process and name == "embedding.word_embeddings.weight") or (
        chunk.post_process and name == "output_layer.weight"
    )


def stage_activations(stage: list[Chunk], topo: Topology, run: StepRegime, shape: Shape) -> act.StageActivations:
    batch_first = topo.tp == 1 and topo.pp == 1 and run.attention == "sdpa" and run.spec == "local"
    m = act.Micro(
        run.seq, run.micro_batch, topo.tp, topo.sequence_parallel, run.dtype_bytes, batch_first, run.attention
    )
    flights = act.in_flight(topo.pp, topo.vpp, stage[0].pp_rank, run.micro_batches)
    return act.stage(
        shape,
        m,
        run.recompute,
        layers=stage[0].layers,
        first=stage[0].pre_process,
        last=any(c.post_process for c in stage),
        flights=flights,
        # cos/sin are cached per chunk: one set per run of consecutive forwards of one chunk
        rotary_sets=1 if topo.vpp == 1 else -(-flights // topo.pp),
        gpu_spec=run.spec != "local",
        moe_layers=stage[0].moe_layers,
    )


def _activations(stage: list[Chunk], topo: Topology, run: StepRegime, shape: Shape) -> dict[str, int]:
    """Peak saved bytes of one stage (the loss's own bytes are under ``logits``)."""
    a = stage_activations(stage, topo, run, shape)
    items = {"activations.layers": a.flights * a.per_chunk}
    if a.extra:
        items["activations.token_indices"] = a.flights * a.extra
    if a.shared:
        items["activations.rotary_tables"] = a.shared
    if a.head:
        items["activations.final_norm_and_head"] = a.head
    if a.recompute:
        items["activations.recompute_peak"] = max(a.recompute - a.head - a.loss, 0)
    return items


def stage_saved_peak(
    cfg: Run, topo: Topology, pp_rank: int, vocab_size: int | None = None, seq_len: int | None = None
) -> int:
    """The peak bytes saved for backward on ``pp_rank``'s stage (loss included): what
    ``parallel.plan.census.SavedTensors`` measures over one training step."""
    vocab, seq = resolve_vocab_and_seq(cfg, vocab_size, seq_len)
    shape = Shape.from_config(cfg.model, vocab)
    stage = chunks(shape, topo.tp, topo.pp, topo.vpp, topo.ep)[pp_rank]
    return stage_activations(stage, topo, _run(cfg, topo, seq), shape).saved_peak


def estimate_memory(
    cfg: Run,
    topo: Topology,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    dp_ranks: str = "largest",
) -> MemoryPlan:
    """Every pipeline stage's bytes (tp ranks hold the same shapes). ``dp_ranks="largest"``: one
    entry per stage, its dp rank with the most bytes; ``"all"``: one per (stage, dp rank).
    ``vocab_size`` / ``seq_len``: the tokenizer's vocabulary and the data's window, else the data
    manifest's (``data.dir``), else GPT-2's 50257 and ``model.seq_len``."""
    vocab, seq = resolve_vocab_and_seq(cfg, vocab_size, seq_len)
    shape = Shape.from_config(cfg.model, vocab)
    run = _run(cfg, topo, seq)
    ranks = []
    for stage in chunks(shape, topo.tp, topo.pp, topo.vpp, topo.ep):
        shared = _activations(stage, topo, run, shape)
        if any(c.post_process for c in stage):
            m = act.Micro(run.seq, run.micro_batch, topo.tp, topo.sequence_parallel, run.dtype_bytes, False)
            shared.update(act.loss(shape, m))
        if not capabilities(run.engine).zero:
            states, gone = _megatron_states(stage, topo, run, shape), ()
        else:
            from parallel.plan.zero import deepspeed_states, transient

            states = [deepspeed_states(stage[0], topo, run, shape, r) for r in range(topo.dp)]
            gone = transient(run.zero_stage)
        candidates = []
        for dp_rank, items in enumerate(states):
            where = f"pp stage {stage[0].pp_rank} (tp rank 0, dp rank {dp_rank})"
            candidates.append(_rank(where, {**items, **shared}, [k for k in gone if k in items]))
        ranks += candidates if dp_ranks == "all" else [max(candidates, key=lambda r: r.total)]
    return MemoryPlan(ranks)


def _rank(where: str, items: dict[str, int], transient: list[str]) -> RankMemory:
    def kind(prefix: str) -> int:
        return sum(v for k, v in items.items() if k.startswith(prefix + "."))

    return RankMemory(
        where=where,
        params=kind("params"),
        grads=kind("grads"),
        optimizer=kind("optimizer"),
        activations=kind("activations"),
        comm_buffers=kind("comm_buffers"),
        logits=kind("logits"),
        cpu_offload=kind("cpu_offload"),
        items=dict(items),
        transient=transient,
    )
