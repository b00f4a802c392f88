"""gpt-pretrain tokens/s over a bare PyTorch loop on the same megatron-core model and batches.

Both sides train ``model=tiny`` (nanoGPT's CPU shape) with batch 12 × 64 tokens on the same
shards. The bare side is what a user would write without this project: the same
``GPTModel``, batches read into memory up front, ``torch.optim.AdamW``, gradient clipping,
a plain loop. The framework side is the real command line, ``gpt-pretrain``, with its
data loader, DDP wrapper, megatron optimizer, scheduler and logging, measured from its
``metrics.jsonl``. They run one after the other, alternating, and the medians are compared.

    python benchmarks/throughput.py [--steps 300] [--rounds 2] [--data DIR]

The last line is the ratio (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import REPO, prepared_shards, pretrain_tokens_per_s  # noqa: E402

BATCH, SEQ = 12, 64


def bare_loop(data: Path, steps: int, skip: int) -> float:
    """Median tokens/s of a plain loop over the same model (no DDP, no megatron optimizer)."""
    from data.shards import load_manifest, read_shard
    from parallel.topology import Topology
    from pretrain.cli import compose, quiet_third_party
    from pretrain.model import build_gpt, position_ids, transformer_config

    quiet_third_party()
    cfg = compose(["model=tiny", f"data.dir={data}"])
    Topology.from_config(cfg, world_size=1, rank=0).init(seed=1337)
    manifest = load_manifest(data)
    model = build_gpt(cfg.model, manifest.vocab_size, transformer_config(cfg.model))
    rows = torch.cat(
        [
            torch.from_numpy(read_shard(s, manifest.dtype, manifest.seq_len).astype("int64"))
            for s in manifest.shards("train")[:4]
        ]
    )
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(cfg.train.lr),
        betas=(0.9, 0.99),
    )
    positions = position_ids(BATCH, SEQ)
    rates = []
    for step in range(steps):
        start = time.perf_counter()
        batch = rows[torch.randint(0, len(rows), (BATCH,))]
        loss = model(batch[:, :-1], positions, None, labels=batch[:, 1:]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step >= skip:
            rates.append(BATCH * SEQ / (time.perf_counter() - start))
    return statistics.median(rates)


def framework(data: Path, steps: int, skip: int) -> float:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.train",
            f"data.dir={data}",
            "model=tiny",
            f"run.dir={run_dir}",
            f"train.max_steps={steps}",
            f"train.micro_batch={BATCH}",
            f"train.global_batch={BATCH}",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.save_every=0",
            "train.sample_tokens=0",
            "logging.wandb=disabled",
            "logging.progress_bar=false",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        env={**os.environ},
    )
    return pretrain_tokens_per_s(run_dir, skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    data = prepared_shards(args.data)
    skip = min(20, args.steps // 4)
    ours, bare = [], []
    for round_ in range(args.rounds):
        bare_rate = (
            subprocess.run(
                [sys.executable, __file__, "--bare-only", str(data), str(args.steps), str(skip)],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        bare.append(float(bare_rate))
        ours.append(framework(data, args.steps, skip))
        print(f"round {round_ + 1}: bare loop {bare[-1]:,.0f} tok/s   gpt-pretrain {ours[-1]:,.0f} tok/s", flush=True)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model=tiny, batch {BATCH}x{SEQ}")
    print(f"bare loop (same GPTModel, AdamW): {b:,.0f} tokens/s")
    print(f"gpt-pretrain:                    {o:,.0f} tokens/s")
    print(f"ratio gpt-pretrain / bare loop: {o / b:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--bare-only":
        print(bare_loop(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
    else:
        main()
