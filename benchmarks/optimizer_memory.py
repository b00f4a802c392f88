"""Optimizer-state bytes per rank: the distributed optimizer (ZeRO-1) at dp=2 over one process.

Runs the real engine under torchrun at dp=1 and dp=2 (``model=tiny`` unless ``--model``),
takes one training step so that Adam's state exists, and counts on every rank the bytes
of the optimizer's state tensors (exp_avg, exp_avg_sq, and fp32 main params that are not
views of the model's parameters). The last line is the ratio of the largest dp=2 rank to
dp=1 (ZeRO-1 goal: <= 0.525).

    python benchmarks/optimizer_memory.py [--model tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def worker(model: str, out: Path) -> None:
    import torch

    from conf.cli import compose, quiet_third_party
    from parallel import cpu_compat
    from parallel.run_config import Run
    from pretrain.tasks.lm import build_engine

    quiet_third_party()
    world = int(os.environ["WORLD_SIZE"])
    cfg = compose([f"model={model}", "data.dir=unused", "train.micro_batch=1", "train.global_batch=2"])
    run = Run.from_config(cfg)
    topo = run.layout
    cpu_compat.apply()
    topo.init(seed=1)
    engine = build_engine(run, 50257 if model != "tiny" else 67)
    seq = int(cfg.model.seq_len)
    tokens = torch.randint(0, 67, (1, seq + 1))
    engine.train_step([{"tokens": tokens, "mask": torch.ones(1, seq)}] * (2 // world))
    model_storage = {p.untyped_storage().data_ptr() for chunk in engine.model for p in chunk.parameters()}
    buffers = {
        b.param_data.untyped_storage().data_ptr() for c in engine.model for b in c.buffers if b.param_data is not None
    }
    state_bytes = 0
    for opt in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                ptr = param.untyped_storage().data_ptr()
                if ptr not in model_storage and ptr not in buffers:  # a separate fp32 main copy
                    state_bytes += param.numel() * param.element_size()
                for value in inner.state[param].values():
                    if isinstance(value, torch.Tensor) and value.numel() > 1:
                        state_bytes += value.numel() * value.element_size()
    params = sum(p.numel() for chunk in engine.model for p in chunk.parameters())
    (out / f"dp{world}_rank{topo.rank}.json").write_text(json.dumps({"bytes": state_bytes, "params": params}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="optmem-"))
    for world in (1, 2):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={world}",
                "--standalone",
                __file__,
                "--worker",
                args.model,
                str(out),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=600,
        )
    one = json.loads((out / "dp1_rank0.json").read_text())
    two = [json.loads((out / f"dp2_rank{r}.json").read_text()) for r in (0, 1)]
    print(f"model={args.model}: {one['params']:,} parameters")
    print(f"dp=1 (plain optimizer):        {one['bytes']:>12,} optimizer-state bytes")
    for rank, item in enumerate(two):
        print(f"dp=2 (distributed), rank {rank}:  {item['bytes']:>12,} optimizer-state bytes")
    print(f"ratio max per-rank bytes dp=2 / dp=1: {max(t['bytes'] for t in two) / one['bytes']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
