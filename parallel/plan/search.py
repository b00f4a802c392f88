"""``gpt-plan search=true``: every layout of a world size, checked, sized and timed, fastest first.

A layout is (tp, pp, vpp, micro-batch, recomputation, optimizer sharding) with dp = world / (tp*pp);
the global batch, model and data stay the config's. Each goes through the checks gpt-pretrain makes
(``Topology.from_config``; the caller's ``compatible`` for a run dir to resume), the memory estimate
(a layout whose largest rank does not fit the device is dropped, never listed) and the step-time
model. tp stays inside a node (its collectives are per layer); micro-batches are the powers of two
up to 32 that divide the per-rank batch. A layout whose model states alone (weights and Adam
moments of its largest stage) exceed the device is dropped before the full estimate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from conf.errors import UserError
from parallel.capabilities import ENGINES, capabilities
from parallel.plan.hardware import Hardware
from parallel.plan.memory import MemoryPlan, estimate_memory
from parallel.plan.params import Shape
from parallel.plan.time import StepTime, estimate_time, stages
from parallel.run_config import Groups, Run, replaced
from parallel.topology import Topology

MAX_MICRO_BATCH = 32
MAX_VPP = 8
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: int
    micro_batch: int
    recompute: str
    engine: str  # megatron | deepspeed
    distributed_optimizer: bool = False  # megatron
    zero_stage: int = 0  # deepspeed
    offload: bool = False  # deepspeed
    ep: int = 1  # expert parallelism (MoE models): divides dp and model.num_experts

    @property
    def optimizer(self) -> str:
        if not capabilities(self.engine).zero:
            return "dist-opt" if self.distributed_optimizer else "replicated"
        return f"zero{self.zero_stage}" + ("+offload" if self.offload else "")

    def overrides(self) -> dict[str, object]:
        """The keys that select this layout (gpt-pretrain's spelling)."""
        out: dict[str, object] = {
            "parallel.tp": self.tp,
            "parallel.pp": self.pp,
            "parallel.vpp": self.vpp,
            "train.micro_batch": self.micro_batch,
            "model.recompute": self.recompute,
            "parallel.engine": self.engine,
            "parallel.ep": self.ep,
        }
        if not capabilities(self.engine).zero:
            out["parallel.distributed_optimizer"] = self.distributed_optimizer
            out["parallel.zero_stage"] = 0
            out["parallel.offload"] = "none"
        else:
            out["parallel.distributed_optimizer"] = "auto"
            out["parallel.zero_stage"] = self.zero_stage
            out["parallel.offload"] = "cpu" if self.offload else "none"
        return out

    def command_line(self) -> str:
        return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.overrides().items())


@dataclass
class Ranked:
    layout: Layout
    dp: int
    memory: MemoryPlan
    time: StepTime


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg: Groups, world: int, gpus_per_node: int) -> Iterator[Layout]:
    """Every candidate for ``world`` ranks (the checks decide which are valid); a MoE model's also
    at every expert-parallel size that divides dp and its experts."""
    layers, global_batch = int(cfg.model.num_layers), int(cfg.train.global_batch)
    experts = getattr(cfg.model, "num_experts", None)
    for tp in [d for d in _divisors(world) if d <= gpus_per_node]:
        for pp in [d for d in _divisors(world // tp) if layers % d == 0]:
            dp = world // (tp * pp)
            if global_batch % dp:
                continue
            vpps = [v for v in _divisors(layers // pp) if v <= MAX_VPP] if pp > 1 else [1]
            micros = [b for b in _divisors(global_batch // dp) if b <= MAX_MICRO_BATCH and not b & (b - 1)]
            optimizers = []
            for caps in ENGINES.values():  # each engine's ways to hold the optimizer state
                if pp > 1 and not caps.pipeline:
                    continue
                optimizers += [(caps.name, False, s, False) for s in caps.zero_stages]
                if caps.distributed_optimizer and dp > 1:
                    optimizers.append((caps.name, True, 0, False))
                if caps.offload:
                    optimizers += [(caps.name, False, s, True) for s in caps.zero_stages if s >= 1]
            eps = [d for d in _divisors(dp) if experts and int(experts) % d == 0] or [1]
            for vpp in vpps:
                for micro in micros:
                    for recompute in RECOMPUTE:
                        for engine, dist, stage, offload in optimizers:
                            for ep in eps:
                                yield Layout(tp, pp, vpp, micro, recompute, engine, dist, stage, offload, ep)


def _states_floor(layout: Layout, topo: Topology, cfg: Any, vocab_size: int) -> float:
    """A lower bound of the largest stage's device bytes: its weights and Adam moments, as sharded."""
    shape = Shape.from_config(cfg.model, vocab_size)
    params = max(stage.params for stage in stages(shape, topo.tp, topo.pp, topo.vpp, topo.ep))
    weights = params * (2 if cfg.train.bf16 else 4)
    sharded = cfg.optimizer_sharded
    moments = 0.0 if layout.offload else params * 8 / (topo.dp if sharded else 1)
    return weights / (topo.dp if layout.zero_stage == 3 else 1) + moments


def search(
    groups: Groups,
    hw: Hardware,
    vocab_size: int,
    seq_len: int,
    compatible: Callable[[Run], str | None] | None = None,
) -> tuple[list[Ranked], Counter]:
    """(layouts that pass every check and fit, fastest first; why the others were dropped)."""
    world = hw.world_size
    base = groups.as_dict()
    kept: list[Ranked] = []
    dropped: Counter = Counter()
    too_big: set[tuple] = set()  # (structure, recompute) whose smaller micro-batch did not fit
    for layout in layouts(groups, world, hw.gpus_per_node):
        structure = (layout.tp, layout.pp, layout.vpp, layout.optimizer, layout.recompute, layout.ep)
        if structure in too_big:  # activations only grow with the micro-batch
            dropped["does not fit"] += 1
            continue
        try:
            run = Run.build(_with_overrides(base, layout.overrides()), world_size=world, rank=0)
        except UserError:
            dropped["fails a check"] += 1
            continue
        topo = run.layout
        if _states_floor(layout, topo, run, vocab_size) > hw.memory_bytes:
            dropped["does not fit"] += 1
            continue
        problem = compatible(run) if compatible else None
        if problem:
            dropped["cannot resume run.dir"] += 1
            continue
        memory = estimate_memory(run, topo, vocab_size=vocab_size, seq_len=seq_len)
        if not hw.fits(memory):
            too_big.add(structure)
            dropped["does not fit"] += 1
            continue
        kept.append(Ranked(layout, topo.dp, memory, estimate_time(run, topo, hw, vocab_size, seq_len)))
    kept.sort(key=lambda r: (-r.time.tokens_per_s, r.memory.largest.total))
    return kept, dropped


def _with_overrides(groups: dict[str, Any], overrides: dict[str, object]) -> dict[str, Any]:
    """``groups`` with ``{"group.key": value}`` applied (new group instances; the base is untouched)."""
    changes: dict[str, dict[str, object]] = {}
    for dotted, value in overrides.items():
        name, key = dotted.split(".", 1)
        changes.setdefault(name, {})[key] = value
    return {**groups, **{name: replaced(groups[name], **values) for name, values in changes.items()}}
