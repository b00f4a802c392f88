"""DeepSpeed ZeRO 1/2/3: per-rank model-state bytes at dp=2 over dp=1, and step time over stage 0.

For each stage (0-3) and dp (1, 2) this script starts itself under torchrun (gloo, CPU), builds
the DeepSpeed engine exactly as ``gpt-pretrain parallel.engine=deepspeed`` does (``model=tiny``,
global batch 8), trains ``--steps`` steps on tinyshakespeare and then counts, on the rank with
the most, the bytes of

- **parameters** this rank holds (ZeRO-3: its partition ``ds_tensor``),
- **optimizer** state: fp32 master partitions + Adam moments,
- **gradients and buffers**: every other live tensor storage (gradient partitions/buckets),

from a census of all live tensors (storages counted once) taken inside the last optimizer step,
before the update. Step time is the median after warm-up.

    python benchmarks/zero_memory.py [--steps 30]

The last lines are the dp=2 / dp=1 ratios of each stage's sharded part and the step-time ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import REPO, prepared_shards  # noqa: E402


def census(engine) -> dict[str, int]:  # noqa: ANN001 - parallel.deepspeed_engine.DeepSpeedEngine
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    total = sum(storages.values())
    params = 0
    for p in engine.engine.module.parameters():
        tensor = getattr(p, "ds_tensor", p)
        params += tensor.numel() * tensor.element_size()
    zero = engine.engine.optimizer
    masters = list(getattr(zero, "single_partition_of_fp32_groups", None) or [])
    masters += list(getattr(zero, "fp32_partitioned_groups_flat", None) or [])
    inner = getattr(zero, "optimizer", zero)
    moments = [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v) and v.numel() > 1]
    optimizer = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in masters + moments}.values())
    if not masters:  # stage 0: torch AdamW updates the model's own parameters
        optimizer = sum(t.numel() * t.element_size() for t in moments)
    return {"parameters": params, "optimizer": optimizer, "gradients_buffers": max(total - params - optimizer, 0)}


def worker(data: str, stage: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    from conf.cli import compose, quiet_third_party
    from data.shards import load_manifest
    from data.stream import Layout, TrainLoader
    from parallel import cpu_compat
    from parallel.run_config import Run
    from pretrain.tasks.lm import build_engine

    quiet_third_party()
    overrides = [f"data.dir={data}", "model=tiny", "train.micro_batch=4", "train.global_batch=8"]
    overrides += ["parallel.engine=deepspeed", f"parallel.zero_stage={stage}", f"train.max_steps={steps}"]
    cfg = compose(overrides)
    run = Run.from_config(cfg)
    topo = run.layout
    cpu_compat.apply()
    topo.init(1337)
    manifest = load_manifest(data)
    engine = build_engine(run, manifest.vocab_size)
    layout = Layout(8, 4, topo.dp_rank, topo.dp)
    loader = TrainLoader(manifest, layout, 1337, 12)
    # the census runs inside the last optimizer step, before the update: gradients (or their
    # reduced partitions) and the optimizer state are both alive then
    optimizer, counts = engine.engine.optimizer, {}
    original_step = optimizer.step

    def step_with_census(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if len(times) == steps - 1:
            counts.update(census(engine))
        return original_step(*args, **kwargs)

    optimizer.step = step_with_census
    times: list[float] = []
    for _ in range(steps):
        batches = [next(loader) for _ in range(layout.micro_batches_per_step)]
        start = time.perf_counter()
        engine.train_step(batches)
        times.append(time.perf_counter() - start)
    gathered: list = [None] * topo.world_size
    dist.all_gather_object(gathered, counts)
    if topo.rank == 0:
        worst = {k: max(c[k] for c in gathered) for k in counts}
        step_time = statistics.median(times[steps // 3 :])
        Path(out).write_text(json.dumps({**worst, "step_time_s": step_time}))


def launch(data: Path, stage: int, dp: int, steps: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="zero-")) / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={dp}", "--master_addr=127.0.0.1"]
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        cmd += [f"--master_port={sock.getsockname()[1]}"]
    cmd += [__file__, "--worker", str(data), str(stage), str(steps), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    data = prepared_shards(args.data)
    results = {(stage, dp): launch(data, stage, dp, args.steps) for stage in (0, 1, 2, 3) for dp in (1, 2)}
    print("bytes per rank (largest rank), model=tiny, torch AdamW, fp32:")
    print("| stage | dp | parameters | optimizer | gradients+buffers | step time (ms) |")
    print("|---|---|---|---|---|---|")
    for (stage, dp), r in results.items():
        row = f"| {stage} | {dp} | {r['parameters']:,} | {r['optimizer']:,} | {r['gradients_buffers']:,} |"
        print(f"{row} {r['step_time_s'] * 1e3:.1f} |")
    grads = "gradients_buffers"
    sharded = {1: ["optimizer"], 2: ["optimizer", grads], 3: ["optimizer", grads, "parameters"]}
    for stage, parts in sharded.items():
        one, two = results[(stage, 1)], results[(stage, 2)]
        ratios = ", ".join(f"{part} {two[part] / one[part]:.3f}" for part in parts)
        print(f"ratio stage {stage} dp=2/dp=1 of the sharded parts: {ratios}")
    for stage in (1, 2, 3):
        for dp in (1, 2):
            ratio = results[(stage, dp)]["step_time_s"] / results[(0, dp)]["step_time_s"]
            print(f"ratio step time stage {stage} / stage 0 at dp={dp}: {ratio:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
