"""CPU-only shims: megatron-core's CUDA assumptions that have nothing to do with the maths.

Scratch buffers allocated on ``torch.cuda.current_device()``, scalar flags created with
``device='cuda'``, an RNG tracker built on the CUDA generator, a causal mask built on
``"cuda"`` and ``param.type() == 'torch.cuda.FloatTensor'`` checks. Each shim fixes exactly
one of those, and :func:`apply` installs them only when CUDA is absent (``force`` aside):
with CUDA, megatron's own code is right and runs untouched.

Why a ``torch`` facade per module instead of patching ``torch.cuda`` globally: the facade
only changes what *those* megatron modules see (their global name ``torch``), so the rest
of the process, the model's hot path included, pays nothing and cannot be confused into
believing CUDA exists. Replacements keep upstream's object as ``__wrapped__``, which
:mod:`parallel.cpu_compat.targets` follows to check upstream's signatures.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Iterator
from typing import Any

import torch

from parallel.cpu_compat.targets import FACADE_MODULES


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

    @staticmethod
    def Stream(*_: Any, **__: Any) -> _CpuStream:  # noqa: N802 - torch.cuda's name
        return _CPU_STREAM

    @staticmethod
    def current_stream(*_: Any, **__: Any) -> _CpuStream:
        return _CPU_STREAM

    @staticmethod
    def stream(_: Any) -> contextlib.nullcontext:
        return contextlib.nullcontext()


class _CpuStream:
    """The one "stream" of the CPU: work is done when a call returns, so waits and events are no-ops
    (megatron's all-to-all dispatcher copies token counts to the host on a CUDA side stream)."""

    def wait_stream(self, _: Any) -> None:
        return None

    def record_event(self, *_: Any) -> _CpuStream:
        return self

    def synchronize(self) -> None:
        return None


_CPU_STREAM = _CpuStream()


class _Done:
    """The handle of a collective that had nothing to do."""

    def wait(self, *_: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


_DONE = _Done()


class _GlooDistributed(types.ModuleType):
    """``torch.distributed`` as seen by the facade modules: ``all_gather`` of tensors whose first
    dimensions differ (megatron's all-to-all MoE dispatcher gathers each tensor-parallel rank's
    routed tokens) pads them to the longest and cuts the results back; gloo refuses uneven sizes.
    ``all_reduce`` over a group of one rank returns at once: it is the identity, and gloo takes a
    round trip through its worker thread for it (megatron reduces the grad norm, and the MoE
    router its load statistics, over groups that have one rank at tp = pp = dp = 1).

    CPU shim: NCCL gathers uneven tensors itself, and megatron calls it directly on GPU.
    """

    def __init__(self) -> None:
        super().__init__("torch.distributed")
        self.__dict__.update({k: v for k, v in vars(torch.distributed).items() if not k.startswith("__")})
        self.all_gather = self._all_gather
        self.all_reduce = self._all_reduce

    @staticmethod
    def _all_reduce(tensor: torch.Tensor, op: Any = None, group: Any = None, async_op: bool = False) -> Any:
        size = group.size() if group is not None else torch.distributed.get_world_size()
        if size == 1:
            return _DONE if async_op else None
        op = torch.distributed.ReduceOp.SUM if op is None else op
        return torch.distributed.all_reduce(tensor, op=op, group=group, async_op=async_op)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.distributed, name)

    @staticmethod
    def _all_gather(
        tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Any = None, async_op: bool = False
    ) -> Any:
        if async_op or all(t.shape == tensor.shape for t in tensor_list):
            return torch.distributed.all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        torch.distributed.all_gather(gathered, padded, group=group)
        for out, got in zip(tensor_list, gathered, strict=True):
            out.copy_(got[: out.shape[0]])
        return None


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by one megatron module: ``device='cuda'`` means CPU.

    CPU shim: with CUDA those modules' buffers and flags belong on the GPU, as megatron puts them.
    """

    def __init__(self) -> None:
        super().__init__("torch")
        # plain dict hits for everything torch already has: no __getattr__ on the hot path
        self.__dict__.update({k: v for k, v in vars(torch).items() if not k.startswith("__")})
        for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like"):
            setattr(self, name, _wrap_factory(getattr(torch, name)))
        self.cuda = _CpuCuda()
        self.distributed = _GlooDistributed()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _CpuRNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` using the CPU generator.

    Megatron forks a named RNG stream for model-parallel regions (dropout inside
    TP regions) so that TP ranks draw different masks; the CPU generator serves
    the same purpose here.

    CPU shim: with CUDA megatron's tracker (the CUDA generator) is the right one.
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


def _clip_grad_by_total_norm_fp32(original: Any) -> Any:
    """megatron's version asserts ``grad.type() == 'torch.cuda.FloatTensor'``.

    CPU shim: only a CPU tensor fails that assertion; on GPU megatron's own clip runs.
    """

    def clip_grad_by_total_norm_fp32(
        parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
    ) -> None:
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grad_by_total_norm_fp32.__wrapped__ = original  # type: ignore[attr-defined]
    return clip_grad_by_total_norm_fp32


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
    around the training step.

    CPU shim: a no-op with CUDA, where those tensors are CUDA tensors.
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


def _no_cuda_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _keep_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    return None


def _host_split_sizes(original: Any) -> Any:
    """megatron's all-to-all dispatcher copies its token counts from the GPU to the host as numpy
    arrays, the split sizes of ``all_to_all_single``; it converts only CUDA tensors, so on the CPU
    the counts stay tensors, which ``all_to_all_single`` refuses as split sizes.

    CPU shim: with CUDA the counts are CUDA tensors and megatron's own copy runs.
    """

    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy, record_stream)

    maybe_move_tensor_to_cpu.__wrapped__ = original  # type: ignore[attr-defined]
    return maybe_move_tensor_to_cpu


def apply() -> None:
    """Install the shims (the caller decides that CUDA is absent, or forces them)."""
    facade = _CpuTorch()
    for name in FACADE_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(f"cpu_compat: {name} no longer imports torch as 'torch'")
        module.torch = facade

    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import token_dispatcher

    if not hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        raise RuntimeError(
            "cpu_compat: megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu is gone"
        )
    token_dispatcher.maybe_move_tensor_to_cpu = _host_split_sizes(token_dispatcher.maybe_move_tensor_to_cpu)

    for module in (clip_grads, optimizer):
        if not hasattr(module, "clip_grad_by_total_norm_fp32"):
            raise RuntimeError(f"cpu_compat: {module.__name__}.clip_grad_by_total_norm_fp32 is gone")
        module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32(module.clip_grad_by_total_norm_fp32)
    # activation recomputation saves and replays the RNG states: on CPU the default generator's is
    # all there is (megatron saves it too), so the CUDA generator's state is an empty placeholder
    for name, replacement in (("_get_cuda_rng_state", _no_cuda_rng_state), ("_set_cuda_rng_state", _keep_rng_state)):
        if not hasattr(tp_random, name):
            raise RuntimeError(f"cpu_compat: megatron.core.tensor_parallel.random.{name} is gone")
        replacement.__wrapped__ = getattr(tp_random, name)  # type: ignore[attr-defined]
        setattr(tp_random, name, replacement)
    if not hasattr(tp_random, "CudaRNGStatesTracker"):
        raise RuntimeError("cpu_compat: megatron.core.tensor_parallel.random.CudaRNGStatesTracker is gone")
    _CpuRNGStatesTracker.__wrapped__ = tp_random.CudaRNGStatesTracker  # type: ignore[attr-defined]
    tp_random.CudaRNGStatesTracker = _CpuRNGStatesTracker
    tp_random.initialize_rng_tracker(force_reset=True)
