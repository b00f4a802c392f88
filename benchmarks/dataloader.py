"""Streaming loader samples/s over what ``gpt-pretrain model=tiny`` consumes (goal >= 50x).

Side by side in one run, on the same shards (tinyshakespeare, char, seq_len 64, or ``--data``):
the trainer's consumption is ``gpt-pretrain``'s median tokens/s / seq_len at micro-batch 12;
the loader is this rank's ``TrainLoader`` (the trainer's own iterator: global order, streams,
shard reads with sha256 checks, collation) at the same batch, with 0 and 2 worker processes,
timed after its first batch.

    python benchmarks/dataloader.py [--batches 3000] [--steps 200] [--data DIR]

The last line is the ratio with the default ``data.num_workers=0``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, prepared_shards, pretrain_tokens_per_s  # noqa: E402
from data.shards import load_manifest  # noqa: E402
from data.stream import Layout, TrainLoader  # noqa: E402

BATCH = 12


def loader_rate(data: Path, batches: int, workers: int) -> float:
    """Samples/s of the trainer's loader, after its first batch (worker start-up excluded)."""
    manifest = load_manifest(data)
    loader = TrainLoader(manifest, Layout(BATCH, BATCH), seed=1337, num_streams=12, num_workers=workers)
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * BATCH / (time.perf_counter() - start)


def trainer_rate(data: Path, steps: int) -> float:
    """Samples/s that gpt-pretrain model=tiny consumes (median over steps after warm-up)."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    args = [f"data.dir={data}", "model=tiny", f"run.dir={run_dir}", f"train.max_steps={steps}"]
    args += [f"train.micro_batch={BATCH}", f"train.global_batch={BATCH}", "train.eval_every=0"]
    args += ["train.eval_batches=1", "train.save_every=-1", "train.sample_tokens=0", "logging.wandb=disabled"]
    subprocess.run([sys.executable, "-m", "pretrain.train", *args], cwd=REPO, check=True, capture_output=True)
    return pretrain_tokens_per_s(run_dir, skip=min(20, steps // 4)) / load_manifest(data).seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3000, help="micro-batches read per loader measurement")
    parser.add_argument("--steps", type=int, default=200, help="gpt-pretrain steps")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    data = prepared_shards(args.data)
    consumed = trainer_rate(data, args.steps)
    rates = {workers: loader_rate(data, args.batches, workers) for workers in (0, 2)}
    print(f"gpt-pretrain model=tiny consumes {consumed:,.0f} samples/s (batch {BATCH})")
    for workers, rate in rates.items():
        print(f"TrainLoader num_workers={workers}: {rate:,.0f} samples/s = {rate / consumed:.1f}x")
    print(f"ratio loader (num_workers=2) / trainer: {rates[2] / consumed:.1f}")
    print(f"ratio loader (num_workers=0) / trainer: {rates[0] / consumed:.1f}")


if __name__ == "__main__":
    main()
