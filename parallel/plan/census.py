"""Measure what the memory model predicts, on a real engine: a census of the live tensors
(parameters, gradients, optimizer state) and the bytes saved for backward.

Used by ``benchmarks/plan_accuracy.py`` and the tests; nothing here runs in a training job. Every
count is per storage (a view costs nothing), because that is what the allocator holds.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


def _storages(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and not t.is_meta and t.device.type != "meta":
            st = t.untyped_storage()
            if st.nbytes():
                out[st.data_ptr()] = st.nbytes()
    return out


def _tensors_in(obj: Any, depth: int = 3) -> Iterator[torch.Tensor]:
    """Tensors reachable from ``obj`` through lists, tuples, dicts and attributes (``depth`` levels)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth == 0:
        return
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value, depth - 1)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors_in(value, depth - 1)


def live_storages() -> dict[int, int]:
    """Every live tensor storage of this process (gc's view after a collection; storages counted once)."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        return _storages(o for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside megatron's (chained / mixed precision / distributed) or ZeRO's wrappers."""
    found = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        if isinstance(inner, torch.optim.Optimizer):
            found.append(inner)
    return found


def _optimizer_storages(optimizer: Any, params: dict[int, int]) -> dict[int, int]:
    """Adam state tensors and the master copies the param groups hold (those not the model's own)."""
    out: dict[int, int] = {}
    for inner in _inner_optimizers(optimizer):
        out.update(_storages(v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)))
        groups = [p for g in inner.param_groups for p in g["params"]]
        out.update({k: v for k, v in _storages(groups).items() if k not in params})
    return out


def megatron_census(engine: Any) -> dict[str, int]:
    """params / grads / optimizer / other bytes of a ``MegatronEngine`` (all live storages sorted
    into the three; ``other`` is everything else alive: buffers, batches, caches)."""
    params = _storages(p for chunk in engine.model for p in chunk.parameters())
    grads = _storages(b.grad_data for chunk in engine.model for b in getattr(chunk, "buffers", []))
    grads.update(
        {
            k: v
            for k, v in _storages(
                g for chunk in engine.model for p in chunk.parameters() for g in (p.grad, getattr(p, "main_grad", None))
            ).items()
            if k not in params
        }
    )
    optimizer = {k: v for k, v in _optimizer_storages(engine.optimizer, params).items() if k not in grads}
    return _summary(params, grads, optimizer)


def deepspeed_census(engine: Any) -> dict[str, int]:
    """The same for a ``DeepSpeedEngine`` (ZeRO 0-3, offload): parameters are the module's own
    (ZeRO-3: each one's partition ``ds_tensor``; persistent ones whole), the optimizer's are the
    fp32 partitions and Adam state, gradients everything the ZeRO optimizer object holds besides."""
    module, zero = engine.engine.module, engine.engine.optimizer
    params = _storages(getattr(p, "ds_tensor", p) for p in module.parameters())
    params.update(_storages(p.data for p in module.parameters()))
    optimizer = _optimizer_storages(zero, params)
    held = _storages(_tensors_in(list(vars(zero).values()), depth=4))
    inner = [p for opt in _inner_optimizers(zero) for g in opt.param_groups for p in g["params"]]
    held.update(_storages(p.grad for p in [*inner, *module.parameters()] if p.grad is not None))
    grads = {k: v for k, v in held.items() if k not in params and k not in optimizer}
    return _summary(params, grads, optimizer)


def _summary(params: dict[int, int], grads: dict[int, int], optimizer: dict[int, int]) -> dict[str, int]:
    alive = live_storages()
    known = {**params, **grads, **optimizer}
    return {
        "params": sum(params.values()),
        "grads": sum(grads.values()),
        "optimizer": sum(optimizer.values()),
        "other": sum(v for k, v in alive.items() if k not in known),
    }


class AtOptimizerStep:
    """Run ``take()`` once, when the first torch optimizer step after :meth:`arm` begins: Adam's
    state exists (from the step before), the gradients are reduced and the master copies alive,
    the model states' peak. (ZeRO steps its param groups one at a time: this is the first.)"""

    def __init__(self, take: Any):
        self.take, self.armed, self.result = take, False, {}

    def arm(self) -> None:
        self.armed = True

    def _hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.armed and not self.result:
            self.result.update(self.take())

    @contextlib.contextmanager
    def installed(self) -> Iterator[AtOptimizerStep]:
        handle = register_optimizer_step_pre_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()


class SavedTensors:
    """Peak bytes autograd holds for backward (``saved_tensors_hooks``), storages counted once and
    released when the last saved reference to them is, parameters excluded (model states)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = set(_storages(exclude))
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0
        self.log: list[tuple[int, tuple[int, ...], str]] | None = None  # set to a list: each new storage

    class _Held:
        __slots__ = ("owner", "ptr", "tensor")

        def __init__(self, owner: SavedTensors, ptr: int, tensor: torch.Tensor):
            self.owner, self.ptr, self.tensor = owner, ptr, tensor

        def __del__(self) -> None:
            entry = self.owner.live[self.ptr]
            entry[0] -= 1
            if entry[0] == 0:
                self.owner.current -= entry[1]
                del self.owner.live[self.ptr]

    def pack(self, tensor: torch.Tensor) -> Any:
        st = tensor.untyped_storage()
        ptr, nbytes = st.data_ptr(), st.nbytes()
        if not nbytes or ptr in self.exclude:
            return tensor
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            if self.log is not None:
                self.log.append((nbytes, tuple(tensor.shape), type(tensor.grad_fn).__name__))
        else:
            entry[0] += 1
        return SavedTensors._Held(self, ptr, tensor)

    @staticmethod
    def unpack(held: Any) -> torch.Tensor:
        return held.tensor if isinstance(held, SavedTensors._Held) else held

    @contextlib.contextmanager
    def track(self) -> Iterator[SavedTensors]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self
