"""At one data-parallel rank, autograd accumulates each gradient straight into megatron's gradient buffer.

megatron-core's DDP keeps every gradient in a contiguous buffer (``param.main_grad`` views) for its
bucketed reductions, and a hook on each parameter's gradient accumulator copies the gradient that
autograd made into that view (``main_grad.add_(grad)``) and drops it: per parameter and micro-batch,
one Python hook, one fresh gradient tensor and one extra add. With one data-parallel rank nothing
is reduced between ranks, so instead each ``param.grad`` is set to its ``main_grad`` view before
the step's backward passes and the hooks do nothing: autograd then adds every micro-batch's
gradient into the buffer in place (``AccumulateGrad`` adds into a defined ``.grad``), the same sum
in the same order, so losses are bit-identical with and without it. Used only where that holds:
fp32 parameters (bf16 parameters keep fp32 gradients, a different dtype), no distributed
optimizer, no overlapped reduction and no fused weight-gradient accumulation (TE writes
``main_grad`` itself), and one rank in both the data- and the expert-data-parallel groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel


def _nothing(*_: Any) -> None:
    """The gradient is already in the buffer."""


class InPlaceGradDDP(DistributedDataParallel):
    """megatron's DDP without its per-parameter gradient copy (see the module docstring)."""

    def _make_backward_post_hook(self, param: torch.nn.Parameter) -> Any:
        return _nothing


def applies(config: Any, ddp_config: Any, bf16: bool) -> bool:
    """Whether this rank's gradients may accumulate in place (after the process groups exist)."""
    return (
        not bf16
        and not ddp_config.use_distributed_optimizer
        and not ddp_config.overlap_grad_reduce
        and not getattr(config, "gradient_accumulation_fusion", False)
        and parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 1
        and parallel_state.get_expert_data_parallel_world_size() == 1
    )


def point_grads_at_buffers(chunks: Iterable[torch.nn.Module]) -> None:
    """Before a step's backward passes (after the buffers and ``.grad`` were zeroed)."""
    for chunk in chunks:
        for param in chunk.parameters():
            if param.requires_grad and hasattr(param, "main_grad"):
                param.grad = param.main_grad
