"""Fixes of megatron-core code for the pinned version range, applied on CPU and GPU alike.

They concern the path megatron-core takes without Apex or Transformer Engine (torch's
AdamW, its pure-PyTorch grad-norm fallback), which is not CPU-specific: a GPU install
without those takes it too. Each is idempotent and checks it still faces the code it was
written for (the rows of :mod:`parallel.cpu_compat.targets`); replacements keep the
original as ``__wrapped__``.
"""

from __future__ import annotations

from typing import Any

import torch


def _fix_torch_adam_reshard_load() -> None:
    """Two megatron-core 0.16 bugs on the torch-AdamW path (no Apex/TE), CPU or GPU.

    Version fix, not a shim: the bugs are in megatron's optimizer-state bookkeeping, on any device.

    1. Loading a ``fully_reshardable`` distributed-optimizer checkpoint copies every
       entry of the optimizer state, but torch's AdamW keeps ``step`` there and the
       checkpoint (rightly) carries it in the param groups: ``KeyError: 'step'``. Copy
       only the tensors the checkpoint provides.
    2. ``DistributedOptimizer.load_state_dict`` gives every parameter the *same* ``step``
       tensor; torch's AdamW increments it in place once per parameter, so after a
       resume Adam's bias correction runs N times too fast. Give each its own copy.
    """
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "_gpt_fixed", False) or getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return

    def set_states(self: Any, model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            destination[key].copy_(value)

    original_load = cls.load_state_dict

    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    set_states._gpt_fixed = True  # type: ignore[attr-defined]
    set_states.__wrapped__ = original  # type: ignore[attr-defined]
    load_state_dict.__wrapped__ = original_load  # type: ignore[attr-defined]
    cls._set_main_param_and_optimizer_states = set_states
    cls.load_state_dict = load_state_dict


def _foreach_l2_norm(_chunk_size: int, _noop: Any, tensor_lists: list, _per_tensor: bool, *_: Any) -> tuple:
    """megatron's no-Apex/TE stand-in for ``amp_C.multi_tensor_l2norm``, with ``_foreach_norm``.

    megatron's own fallback takes one ``torch.norm`` per tensor, gathers them through
    ``torch.tensor(list)`` and ``float()`` (a host sync on GPU); this is one foreach kernel
    and one stack, and the result stays on the grads' device.
    """
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1).float(), None


def _use_foreach_grad_norm() -> None:
    """Replace megatron's per-tensor grad-norm fallback (used when neither Apex nor TE is there).

    Version fix, not a shim: megatron takes that fallback on any device without Apex/TE.
    """
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if getattr(clip_grads, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm


def _define_missing_te_gemm() -> None:
    """megatron-core 0.16's MoE router reads ``te_general_gemm`` to choose its gating matmul, but
    its import fallback without Transformer Engine never defines the name: the first MoE forward
    fails with ``NameError``. None is what the code tests for (then it uses ``torch.mm``).

    Version fix, not a shim: any install without Transformer Engine takes that path, CPU or GPU.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _skip_idle_module_walk() -> None:
    """``finalize_model_grads`` walks every module of every model chunk after each step's backward
    (``reset_model_temporary_tensors``) to reset MoE router state that only the aux-loss-free expert
    bias and the global auxiliary loss keep; without either the walk does nothing, so it is skipped.

    Version fix, not a shim: the walk is Python work on the step's path on any device.
    """
    import importlib

    module = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    original = module.reset_model_temporary_tensors
    if getattr(original, "_gpt_fixed", False):
        return

    def reset_model_temporary_tensors(config: Any, model: list) -> None:
        balancing = config.moe_router_load_balancing_type
        if config.moe_router_enable_expert_bias or "global_aux_loss" in balancing:
            original(config, model)

    reset_model_temporary_tensors._gpt_fixed = True  # type: ignore[attr-defined]
    reset_model_temporary_tensors.__wrapped__ = original  # type: ignore[attr-defined]
    module.reset_model_temporary_tensors = reset_model_temporary_tensors


def _fix_moe_aux_loss_scale_shape() -> None:
    """megatron-core 0.16's MoE aux-loss scale has two first values of different shapes: a backward
    pass outside the pipeline schedule (a bare training step, as in a benchmark or a test) creates it
    as ``torch.tensor(1.0)`` (shape []), the schedule's ``set_loss_scale`` as its ``[1]`` argument, and
    later copies into it: after the former, every scheduled MoE step fails with "output with shape []
    doesn't match the broadcast shape [1]". A scale of another shape is replaced instead of copied into.

    Version fix, not a shim: the shapes differ on any device.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler as scaler

    original = scaler.set_loss_scale
    if getattr(original, "_gpt_fixed", False):
        return

    def set_loss_scale(scale: torch.Tensor) -> None:
        current = scaler.main_loss_backward_scale
        if current is not None and current.shape != scale.shape:
            scaler.main_loss_backward_scale = None  # megatron's own first-value path takes ``scale``
        original(scale)

    set_loss_scale._gpt_fixed = True  # type: ignore[attr-defined]
    set_loss_scale.__wrapped__ = original  # type: ignore[attr-defined]
    scaler.set_loss_scale = staticmethod(set_loss_scale)


def apply() -> None:
    """Apply every fix once (each is idempotent)."""
    _fix_torch_adam_reshard_load()
    _use_foreach_grad_norm()
    _define_missing_te_gemm()
    _skip_idle_module_walk()
    _fix_moe_aux_loss_scale_shape()
