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

With one rank the step's gradient "reduction" is the identity as well (an all-reduce over a
group of one, scaled by 1.0), so :meth:`InPlaceGradDDP.finish_grad_sync` skips it, and the
``.grad`` views stay in place across steps: zeroing the buffer zeroes them, so the optimizer's
``zero_grad`` (which drops them) is not called and they are not pointed again every step.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel


def _nothing(*_: Any) -> None:
    """The gradient is already in the buffer."""


class InPlaceGradDDP(DistributedDataParallel):
    """megatron's DDP without its per-parameter gradient copy (see the module docstring)."""

    _grad_views: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None
    _identity_sync: bool | None = None

    def _make_backward_post_hook(self, param: torch.nn.Parameter) -> Any:
        return _nothing

    def point_grads_at_buffers(self) -> None:
        """Before a step's backward passes: every trainable ``param.grad`` is its ``main_grad`` view.

        The pairs are listed once (the buffers live as long as this wrapper); a later step only
        checks that nothing replaced a ``.grad`` (a checkpoint load does not).
        """
        if self._grad_views is None:
            params = self.module.parameters()
            self._grad_views = [(p, p.main_grad) for p in params if p.requires_grad and hasattr(p, "main_grad")]
        for param, view in self._grad_views:
            if param.grad is not view:
                param.grad = view

    def finish_grad_sync(self, force_all_reduce: bool | None = False) -> None:
        """Nothing to reduce at one rank unless a bucket rescales or checks its gradients."""
        if not self._sync_is_identity():
            super().finish_grad_sync(force_all_reduce=force_all_reduce)

    def _sync_is_identity(self) -> bool:
        if self._identity_sync is None:
            checks = self.ddp_config.check_for_nan_in_grad or self.ddp_config.check_for_large_grads
            buckets = [b for g in self.bucket_groups + self.expert_parallel_bucket_groups for b in g.buckets]
            self._identity_sync = not checks and all(b.gradient_scaling_factor == 1.0 for b in buckets)
        return self._identity_sync


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
