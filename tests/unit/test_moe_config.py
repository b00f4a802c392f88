"""Mixture-of-Experts keys (conf/moe.py, parallel/expert_layout.py) and the MoE model's building blocks,
in process: every bad combination is one line before any process group; the megatron fields say
what the keys mean; experts start from the same weights whichever rank builds them."""

from __future__ import annotations

import pytest

from conf.cli import compose
from conf.errors import UserError
from conf.schema import validate
from parallel.topology import Topology
from pretrain.model.moe import active_mlp_params, moe_fields

BASE = ["data.dir=unused", "model=moe-tiny", "train.global_batch=8", "train.micro_batch=1"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.moe_topk=9"], "model.moe_topk=9: must be in [1, model.num_experts=8]"),
        (["model.num_experts=0"], "model.num_experts=0: must be >= 1"),
        (["model.moe_topk=1"], "model.moe_topk=1 with model.moe_norm_topk_prob=true"),
        (["model.moe_expert_bias=true"], "model.moe_expert_bias=true needs model.moe_score_function=sigmoid"),
        (["model.moe_score_function=sigmoid", "model.moe_norm_topk_prob=false"], "renormalises the top-k"),
        (["model.moe_layer_freq=[1,0]"], "model.moe_layer_freq=[1, 0]: expected an integer >= 1 or a list of 4"),
        (["model.moe_layer_freq=[0,0,0,0]"], "no layer is a MoE layer"),
        (["model.moe_layer_freq=0"], "model.moe_layer_freq=0: must be >= 1"),
        (["model.moe_load_balancing=sinkhorn"], "model.moe_load_balancing=sinkhorn: expected aux_loss"),
        (["model.moe_capacity_factor=0"], "model.moe_capacity_factor=0: must be > 0"),
        (["model.moe_drop_policy=random"], "model.moe_drop_policy=random: expected probs or position"),
        (["model.moe_router_dtype=bf16"], "model.moe_router_dtype=bf16: expected fp32"),
        (["model.moe_aux_loss_coeff=-1"], "model.moe_aux_loss_coeff=-1: must be >= 0"),
        (["model.moe_shared_expert_size=0"], "model.moe_shared_expert_size=0: must be >= 1"),
        (["model.bias=true"], "model.num_experts with model.bias=true"),
        (["parallel.ep=0"], "parallel.ep=0: must be >= 1"),
        (["parallel.moe_dispatcher=flex"], "parallel.moe_dispatcher=flex: expected auto or alltoall or allgather"),
    ],
)
def test_bad_moe_keys_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        validate(compose([*BASE, *overrides]))


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel.ep=2"], 1, "parallel.ep=2 does not divide dp=1"),
        (["parallel.ep=4", "parallel.tp=2"], 4, "parallel.ep=4 does not divide dp=2"),
        (["parallel.ep=3", "train.global_batch=6"], 3, "model.num_experts=8 is not divisible by parallel.ep=3"),
        (["model=llama-tiny", "parallel.ep=2"], 2, "parallel.ep=2 needs a MoE model"),
        (["parallel.tp=2", "parallel.sequence_parallel=false"], 2, "needs parallel.sequence_parallel=true"),
        (["parallel.tp=2", "model.moe_ffn_hidden_size=175"], 2, "model.moe_ffn_hidden_size=175 is not divisible"),
        (["parallel.engine=deepspeed"], 1, "MoE models train on parallel.engine=megatron"),
    ],
)
def test_bad_expert_layouts_are_rejected_before_any_process_group(
    overrides: list[str], world: int, message: str
) -> None:
    import torch.distributed as dist

    cfg = compose([*BASE, *overrides])
    with pytest.raises(UserError, match=message.replace("*", r"\*")):
        Topology.from_config(cfg, world_size=world, rank=0)
    assert not dist.is_initialized()


def test_expert_parallel_layouts_that_fit() -> None:
    topo = Topology.from_config(compose([*BASE, "parallel.ep=2", "parallel.tp=2"]), world_size=8, rank=0)
    assert (topo.tp, topo.dp, topo.ep, topo.moe_dispatcher) == (2, 4, 2, "alltoall")
    topo = Topology.from_config(compose([*BASE, "parallel.tp=2"]), world_size=8, rank=0)
    assert (topo.ep, topo.moe_dispatcher) == (1, "allgather")  # auto: no all-to-all with every expert here
    explicit = compose([*BASE, "parallel.moe_dispatcher=alltoall"])
    assert Topology.from_config(explicit, world_size=2, rank=0).moe_dispatcher == "alltoall"


def test_keys_become_megatron_fields() -> None:
    cfg = compose([*BASE, "model.moe_layer_freq=2", "model.moe_shared_expert_size=64", "model.moe_z_loss_coeff=0.001"])
    fields = moe_fields(cfg.model)
    assert fields["num_moe_experts"] == 8 and fields["moe_router_topk"] == 2
    assert fields["moe_layer_freq"] == [1, 0, 1, 0]  # megatron's reading of an int: layers 0, 2, ...
    assert fields["moe_ffn_hidden_size"] == 176 and fields["moe_shared_expert_intermediate_size"] == 64
    assert fields["moe_router_pre_softmax"] is False  # norm_topk_prob: softmax over the k chosen
    assert fields["moe_z_loss_coeff"] == 0.001 and fields["moe_expert_capacity_factor"] is None
    assert moe_fields(compose(["data.dir=x", "model=llama-tiny"]).model) == {}


def test_active_parameters_count_the_routed_experts() -> None:
    """moe-tiny's token visits 2 experts of 176: llama-tiny's 352 of dense width, plus the router."""
    moe, dense = compose([*BASE]).model, compose(["data.dir=x", "model=llama-tiny"]).model
    assert active_mlp_params(moe)[0] == active_mlp_params(dense)[0] + 128 * 8


@pytest.mark.parametrize("preset", ["moe-tiny", "olmoe-1b-7b", "qwen3-30b-a3b"])
def test_planner_and_trainer_count_the_same_active_flops(preset: str) -> None:
    """MFU in metrics.jsonl (pretrain/model) and in gpt-plan (parallel/plan) use one FLOP count."""
    from parallel.plan.params import Shape, total_params
    from parallel.plan.time import model_flops_per_token
    from pretrain.model import flops_per_token

    m = compose(["data.dir=x", f"model={preset}", "model.moe_layer_freq=2"]).model
    assert flops_per_token(m, 50257, int(m.seq_len)) == model_flops_per_token(
        Shape.from_config(m, 50257), int(m.seq_len)
    )
    if preset == "olmoe-1b-7b":  # every layer MoE: OLMoE-1B-7B's 6.9B parameters
        whole = compose(["data.dir=x", f"model={preset}"]).model
        assert 6.8e9 < total_params(Shape.from_config(whole, 50304)) < 7.0e9
