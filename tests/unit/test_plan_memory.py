"""The planner's memory model against what a built model and a real engine hold (issue #20).

The full comparison (every parity layout, ZeRO 0-3 and offload, the activation matrix) is
``benchmarks/plan_accuracy.py``; these are its cheapest representatives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conf.cli import compose
from parallel.plan import chunks, estimate_memory
from parallel.plan.census import AtOptimizerStep, SavedTensors, megatron_census
from parallel.plan.memory import stage_saved_peak
from parallel.plan.params import Shape
from parallel.run_config import Run
from parallel.topology import Topology
from tests.conftest import REPO
from tests.distributed import free_port

VOCAB = 65
# MoE and dense layers interleaved, with a shared expert
MOE = ["model=moe-tiny", "model.moe_layer_freq=2", "model.moe_shared_expert_size=64"]


@pytest.fixture(scope="module")
def single_process():  # noqa: ANN201
    run = Run.from_config(compose(["model=tiny", "data.dir=unused"]), world_size=1, rank=0)
    topo = run.layout
    topo.init(seed=1)
    yield topo
    Topology.destroy()


def built(overrides: list[str]) -> tuple[object, torch.nn.Module]:
    from pretrain.model import build_gpt, transformer_config

    cfg = Run.from_config(compose(["data.dir=unused", *overrides]), world_size=1, rank=0)
    return cfg, build_gpt(cfg.model, VOCAB, transformer_config(cfg.model))


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=tiny"],
        ["model=llama-tiny"],
        ["model=tiny", "model.qk_norm=true", "model.tie_embeddings=false"],
        MOE,
    ],
)
def test_parameters_from_the_shapes_are_the_built_models(single_process, overrides: list[str]) -> None:  # noqa: ANN001
    """Names, shapes and order of every parameter, as megatron-core's GPTModel builds them."""
    cfg, model = built(overrides)
    listed = chunks(Shape.from_config(cfg.model, VOCAB), tp=1, pp=1, vpp=1)[0][0].params
    assert listed == [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def test_stage_split_keeps_every_parameter_once_and_the_tied_copy() -> None:
    """pp=2 x vpp=2: embeddings on the first chunk, the output layer's copy of a tied embedding on
    the last, every layer once; tp=2 halves the split matrices and keeps row-parallel biases."""
    shape = Shape.from_config(compose(["model=tiny", "data.dir=unused"]).model, VOCAB)
    whole = chunks(shape, 1, 1, 1)[0][0]
    split = [c for stage in chunks(shape, 1, 2, 2) for c in stage]
    assert [c.layers for c in split] == [1, 1, 1, 1] and split[0].pre_process and split[-1].post_process
    tied_copy = shape.vocab * shape.hidden
    assert sum(c.numel for c in split) == whole.numel + tied_copy
    tp2 = dict(chunks(shape, 2, 1, 1)[0][0].params)
    assert tp2["decoder.layers.0.self_attention.linear_qkv.weight"] == (3 * shape.hidden // 2, shape.hidden)
    assert tp2["decoder.layers.0.self_attention.linear_proj.bias"] == (shape.hidden,)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_activation_estimate_is_the_saved_tensor_peak(single_process, recompute: str) -> None:  # noqa: ANN001
    """Bytes saved for backward over one micro-batch (saved_tensors_hooks, per storage) vs the estimate."""
    from pretrain.model import position_ids

    cfg, model = built(["model=tiny", f"model.recompute={recompute}", "train.micro_batch=2", "train.global_batch=2"])
    tokens = torch.randint(0, VOCAB, (2, cfg.model.seq_len + 1))
    mask = torch.ones(2, cfg.model.seq_len)
    tracker = SavedTensors(exclude=list(model.parameters()))
    with tracker.track():
        per_token = model(tokens[:, :-1], position_ids(2, cfg.model.seq_len), None, labels=tokens[:, 1:])
        (per_token * mask).sum().backward()
    estimate = stage_saved_peak(cfg, single_process, 0, VOCAB, int(cfg.model.seq_len))
    assert estimate == pytest.approx(tracker.peak, rel=0.01)


def test_model_states_are_the_census_of_a_single_process_engine(single_process) -> None:  # noqa: ANN001
    """Parameters, gradient buffer and Adam state of a real megatron engine after a step (exact)."""
    from pretrain.tasks.lm import build_engine

    overrides = ["model=tiny", "data.dir=unused", "train.micro_batch=2", "train.global_batch=2"]
    cfg = Run.from_config(compose(overrides), 1, 0)
    engine = build_engine(cfg, VOCAB)
    batch = [{"tokens": torch.randint(0, VOCAB, (2, 65)), "mask": torch.ones(2, 64)}]
    probe = AtOptimizerStep(lambda: megatron_census(engine))
    with probe.installed():
        engine.train_step(batch)
        probe.arm()
        engine.train_step(batch)
    rank = estimate_memory(cfg, single_process, vocab_size=VOCAB, seq_len=64).largest
    for kind in ("params", "grads", "optimizer"):
        assert getattr(rank, kind) == probe.result[kind], kind


def test_pipeline_stages_census_and_in_flight_activations(tmp_path: Path) -> None:
    """Two ranks (gloo), pp=2 with the distributed optimizer's padded buffers: each stage's model states
    (its layers, the embedding or the tied copy in its own bucket) and its activations over 2
    micro-batches of 1F1B (stage 0 holds two in flight)."""
    common = ["parallel.pp=2", "train.micro_batch=2", "train.global_batch=4"]
    cases = [
        {"name": "states", "mode": "states", "overrides": [*common, "parallel.distributed_optimizer=true"]},
        {"name": "activations", "mode": "activations", "overrides": common},
    ]
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", str(REPO / "benchmarks" / "plan_census.py"), str(spec), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        states = json.loads((tmp_path / f"states.rank{rank}.json").read_text())
        for kind in ("params", "grads", "optimizer"):
            assert states["estimate"][kind] == states["measured"][kind], (rank, kind)
        assert states["estimate"]["total"] == pytest.approx(states["measured"]["total"], rel=0.02)
        saved = json.loads((tmp_path / f"activations.rank{rank}.json").read_text())
        assert saved["estimate"]["saved_peak"] == pytest.approx(saved["measured"]["saved_peak"], rel=0.01)


def test_moe_model_states_and_activations_are_the_census(single_process) -> None:  # noqa: ANN001
    """A MoE model (router, 8 experts, shared expert; dense and MoE layers): the engine's parameters,
    gradient buffer and Adam state exactly, the saved-for-backward peak of one micro-batch within 1%.
    (The engine steps first: megatron's aux-loss scale is set by the schedule before any backward.)"""
    from pretrain.model import position_ids
    from pretrain.tasks.lm import build_engine

    cfg = Run.from_config(compose(["data.dir=unused", *MOE, "train.micro_batch=2", "train.global_batch=2"]), 1, 0)
    engine = build_engine(cfg, VOCAB)
    batch = [{"tokens": torch.randint(0, VOCAB, (2, 65)), "mask": torch.ones(2, 64)}]
    probe = AtOptimizerStep(lambda: megatron_census(engine))
    with probe.installed():
        engine.train_step(batch)
        probe.arm()
        engine.train_step(batch)
    rank = estimate_memory(cfg, single_process, vocab_size=VOCAB, seq_len=64).largest
    for kind in ("params", "grads", "optimizer"):
        assert getattr(rank, kind) == probe.result[kind], kind
    model = engine.unwrapped_model()
    tracker = SavedTensors(exclude=list(model.parameters()))
    tokens = torch.randint(0, VOCAB, (2, 65))
    with tracker.track():
        per_token = model(tokens[:, :-1], position_ids(2, 64), None, labels=tokens[:, 1:])
        per_token.sum().backward()
    assert stage_saved_peak(cfg, single_process, 0, VOCAB, 64) == pytest.approx(tracker.peak, rel=0.01)


def test_expert_parallel_census(tmp_path: Path) -> None:
    """Two ranks, ep=2 with the distributed optimizer: each rank's experts are its own, in megatron's
    expert buffer sharded over the dp / ep = 1 ranks that hold them, the rest over dp = 2 (exact);
    activations are each rank's routed tokens (balanced on average: the mean within 2%)."""
    common = ["model=moe-tiny", "parallel.ep=2", "train.micro_batch=2", "train.global_batch=4"]
    cases = [
        {"name": "states", "mode": "states", "overrides": [*common, "parallel.distributed_optimizer=true", *MOE[1:]]},
        {"name": "activations", "mode": "activations", "overrides": common},
    ]
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", str(REPO / "benchmarks" / "plan_census.py"), str(spec), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    measured, estimated = [], []
    for rank in (0, 1):
        states = json.loads((tmp_path / f"states.rank{rank}.json").read_text())
        for kind in ("params", "grads", "optimizer"):
            assert states["estimate"][kind] == states["measured"][kind], (rank, kind)
        saved = json.loads((tmp_path / f"activations.rank{rank}.json").read_text())
        measured.append(saved["measured"]["saved_peak"])
        estimated.append(saved["estimate"]["saved_peak"])
    assert sum(estimated) == pytest.approx(sum(measured), rel=0.02)
