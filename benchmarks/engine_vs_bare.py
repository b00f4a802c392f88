"""gpt-pretrain's engine step against bare loops, in one process, in alternated blocks of steps.

    python benchmarks/engine_vs_bare.py [--model tiny|llama-tiny|moe-tiny] [--rounds 8] [--block 25] [--data DIR]

``throughput.py`` runs each loop in its own process, minutes apart, and this machine moves ±10-25%
between runs; here the three steps share one process and its machine state, and alternate in blocks of
``--block`` steps (order reversed every round): the row's plain-PyTorch reference loop
(``throughput.reference_model``), the same plain loop around this project's ``GPTModel``, and
``MegatronEngine.train_step`` (DDP wrapper, megatron's optimizer over fused AdamW, the LM loss through
megatron's schedule) on an identically built ``GPTModel``. The same batches feed all three. What it leaves
out is the command around the engine (data loader, metrics, checks: ``step_overhead.py`` accounts for it).

Printed: per round the three tokens/s, then the median ratio of each pair of a round with its 90% bootstrap
interval (``ab.interval``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.ab import interval  # noqa: E402
from benchmarks.common import prepared_shards  # noqa: E402
from benchmarks.throughput import (  # noqa: E402
    BATCH,
    MODELS,
    REFERENCE,
    SEQ,
    bare_step,
    fused_adamw,
    reference_model,
    training_rows,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=25, help="steps of one side in a round")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    data = prepared_shards(args.data)

    from conf.cli import compose, quiet_third_party
    from parallel import cpu_compat
    from parallel.run_config import Run
    from parallel.topology import Topology
    from pretrain.tasks.lm import build_engine

    quiet_third_party()
    cpu_compat.apply()
    cfg = compose([f"model={args.model}", f"data.dir={data}", f"train.micro_batch={BATCH}"])
    run = Run.from_config(cfg, world_size=1, rank=0)
    run.layout.init(seed=1337)
    ref_kind = REFERENCE[args.model]
    loops = {}
    for kind in (ref_kind, "gptmodel"):
        model, _, manifest = reference_model(kind, args.model, data)
        optimizer = fused_adamw(model, float(cfg.train.lr))
        loops[kind] = lambda batch, k=kind, m=model, o=optimizer: bare_step(k, m, o, batch)
    engine = build_engine(run, manifest.vocab_size)
    mask = torch.ones(BATCH, SEQ)
    loops["engine"] = lambda batch: engine.train_step([{"tokens": batch, "mask": mask}])
    rows = training_rows(data, manifest)
    batches = [rows[torch.randint(0, len(rows), (BATCH,))] for _ in range(args.block)]

    # warm-up (first-step allocations, optimizer state), the engine first: megatron's schedule gives the
    # MoE aux-loss scale its shape before a bare MoE forward would
    for name in ("engine", ref_kind, "gptmodel"):
        for batch in batches[:5]:
            loops[name](batch)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for number in range(args.rounds):
        for name in names if number % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for batch in batches:
                loops[name](batch)
            rates[name].append(BATCH * SEQ * len(batches) / (time.perf_counter() - start))
        print(f"round {number + 1}: " + "   ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()), flush=True)
    Topology.destroy()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model={args.model}, tokens/s per block")
    for a, b in (("engine", ref_kind), ("engine", "gptmodel"), ("gptmodel", ref_kind)):
        ratios = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
        low, high = interval(ratios)
        print(f"{a} / {b}: {statistics.median(ratios):.3f} (90% interval {low:.3f} - {high:.3f}, {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
