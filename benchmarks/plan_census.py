"""The torchrun worker of ``benchmarks/plan_accuracy.py``: build the engine as gpt-pretrain does,
train two steps on random tokens and measure, on every rank, what ``parallel.plan`` predicts.

    python -m torch.distributed.run --nproc_per_node=2 benchmarks/plan_census.py CASES.json OUT_DIR

``CASES.json`` is a list of ``{"name", "mode": "states" | "activations", "overrides": [...]}`` of one
world size; each rank writes ``OUT_DIR/<name>.rank<R>.json`` with the measurement and the estimate.
``states``: a census of parameters / gradients / optimizer state when the second optimizer step
begins (``parallel/plan/census.py``). ``activations``: the peak bytes saved for backward over one
training step (all its micro-batches, through the pipeline schedule); with ``PLAN_CENSUS_LOG=1`` each
rank's result also lists every saved storage (bytes, shape, the op that made it).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 65  # tinyshakespeare's characters (padded to 72 by model.vocab_multiple=8)


def batches(cfg, topo) -> list[dict]:  # noqa: ANN001 - DictConfig, Topology
    import torch

    micro, seq = int(cfg.train.micro_batch), int(cfg.model.seq_len)
    count = int(cfg.train.global_batch) // (micro * topo.dp)
    gen = torch.Generator().manual_seed(1 + topo.rank)
    tokens = [torch.randint(0, VOCAB, (micro, seq + 1), generator=gen) for _ in range(count)]
    return [{"tokens": t, "mask": torch.ones(micro, seq)} for t in tokens]


def run_case(case: dict, out_dir: Path) -> None:
    import torch
    from megatron.core import parallel_state

    from conf.cli import compose
    from parallel.plan import estimate_memory
    from parallel.plan.census import AtOptimizerStep, SavedTensors, deepspeed_census, megatron_census
    from parallel.plan.memory import stage_saved_peak
    from parallel.run_config import Run
    from pretrain.tasks.lm import build_engine

    cfg = compose(["data.dir=unused", "logging.wandb=disabled", *case["overrides"]])
    run = Run.from_config(cfg)
    topo = run.layout
    topo.init(int(cfg.train.seed))
    engine = build_engine(run, VOCAB)
    plan = estimate_memory(run, topo, vocab_size=VOCAB, seq_len=int(cfg.model.seq_len), dp_ranks="all")
    pp_rank, dp_rank = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_data_parallel_rank()
    estimate = plan.ranks[pp_rank * topo.dp + dp_rank]
    data = batches(cfg, topo)
    result: dict = {"name": case["name"], "rank": topo.rank, "pp_rank": pp_rank, "where": estimate.where}
    if case["mode"] == "states":
        census = deepspeed_census if str(cfg.parallel.engine) == "deepspeed" else megatron_census
        probe = AtOptimizerStep(lambda: census(engine))
        with probe.installed():
            engine.train_step(data)
            probe.arm()
            engine.train_step(data)
        result["measured"] = {**probe.result, "total": sum(probe.result.values())}
        result["estimate"] = {
            "params": estimate.params,
            "grads": estimate.grads,
            "optimizer": estimate.optimizer,
            "cpu_offload": estimate.cpu_offload,
            "comm_buffers": estimate.comm_buffers,
            "total": estimate.at_optimizer_step,
        }
    else:
        model = engine.model if hasattr(engine, "model") else [engine.engine.module]
        tracker = SavedTensors(exclude=[p for chunk in model for p in chunk.parameters()])
        engine.train_step(data)  # warm: lazily built caches (rope, buffers) are not activations
        if os.environ.get("PLAN_CENSUS_LOG"):
            tracker.log = []
        with tracker.track():
            engine.train_step(data)
        result["measured"] = {"saved_peak": tracker.peak}
        if tracker.log is not None:
            result["log"] = tracker.log
        result["estimate"] = {"saved_peak": stage_saved_peak(run, topo, pp_rank, VOCAB, int(cfg.model.seq_len))}
    result["items"] = estimate.items
    (out_dir / f"{case['name']}.rank{topo.rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


def main(cases_path: str, out_dir: str) -> None:
    warnings.filterwarnings("ignore")
    from conf.cli import quiet_third_party
    from parallel import cpu_compat

    quiet_third_party()
    cpu_compat.apply()
    os.environ.setdefault("WANDB_MODE", "disabled")
    for case in json.loads(Path(cases_path).read_text()):
        run_case(case, Path(out_dir))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
