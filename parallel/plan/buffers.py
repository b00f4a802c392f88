"""megatron-core's DDP gradient/parameter buffer layout, replayed from parameter sizes alone.

With the distributed optimizer each parameter starts at a multiple of 64 elements, each bucket
ends at a multiple of lcm(dp, 128), and a shared (tied across stages) embedding gets its own bucket;
each dp rank then owns 1/dp of every bucket (``_ParamAndGradBuffer.__init__`` and
``DistributedOptimizer._build_model_gbuf_range``). The planner needs the padded totals and the
unpadded elements each dp rank's optimizer shard covers; replaying the loop is exact, and cheaper
than a formula with the same corner cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BufferLayout:
    numel: int  # padded elements of the buffer (params and grads alike)
    shard_numel: list[int]  # per dp rank: parameter elements inside its shard (optimizer state)
    shard_tensors: list[int]  # per dp rank: parameter tensors its shard touches


def _pad(n: int, divisor: int) -> int:
    return int(math.ceil(n / divisor) * divisor)


def ddp_buffer(numels: list[int], shared: list[bool], dp: int, distributed_optimizer: bool) -> BufferLayout:
    """The buffer of one model chunk's parameters (``numels`` in module order; overlap_grad_reduce
    is off in this project, so there is no size limit per bucket)."""
    if not distributed_optimizer:
        total = sum(numels)
        return BufferLayout(total, [total] * dp, [len(numels)] * dp)
    divisor = math.lcm(dp, 128)
    buckets: list[tuple[int, int, list[tuple[int, int]]]] = []  # (start, end, param ranges)
    start = bucket_start = 0
    ranges: list[tuple[int, int]] = []
    end = 0
    for numel, is_shared in zip(numels[::-1], shared[::-1], strict=True):  # backprop order
        start = _pad(start, 64)
        if is_shared and ranges:
            bucket_end = _pad(start, divisor)
            buckets.append((bucket_start, bucket_end, ranges))
            bucket_start, start, ranges = bucket_end, bucket_end, []
        end = start + numel
        ranges.append((start, end))
        if is_shared:
            bucket_end = _pad(end, divisor)
            buckets.append((bucket_start, bucket_end, ranges))
            bucket_start, start, ranges = bucket_end, bucket_end, []
        else:
            start = end
    if ranges:
        buckets.append((bucket_start, _pad(end, divisor), ranges))
    shard, touched = [0] * dp, [0] * dp
    for b_start, b_end, params in buckets:
        size = (b_end - b_start) // dp
        for r in range(dp):
            lo, hi = b_start + r * size, b_start + (r + 1) * size
            overlaps = [max(0, min(hi, p_end) - max(lo, p_start)) for p_start, p_end in params]
            shard[r] += sum(overlaps)
            touched[r] += sum(1 for o in overlaps if o > 0)
    return BufferLayout(buckets[-1][1] if buckets else 0, shard, touched)
