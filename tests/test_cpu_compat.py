"""The megatron-core CPU layer: fails loudly when an upgrade breaks an assumption."""

from __future__ import annotations

import importlib

import pytest
import torch

from parallel import cpu_compat


def test_version_is_in_the_tested_range() -> None:
    assert cpu_compat.check_version() == (0, 16)


def test_untested_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata as md

    monkeypatch.setattr(md, "version", lambda name: "0.17.0")
    with pytest.raises(RuntimeError, match="tested with megatron-core 0.16"):
        cpu_compat.check_version()


def test_patched_modules_still_have_what_we_patch() -> None:
    """Each module the facade replaces must still import torch by that name."""
    for name in cpu_compat.FACADE_MODULES:
        module = importlib.import_module(name)
        assert hasattr(module, "torch"), name
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as tp_random

    assert hasattr(clip_grads, "clip_grad_by_total_norm_fp32")
    assert hasattr(optimizer, "clip_grad_by_total_norm_fp32")
    assert hasattr(tp_random, "initialize_rng_tracker")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is a no-op with CUDA")
def test_apply_patches_only_the_listed_modules() -> None:
    assert cpu_compat.apply()
    from megatron.core import utils
    from megatron.core.transformer.utils import get_default_causal_mask

    assert isinstance(utils.torch, cpu_compat._CpuTorch)
    assert get_default_causal_mask(4).device.type == "cpu"
    assert get_default_causal_mask(4).tolist()[0] == [False, True, True, True]
    buffer = utils.GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x")
    assert buffer.device.type == "cpu"
    # the rest of the process keeps the real torch
    assert torch.cuda.is_available() is False and importlib.import_module("torch") is torch


def test_rng_tracker_forks_a_separate_stream() -> None:
    cpu_compat.apply()
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advanced
    tracker.set_states({"model-parallel-rng": tracker.get_states()["model-parallel-rng"]})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is a no-op with CUDA")
def test_tensors_pass_as_cuda_is_scoped() -> None:
    t = torch.zeros(1)
    with cpu_compat.tensors_pass_as_cuda():
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float64).dtype == torch.float64
        assert t.cuda() is t
    assert t.type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        t.cuda()
