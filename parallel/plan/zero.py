"""DeepSpeed ZeRO 0-3 model states of one rank, from the parameter sizes and the engine's config
(``parallel/deepspeed_engine.py``: two param groups, decay and no-decay; buckets sized to the model).

ZeRO 1/2 flatten each param group, padded to a multiple of 2·dp elements, keep the 16/32-bit flat
copy whole and an fp32 partition + Adam moments per rank; ZeRO-2 also partitions the gradients and
reduces through a bucket of ``reduce_bucket_size`` elements; ZeRO-3 partitions the parameters too,
except those under the persistence threshold (10·hidden elements). Offload moves the fp32
partitions, moments and fp32 gradient partitions (ZeRO-3 also the parameter partitions) to host.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from parallel.plan.params import Chunk, Shape
from parallel.topology import Topology


def _groups(chunk: Chunk) -> list[list[int]]:
    """Parameter numels of the engine's two param groups: matrices (decayed), vectors (not)."""
    decay = [math.prod(s) for n, s in chunk.params if not (n.endswith(".bias") or len(s) == 1)]
    other = [math.prod(s) for n, s in chunk.params if n.endswith(".bias") or len(s) == 1]
    return [g for g in (decay, other) if g]


def _pad(n: int, divisor: int) -> int:
    return int(math.ceil(n / divisor) * divisor)


def deepspeed_states(chunk: Chunk, topo: Topology, run, shape: Shape, cfg: DictConfig) -> tuple[dict[str, int], int]:  # noqa: ANN001
    """(items, dp rank) of one rank under ``parallel.engine=deepspeed`` (pp is always 1 there)."""
    e, dp, stage = run.dtype_bytes, topo.dp, run.zero_stage
    groups = _groups(chunk)
    numel = sum(sum(g) for g in groups)
    bucket = int(min(5e8, max(numel, shape.hidden * shape.hidden)))
    items: dict[str, int] = {}
    host = "cpu_offload" if run.offload else "optimizer"
    if stage == 0:
        items["params.weights"] = numel * e
        items["grads.param_grad"] = numel * e
        if run.bf16:  # BF16_Optimizer: fp32 master and fp32 accumulated gradients
            items["optimizer.fp32_master"] = numel * 4
            items["grads.fp32_accumulated"] = numel * 4
        items["optimizer.adam_moments"] = numel * 8
        items["optimizer.adam_step"] = len(chunk.params) * 4
        return items, 0
    flat = sum(_pad(sum(g), 2 * dp) for g in groups)
    part = flat // dp
    if stage in (1, 2):
        items["params.flat"] = flat * e
        items[f"{host}.fp32_partition"] = part * 4
        items[f"{host}.adam_moments"] = part * 8
        items[f"{host}.adam_step"] = len(groups) * 4
        if stage == 1:
            items["grads.param_grad"] = numel * e
        else:
            items["grads.partition"] = part * e
            items["comm_buffers.ipg_bucket"] = bucket * e
        items[f"{'cpu_offload' if run.offload else 'grads'}.fp32_partition_grad"] = part * 4
        return items, 0
    threshold = 10 * shape.hidden
    sizes = [math.prod(s) for _, s in chunk.params]
    persistent = sum(n for n in sizes if n <= threshold)
    partitioned = sum(math.ceil(n / dp) for n in sizes if n > threshold)
    params_key = "cpu_offload.param_partition" if run.offload else "params.partition"
    items["params.persistent"] = persistent * e
    items[params_key] = partitioned * e
    items[f"{host}.fp32_partition"] = part * 4
    items[f"{host}.adam_moments"] = part * 8
    items[f"{host}.adam_step"] = len(groups) * 4
    items["grads.partition"] = part * e
    items[f"{'cpu_offload' if run.offload else 'grads'}.fp32_partition_grad"] = part * 4
    items["comm_buffers.ipg_bucket"] = bucket * e
    return items, 0
