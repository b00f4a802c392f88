"""The megatron engine's CPU/no-Apex fast paths: fused AdamW (kept across a checkpoint load) and
megatron's grad-norm fallback done with foreach kernels (same norm)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conf.cli import compose
from conf.errors import UserError
from parallel import cpu_compat


def _fused_flags(engine) -> list[tuple[bool, bool]]:  # noqa: ANN001
    inner = engine.optimizer.chained_optimizers[0].optimizer
    return [(group["fused"], group["foreach"]) for group in inner.param_groups]


def test_fused_adamw_survives_a_checkpoint_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """... and a synchronous save keeps its write results in this process (no Manager server started)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from parallel.run_config import Run
    from parallel.topology import Topology
    from pretrain.tasks.lm import build_engine

    cfg = compose(["model=tiny", "data.dir=unused", "train.lr=1e-3", "train.warmup_steps=0"])
    run = Run.from_config(cfg, world_size=1, rank=0)
    topo = run.layout
    topo.init(seed=1)
    try:
        engine = build_engine(run, 67)
        assert _fused_flags(engine) == [(True, False), (True, False)]
        tokens = torch.randint(0, 67, (4, 65))
        batch = {"tokens": tokens, "mask": torch.ones(4, 64)}
        losses = [engine.train_step([batch]).loss for _ in range(3)]
        # what an older checkpoint (saved with foreach AdamW) puts back into the param groups
        for group in engine.optimizer.chained_optimizers[0].optimizer.param_groups:
            group["fused"], group["foreach"] = None, None
        (tmp_path / "foreach").mkdir()
        monkeypatch.setattr(filesystem_async, "_results_queue", None)
        engine.save(tmp_path / "foreach", {"step": 1})
        assert filesystem_async._results_queue is None
        assert engine.load(tmp_path / "foreach")["step"] == 1
        assert _fused_flags(engine) == [(True, False), (True, False)]
        assert engine.train_step([batch]).loss < losses[1] < losses[0]  # fused steps train, also after the load
    finally:
        Topology.destroy()


def test_foreach_grad_norm_equals_the_total_l2_norm() -> None:
    cpu_compat.apply()
    from megatron.core.optimizer import clip_grads

    assert clip_grads.l2_norm_impl is cpu_compat._foreach_l2_norm  # no Apex / TE here
    grads = [torch.randn(37, 5), torch.randn(11), torch.randn(3, 3, 3)]
    norm, per_tensor = clip_grads.l2_norm_impl(2048, None, [grads], False)
    assert per_tensor is None and norm.shape == (1,)
    expected = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)


def test_lr_mult_scales_the_matching_param_group() -> None:
    from parallel.run_config import Run
    from parallel.topology import Topology
    from pretrain.tasks.lm import build_engine

    overrides = ["model=tiny", "data.dir=unused", "train.lr=1e-3", "train.warmup_steps=0", "train.lr_schedule=constant"]
    cfg = compose(overrides)
    cfg.train.lr_mult = {"*word_embeddings.*": 10.0}
    run = Run.from_config(cfg, world_size=1, rank=0)
    topo = run.layout
    topo.init(seed=1)
    try:
        engine = build_engine(run, 67)
        engine.train_step([{"tokens": torch.randint(0, 67, (4, 65)), "mask": torch.ones(4, 64)}])
        embedding = engine.model[0].module.embedding.word_embeddings.weight
        groups = engine.optimizer.chained_optimizers[0].optimizer.param_groups
        lrs = sorted((any(p is embedding for p in g["params"]), round(g["lr"], 9)) for g in groups)
        assert lrs == [(False, 1e-3), (False, 1e-3), (True, 1e-2)]  # decayed and undecayed body groups
        # biases and norms still skip weight decay next to the new group
        assert sorted({g["weight_decay"] for g in groups}) == [0.0, 0.1]
        cfg.train.lr_mult = {"*": 0.0}
        with pytest.raises(UserError, match=r"train.lr_mult.\*=0.0"):
            build_engine(Run.from_config(cfg, world_size=1, rank=0), 67)
        cfg.parallel.engine = "deepspeed"
        with pytest.raises(UserError, match="train.lr_mult: .* parallel.engine=megatron"):
            Topology.from_config(cfg, world_size=1, rank=0)
    finally:
        Topology.destroy()


def test_head_lr_mult_reaches_the_finetuning_head() -> None:
    import dataclasses

    from parallel.megatron_engine import MegatronEngine
    from parallel.run_config import Run
    from parallel.topology import Topology
    from pretrain.tasks.finetune import HEAD_PARAMS
    from pretrain.tasks.finetune_head import FinetuneGPT
    from pretrain.tasks.lm import lm_model_spec

    cfg = compose(["model=tiny", "data.dir=unused", "train.lr=1e-3", "train.warmup_steps=0"])
    cfg.train.lr_mult = {HEAD_PARAMS: 30.0}
    run = Run.from_config(cfg, world_size=1, rank=0)
    topo = run.layout
    topo.init(seed=1)
    try:
        spec = lm_model_spec(run.model, 67, 1)
        wrapped = dataclasses.replace(
            spec, build=lambda config, vp: FinetuneGPT(spec.build(config, vp), "classification", 2, 0.1, 1)
        )
        engine = MegatronEngine(run, topo, wrapped)
        head = set(map(id, engine.model[0].module.finetune_head.parameters()))
        groups = engine.optimizer.chained_optimizers[0].optimizer.param_groups
        by_lr: dict[float, set[int]] = {}
        for group in groups:
            by_lr.setdefault(round(group["lr"], 9), set()).update(id(p) for p in group["params"])
        assert by_lr.keys() == {1e-3, 3e-2} and by_lr[3e-2] == head  # head weight and bias, nothing else
    finally:
        Topology.destroy()


def test_one_rank_step_is_the_ddp_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """At one data-parallel rank gradients stay autograd's own (megatron's buffer freed, no copy, no
    one-rank reduction: ``parallel/inplace_grads.py``) and the facade skips the grad norm's one-rank
    all-reduce: losses and grad norms equal megatron's DDP path's."""
    from megatron.core.distributed import DistributedDataParallel

    from parallel import inplace_grads
    from parallel.run_config import Run
    from parallel.topology import Topology
    from pretrain.tasks.lm import build_engine

    cfg = compose(["model=tiny", "data.dir=unused", "train.lr=1e-3", "train.warmup_steps=0", "train.grad_clip=0.5"])
    torch.manual_seed(0)
    micro = [{"tokens": torch.randint(0, 67, (4, 65)), "mask": torch.ones(4, 64)} for _ in range(6)]
    batches = [micro[0:2], micro[2:4], micro[4:6]]

    def run_steps(in_place: bool) -> list[tuple[float, float]]:
        monkeypatch.setattr(inplace_grads, "applies", lambda *_: in_place)
        run = Run.from_config(cfg, world_size=1, rank=0)
        run.layout.init(seed=1)
        try:
            engine = build_engine(run, 67)
            assert engine.inplace_grads is in_place
            assert (type(engine.model[0]) is DistributedDataParallel) is not in_place
            results = [engine.train_step(micro) for micro in batches]
            if in_place:  # autograd's own gradients; megatron's buffer freed
                params = list(engine.model[0].module.parameters())
                assert all(p.grad is not None and not hasattr(p, "main_grad") for p in params)
                assert all(b.grad_data.untyped_storage().size() == 0 for b in engine.model[0].buffers)
            return [(r.loss, r.grad_norm) for r in results]
        finally:
            Topology.destroy()

    in_place, ddp = run_steps(True), run_steps(False)
    assert in_place == ddp
    assert ddp[0][1] > 0.5  # clipping took place, so the clipped path is compared too
