"""The planner's model of a run: per-rank memory (and, in the CLI's modules, step time)
from the validated config and the Topology alone, never by building a model.

Import direction: conf/ and parallel/topology only (the planner runs before any process group)."""

from parallel.plan.memory import MemoryPlan, RankMemory, estimate_memory
from parallel.plan.params import Shape, chunks, padded_vocab, total_params

__all__ = ["MemoryPlan", "RankMemory", "Shape", "chunks", "estimate_memory", "padded_vocab", "total_params"]
