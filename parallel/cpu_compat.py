"""Make megatron-core run on CPU-only machines (gloo backend).

megatron-core assumes CUDA in a handful of places that have nothing to do with
the maths: scratch buffers allocated on ``torch.cuda.current_device()``, scalar
flags created with ``device='cuda'``, an RNG tracker built on the CUDA generator,
a causal mask built on ``"cuda"`` and ``param.type() == 'torch.cuda.FloatTensor'``
checks. Each patch below fixes exactly one of those, only when CUDA is absent,
and only for the megatron-core range it was tested against: on another version
:func:`apply` raises instead of silently running half-patched code.

Why a ``torch`` facade per module instead of patching ``torch.cuda`` globally:
the facade only changes what *those* megatron modules see (their global name
``torch``), so the rest of the process, the model's hot path included, pays
nothing and cannot be confused into believing CUDA exists.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Iterator
from typing import Any

import torch

TESTED_MEGATRON = ((0, 16), (0, 17))  # [low, high) of (major, minor)

# Modules whose global ``torch`` is replaced by the CPU facade: they only use
# CUDA to place small buffers/flags or to synchronise.
FACADE_MODULES = (
    "megatron.core.utils",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.transformer.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
)

_applied = False


def _cpu_device(device: Any) -> Any:
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        return torch.device("cpu")
    return device


def _wrap_factory(fn: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return factory


class _CpuCuda(types.SimpleNamespace):
    """The parts of ``torch.cuda`` megatron touches for placement and syncing."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_: Any, **__: Any) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def is_available() -> bool:
        return False


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by one megatron module: ``device='cuda'`` means CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        # plain dict hits for everything torch already has: no __getattr__ on the hot path
        self.__dict__.update({k: v for k, v in vars(torch).items() if not k.startswith("__")})
        for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like"):
            setattr(self, name, _wrap_factory(getattr(torch, name)))
        self.cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _CpuRNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` using the CPU generator.

    Megatron forks a named RNG stream for model-parallel regions (dropout inside
    TP regions) so that TP ranks draw different masks; the CPU generator serves
    the same purpose here.
    """

    def __init__(self, *_: Any, **__: Any) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _clip_grad_by_total_norm_fp32(
    parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """megatron's version asserts ``grad.type() == 'torch.cuda.FloatTensor'``."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _foreach_l2_norm(_chunk_size: int, _noop: Any, tensor_lists: list, _per_tensor: bool, *_: Any) -> tuple:
    """megatron's no-Apex/TE stand-in for ``amp_C.multi_tensor_l2norm``, with ``_foreach_norm``.

    megatron's own fallback takes one ``torch.norm`` per tensor, gathers them through
    ``torch.tensor(list)`` and ``float()`` (a host sync on GPU); this is one foreach kernel
    and one stack, and the result stays on the grads' device.
    """
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1).float(), None


def _use_foreach_grad_norm() -> None:
    """Replace megatron's per-tensor grad-norm fallback (used when neither Apex nor TE is there)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if getattr(clip_grads, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def tensors_pass_as_cuda() -> Iterator[None]:
    """While megatron builds models/optimizers or (re)shards checkpoints, let CPU tensors pass.

    These one-time steps assume CUDA: the optimizers sort parameters into fp32/fp16
    groups by comparing ``param.type()`` with CUDA type strings; tied embeddings under
    pipeline parallelism are moved with ``weight.data.cuda()`` before their first
    all-reduce; the distributed optimizer gathers its shards with ``.cuda()`` tensors
    when it writes model-space checkpoints. Within this context ``Tensor.type()``
    reports the CUDA name and ``Tensor.cuda()`` returns the tensor itself. Never used
    around the training step; a no-op with CUDA.
    """
    if torch.cuda.is_available():
        yield
        return
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original_type(self, *args, **kwargs)
        if not args and not kwargs:
            return _CUDA_TYPE_NAMES.get(result, result)
        return result

    def cuda(self: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        return self

    torch.Tensor.type = type_  # type: ignore[method-assign]
    torch.Tensor.cuda = cuda  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original_type  # type: ignore[method-assign]
        torch.Tensor.cuda = original_cuda  # type: ignore[method-assign]


def check_version() -> tuple[int, int]:
    """Refuse megatron-core versions the patches were not tested against."""
    from importlib.metadata import version

    text = version("megatron-core")
    major_minor = tuple(int(x) for x in text.split(".")[:2])
    low, high = TESTED_MEGATRON
    if not (low <= major_minor < high):
        raise RuntimeError(
            f"parallel/cpu_compat.py was tested with megatron-core {low[0]}.{low[1]}.x; "
            f"found {text}. Re-run tests/test_cpu_compat.py and update TESTED_MEGATRON."
        )
    return major_minor  # type: ignore[return-value]


def _fix_torch_adam_reshard_load() -> None:
    """Two megatron-core 0.16 bugs on the torch-AdamW path (no Apex/TE), CPU or GPU.

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
    cls._set_main_param_and_optimizer_states = set_states
    cls.load_state_dict = load_state_dict


def apply(force: bool = False) -> bool:
    """Apply the patches once: the CPU ones only when CUDA is absent (unless forced)."""
    global _applied
    if _applied:
        return True
    check_version()
    _fix_torch_adam_reshard_load()
    _use_foreach_grad_norm()
    if torch.cuda.is_available() and not force:
        return False
    facade = _CpuTorch()
    for name in FACADE_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(f"cpu_compat: {name} no longer imports torch as 'torch'")
        module.torch = facade

    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as tp_random

    for module in (clip_grads, optimizer):
        if not hasattr(module, "clip_grad_by_total_norm_fp32"):
            raise RuntimeError(f"cpu_compat: {module.__name__}.clip_grad_by_total_norm_fp32 is gone")
        module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    if not hasattr(tp_random, "CudaRNGStatesTracker"):
        raise RuntimeError("cpu_compat: megatron.core.tensor_parallel.random.CudaRNGStatesTracker is gone")
    tp_random.CudaRNGStatesTracker = _CpuRNGStatesTracker
    tp_random.initialize_rng_tracker(force_reset=True)
    _applied = True
    return True


def is_applied() -> bool:
    return _applied
