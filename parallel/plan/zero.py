"""DeepSpeed ZeRO 0-3 model states of one rank, from the parameter sizes and the engine's config
(``parallel/deepspeed_engine.py``: two param groups, matrices with weight decay and vectors without;
communication buckets sized to the model, ``reduce_bucket_size = min(5e8, max(N, hidden²))``).

The layout is DeepSpeed 0.19's, as a census of a real run shows it when the optimizer update begins
(``benchmarks/plan_accuracy.py``): each group flattened and padded to a multiple of 2·dp elements,
each rank owning 1/dp of it;

- ZeRO 1 and 2 keep the 16/32-bit flat copy whole, an fp32 master partition + Adam moments, the
  reduced gradients of every parameter that overlaps the rank's partition (whole parameters, in the
  model's dtype) and fp32 gradient partitions; they reduce through a bucket during the backward;
- ZeRO-3 keeps only the parameters' partition, a gradient partition buffer, fp32 gradient
  partitions and a persistent bucket of ``reduce_bucket_size``, and gathers parameters while they
  compute (transient);
- offload (``parallel.offload=cpu``) moves master partitions, moments and fp32 gradients (ZeRO-3:
  parameter and gradient partitions too) to host memory, and adds pinned copy buffers on the device.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from parallel.plan.params import Chunk, Shape

if TYPE_CHECKING:  # the planner imports no torch (gpt-plan starts fast)
    from parallel.topology import Topology

ADAM_STEP_BYTES = 4


def _groups(chunk: Chunk) -> list[list[int]]:
    """Parameter numels of the engine's two param groups, in model order: matrices (decayed), vectors."""
    decay = [math.prod(s) for n, s in chunk.params if not (n.endswith(".bias") or len(s) == 1)]
    other = [math.prod(s) for n, s in chunk.params if n.endswith(".bias") or len(s) == 1]
    return [g for g in (decay, other) if g]


def _pad(n: int, divisor: int) -> int:
    return int(math.ceil(n / divisor) * divisor)


def _overlapping(group: list[int], dp: int, rank: int) -> int:
    """Elements of the parameters (whole) that overlap ``rank``'s partition of the flat group."""
    size = _pad(sum(group), 2 * dp) // dp
    lo, hi, start, total = rank * size, (rank + 1) * size, 0, 0
    for numel in group:
        if start < hi and start + numel > lo:
            total += numel
        start += numel
    return total


def deepspeed_states(chunk: Chunk, topo: Topology, run: Any, shape: Shape, dp_rank: int) -> dict[str, int]:
    """Items of one dp rank under ``parallel.engine=deepspeed`` (pp is always 1 there)."""
    e, dp, stage = run.dtype_bytes, topo.dp, run.zero_stage
    groups = _groups(chunk)
    numel = sum(sum(g) for g in groups)
    bucket = int(min(5e8, max(numel, shape.hidden * shape.hidden)))
    steps = len(chunk.params) * ADAM_STEP_BYTES
    items: dict[str, int] = {}
    if stage == 0:
        items["params.weights"] = numel * e
        items["grads.param_grad"] = numel * e
        if run.bf16:  # DeepSpeed's BF16_Optimizer: fp32 master weights and fp32 gradient accumulation
            items["optimizer.fp32_master"] = numel * 4
            items["grads.fp32_accumulated"] = numel * 4
        items["optimizer.adam_moments"] = numel * 8
        items["optimizer.adam_step"] = steps
        return items
    flat = sum(_pad(sum(g), 2 * dp) for g in groups)
    part = flat // dp
    host = "cpu_offload" if run.offload else "optimizer"
    host_grads = "cpu_offload" if run.offload else "grads"
    items[f"{host}.fp32_master_partition"] = part * 4
    items[f"{host}.adam_moments"] = part * 8
    items[f"{host}.adam_step"] = len(groups) * ADAM_STEP_BYTES
    items[f"{host_grads}.fp32_grad_partition"] = part * 4
    if stage in (1, 2):
        items["params.flat"] = flat * e
        overlapping = sum(_overlapping(g, dp, dp_rank) for g in groups)
        if not run.offload:
            items["grads.reduced_in_partition"] = overlapping * e
        else:
            largest = max(max(g) for g in groups)
            items["comm_buffers.offload_param_copy"] = part * e  # fp32 -> 16-bit partition, on the device
            items["comm_buffers.offload_grad_staging"] = largest * e
            items["cpu_offload.grad_staging"] = largest * e
            if stage == 2:  # gradients of the partition accumulated on the host (first param group)
                items["cpu_offload.accumulated_grads"] = _overlapping(groups[0], dp, dp_rank) * e
        items["comm_buffers.ipg_bucket"] = bucket * (4 if stage == 1 else e)  # transient
        return items
    params_key = "cpu_offload.param_partition" if run.offload else "params.partition"
    items[params_key] = part * e
    items[f"{host_grads}.grad_partition_buffer"] = part * e
    items["comm_buffers.ipg_bucket"] = bucket * e
    items["comm_buffers.gathered_params"] = min(numel, int(0.9 * bucket)) * e  # transient
    return items


# items that exist only during the forward/backward, not when the optimizer update begins
TRANSIENT_ZERO12 = ("comm_buffers.ipg_bucket",)
TRANSIENT_ZERO3 = ("comm_buffers.gathered_params",)


def transient(stage: int) -> tuple[str, ...]:
    return TRANSIENT_ZERO12 if stage in (1, 2) else TRANSIENT_ZERO3 if stage == 3 else ()
