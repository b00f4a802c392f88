"""At one data-parallel rank, gradients are autograd's own, as in a bare PyTorch loop.

megatron-core's DDP keeps every gradient in a contiguous buffer (``param.main_grad`` views) for its
bucketed reductions: each step zeroes the buffer, and a hook on each parameter's gradient
accumulator adds the gradient autograd made into its view (``main_grad.add_(grad)``) and drops it —
per parameter and micro-batch one Python hook, one fresh gradient tensor and one extra pass; the
optimizer then points ``param.grad`` at the views. With one rank in the data- and expert-data-parallel
groups nothing is reduced between ranks, so the buffer has no reader: :class:`InPlaceGradDDP` frees
it and drops the ``main_grad`` views, its hooks do nothing, and each step starts with ``.grad = None``.
Autograd then hands each parameter its first micro-batch's gradient and adds the others into it — the
same sum in the same order as the buffer's (which started at zero), so losses and gradient norms equal
megatron's path. megatron's optimizer and ``finalize_model_grads`` read ``param.grad`` where a
parameter has no ``main_grad`` (tied embeddings over pipeline stages, layer norms under sequence
parallelism), and the step's own reduction (an all-reduce over a group of one, scaled by 1.0) is
skipped. Used only where that holds: fp32 parameters (bf16 parameters keep fp32 gradients in the
buffer), no distributed optimizer (it reads the buffer), no overlapped reduction, no fused
weight-gradient accumulation (TE writes ``main_grad`` itself).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel


def _nothing(*_: Any) -> None:
    """autograd accumulates the gradient in ``param.grad`` itself."""


class InPlaceGradDDP(DistributedDataParallel):
    """megatron's DDP at one rank: no gradient buffer, no per-parameter copy (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        checks = self.ddp_config.check_for_nan_in_grad or self.ddp_config.check_for_large_grads
        buckets = [b for g in self.bucket_groups + self.expert_parallel_bucket_groups for b in g.buckets]
        if checks or any(b.gradient_scaling_factor != 1.0 for b in buckets):
            raise RuntimeError("inplace_grads: a bucket rescales or checks its gradients; use megatron's DDP")
        self._trainable = [p for p in self.module.parameters() if hasattr(p, "main_grad")]
        for param in self._trainable:
            del param.main_grad
        for buffer in self.buffers + self.expert_parallel_buffers:
            # every view of it (buckets, the dropped main_grad) now fails loudly if anything reads it
            buffer.grad_data.untyped_storage().resize_(0)

    def _make_backward_post_hook(self, param: torch.nn.Parameter) -> Any:
        return _nothing

    def zero_grad_buffer(self) -> None:
        """Each step starts without gradients (autograd's first accumulation takes its tensor)."""
        for param in self._trainable:
            param.grad = None

    def finish_grad_sync(self, force_all_reduce: bool | None = False) -> None:
        """Nothing to reduce at one rank (the buckets' factors are 1.0, checked at construction)."""

    def scale_gradients(self, scaling_factor: float) -> None:
        """Per-token loss normalisation (``finalize_model_grads`` with ``num_tokens``) scales ``.grad``."""
        grads = [p.grad for p in self._trainable if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scaling_factor)


def applies(config: Any, ddp_config: Any, bf16: bool) -> bool:
    """Whether this rank's gradients may stay autograd's own (after the process groups exist)."""
    return (
        not bf16
        and not ddp_config.use_distributed_optimizer
        and not ddp_config.overlap_grad_reduce
        and not getattr(config, "gradient_accumulation_fusion", False)
        and parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 1
        and parallel_state.get_expert_data_parallel_world_size() == 1
    )
