"""Mixture-of-Experts with expert parallelism on megatron-core, CPU/gloo under torchrun: every layout
trains the same model as one process (losses, load-balancing loss, expert load), and a checkpoint
written with experts split over ranks resumes in one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import layout_args, torchrun
from tests.distributed import step_metrics as metrics
from tests.integration.test_parallel import STEPS, common, resume

# one sequence per micro-batch: the load-balancing loss is a function of the tokens routed together,
# so every layout must group the same tokens (at dp=2 a rank's micro-batches hold every other sequence)
MOE = [*(a for a in common("moe-tiny") if not a.startswith("train.micro_batch=")), "train.micro_batch=1"]
LAYOUTS = {  # name: (tp, pp, ep, processes, extra keys)
    "single": (1, 1, 1, 1, []),
    # dp=2 split into ep=2: the all-to-all dispatcher, the distributed optimizer (auto at dp=2)
    "ep2": (1, 1, 2, 2, []),
    # tensor parallelism with sequence parallelism: the routed tokens are gathered over tp (uneven sizes)
    "ep2-tp2": (2, 1, 2, 4, []),
    # pipeline stages, the all-gather dispatcher and the plain (unsharded) optimizer
    "ep2-pp2": (1, 2, 2, 4, ["parallel.moe_dispatcher=allgather", "parallel.distributed_optimizer=false"]),
}


def train(char_shards: Path, run_dir: Path, name: str) -> Path:
    tp, pp, ep, world, extra = LAYOUTS[name]
    torchrun(
        world,
        f"data.dir={char_shards}",
        f"run.dir={run_dir}",
        *MOE,
        *layout_args(tp, pp),
        f"parallel.ep={ep}",
        *extra,
        "train.keep_last=2",
    )
    return run_dir


@pytest.fixture(scope="module")
def moe_runs(char_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    """Each layout trained once on demand (10 steps, checkpoints at 5 and 10)."""
    root = tmp_path_factory.mktemp("moe_layouts")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            done[name] = train(char_shards, root / name, name)
        return done[name]

    return get


@pytest.mark.slow
def test_single_process_moe_trains_and_logs_router_metrics(moe_runs) -> None:  # noqa: ANN001
    rows = metrics(moe_runs("single"))
    assert (moe_runs("single") / "moe.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert rows[STEPS]["loss"] < rows[1]["loss"] - 0.5  # it trains
    for row in rows.values():
        assert 0.9 < row["moe/load_balancing_loss"] < 2.0  # 1.0 is perfect balance (Switch's normalisation)
        assert row["moe/load_max_over_mean"] >= 1.0
        assert {f"moe/load_cv/layer{n}" for n in range(1, 5)} <= set(row)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "single"])
def test_expert_parallel_layout_matches_single_process(moe_runs, name: str) -> None:  # noqa: ANN001
    reference, parallel = metrics(moe_runs("single")), metrics(moe_runs(name))
    assert sorted(parallel) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        ref, got = reference[step], parallel[step]
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5), (name, step)
        assert got["moe/load_balancing_loss"] == pytest.approx(ref["moe/load_balancing_loss"], abs=1e-5), (name, step)
        for key in [k for k in ref if k.startswith("moe/load_")]:  # token counts: the same routing
            assert got[key] == pytest.approx(ref[key], abs=1e-6), (name, step, key)


@pytest.mark.slow
def test_checkpoint_saved_at_ep2_resumes_in_one_process(moe_runs, char_shards: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """Experts saved split over two ranks (and the distributed optimizer's shards) load at ep=1."""
    run_dir = resume(moe_runs("ep2"), tmp_path / "run", 5)
    torchrun(1, f"data.dir={char_shards}", f"run.dir={run_dir}", *MOE, *layout_args(1, 1))
    reference, resumed = metrics(moe_runs("single")), metrics(run_dir)
    for step in range(6, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], abs=1e-5), step
