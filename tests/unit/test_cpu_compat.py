"""The megatron-core CPU layer: fails loudly when an upgrade breaks an assumption."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any

import pytest
import torch

from parallel import cpu_compat
from parallel.cpu_compat import targets


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


def test_every_patch_target_still_matches_the_installed_packages() -> None:
    """The targets table against megatron-core / DeepSpeed / torch as installed (after apply too:
    our replacements keep upstream's object as ``__wrapped__``)."""
    cpu_compat.apply()
    problems = targets.problems()
    assert not problems, "\n".join(problems)


def test_targets_table_names_real_modules_of_ours() -> None:
    rows = targets.TARGETS
    assert len({(row.target, row.patched_by) for row in rows}) == len(rows), "duplicate rows"
    for row in rows:
        assert ":" in row.target, row.target
        assert importlib.util.find_spec(row.patched_by) is not None, row.patched_by
        assert row.how in {"replace", "wrap", "scoped", "global", "override", "call", "read"}, row
    assert {f"{name}:torch" for name in cpu_compat.FACADE_MODULES} <= {row.target for row in rows}
    patched_by = {row.patched_by for row in rows}
    for ours in ("checksums", "process_hygiene", "async_writer", "deepspeed_engine", "cpu_compat.shims"):
        assert f"parallel.{ours}" in patched_by, ours


def _rows(target: str) -> tuple[targets.Target, ...]:
    return tuple(row for row in targets.TARGETS if row.target == target)


def test_a_changed_signature_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.optimizer import clip_grads

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, norm_type, use_decoupled_grad):  # noqa: ANN001, ANN202
        return None  # an upgrade added a parameter: our stand-in would not accept it

    target = "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32"
    monkeypatch.setattr(clip_grads, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)
    [problem] = targets.problems(_rows(target))
    assert target in problem and "norm_type" in problem
    assert f"megatron-core {targets.versions()['megatron-core']}" in problem
    with pytest.raises(RuntimeError, match="clip_grad_by_total_norm_fp32"):
        targets.verify(patched_by=(targets.SHIMS,))


def test_a_missing_target_and_a_changed_body_are_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.tensor_parallel import random as tp_random

    monkeypatch.delattr(tp_random, "CudaRNGStatesTracker")
    [gone] = targets.problems(_rows("megatron.core.tensor_parallel.random:CudaRNGStatesTracker"))
    assert "CudaRNGStatesTracker" in gone and "is gone" in gone

    def write_preloaded_data(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return None  # opens its files some other way: the checksums patch would write unhashed shards

    writer = filesystem_async.FileSystemWriterAsync
    monkeypatch.setattr(writer, "write_preloaded_data", staticmethod(write_preloaded_data))
    target = "megatron.core.dist_checkpointing.strategies.filesystem_async:FileSystemWriterAsync.write_preloaded_data"
    hashed = tuple(row for row in _rows(target) if row.uses)
    [changed] = targets.problems(hashed)
    assert "no longer references ['open']" in changed


def test_instance_attributes_resolve_through_init() -> None:
    resolved = targets.resolve("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.check_grad_overflow")
    assert isinstance(resolved, targets.InstanceAttribute)
    with pytest.raises(AttributeError, match="no_such_flag"):
        targets.resolve("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.no_such_flag")


def test_cpu_rng_tracker_has_every_method_of_megatrons() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    upstream = targets.upstream(tp_random.CudaRNGStatesTracker)
    for name, method in vars(upstream).items():
        if callable(method) and not name.startswith("_"):
            ours = getattr(cpu_compat._CpuRNGStatesTracker, name, None)
            assert ours is not None, f"_CpuRNGStatesTracker lacks {name}"
            assert list(inspect.signature(ours).parameters) == list(inspect.signature(method).parameters), name


def test_one_rank_all_reduce_and_the_idle_module_walk_are_skipped() -> None:
    """The facade's all_reduce returns at once over one rank (gloo would round-trip its worker thread);
    finalize_model_grads' per-step module walk runs only where it resets router state."""
    import types

    import torch.distributed as dist

    cpu_compat.apply()
    from megatron.core.optimizer import clip_grads

    facade = clip_grads.torch.distributed
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        on_meta = torch.empty(1, device="meta")  # gloo would refuse it: nothing reached gloo
        assert facade.all_reduce(on_meta) is None
        assert facade.all_reduce(on_meta, group=dist.new_group([0]), async_op=True).wait()
        calls: list[Any] = []
        real = dist.all_reduce
        dist.all_reduce = lambda *a, **k: calls.append(k["group"])  # type: ignore[assignment]
        try:  # a group of two still reduces
            two = types.SimpleNamespace(size=lambda: 2)
            facade.all_reduce(on_meta, group=two)
            assert calls == [two]
        finally:
            dist.all_reduce = real
    finally:
        dist.destroy_process_group()

    finalize = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    router = torch.nn.Module()
    router.expert_bias = torch.zeros(2)
    router.local_tokens_per_expert = torch.ones(2)
    for bias, zeroed in ((False, False), (True, True)):
        config = types.SimpleNamespace(moe_router_enable_expert_bias=bias, moe_router_load_balancing_type="aux_loss")
        router.local_tokens_per_expert.fill_(1.0)
        finalize.reset_model_temporary_tensors(config, [router])
        assert bool((router.local_tokens_per_expert == 0).all()) is zeroed


def test_moe_aux_loss_scale_of_a_bare_backward_does_not_break_the_schedule() -> None:
    """A MoE backward outside the schedule leaves megatron's aux-loss scale as a [] tensor; the schedule's
    [1] scale then replaces it instead of failing to copy into it."""
    cpu_compat.apply()
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler as scaler

    saved = scaler.main_loss_backward_scale
    try:
        scaler.main_loss_backward_scale = torch.tensor(1.0)  # what a bare backward leaves
        scaler.set_loss_scale(torch.full((1,), 0.5))
        assert scaler.main_loss_backward_scale.tolist() == [0.5]
        same = scaler.main_loss_backward_scale
        scaler.set_loss_scale(torch.full((1,), 0.25))  # the same shape: copied in place, as megatron does
        assert scaler.main_loss_backward_scale is same and same.tolist() == [0.25]
    finally:
        scaler.main_loss_backward_scale = saved
