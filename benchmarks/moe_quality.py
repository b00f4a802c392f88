"""MoE against dense at the same active parameters: validation loss of ``model=moe-tiny`` and ``model=llama-tiny``.

``moe-tiny`` is llama-tiny with every MLP replaced by 8 experts of half the width, top-2: a token
passes through the same FFN width (2 x 176 = 352), so both models spend the same compute per token
(plus moe-tiny's 8 x 128 router) while moe-tiny holds 4x the MLP weights. Both train on the same
tokens for the same steps (tinyshakespeare, char, seq_len 64, the CPU defaults: batch 12, lr 4e-3),
one ``gpt-pretrain`` each, over several seeds (model init and data order), alternating the two
models so that a machine's drift hits both. Each run's final ``val_loss`` is over the whole
validation split.

    python benchmarks/moe_quality.py [--steps 2000] [--seeds 1337 1338] [--data DIR]

The last line is the mean of dense - MoE val_loss over the seeds (positive: MoE is better).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, prepared_shards, pretrain_tokens_per_s  # noqa: E402

MODELS = ("llama-tiny", "moe-tiny")


def train(model: str, seed: int, steps: int, data: Path, run_dir: Path) -> dict[str, float]:
    """One run; its final validation loss, tokens/s and wall time."""
    args = [
        f"data.dir={data}",
        f"model={model}",
        f"run.dir={run_dir}",
        f"train.seed={seed}",
        f"train.max_steps={steps}",
        "train.eval_every=0",
        "train.save_every=-1",
        "train.sample_tokens=0",
        "logging.wandb=disabled",
        "logging.progress_bar=false",
    ]
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pretrain.train", *args], cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - began
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    train_loss = statistics.mean(r["loss"] for r in rows if "loss" in r and r["step"] > steps - 100)
    rate = pretrain_tokens_per_s(run_dir, 20)
    return {"val_loss": val, "train_loss": train_loss, "tokens_per_s": rate, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    parser.add_argument("--data", default=None, help="a gpt-prepare output (default: tinyshakespeare, char)")
    args = parser.parse_args()
    data = prepared_shards(args.data)
    root = Path(tempfile.mkdtemp(prefix="moe-quality-"))
    results: dict[tuple[str, int], dict[str, float]] = {}
    for i, seed in enumerate(args.seeds):
        order = MODELS if i % 2 == 0 else MODELS[::-1]
        for model in order:
            results[model, seed] = r = train(model, seed, args.steps, data, root / f"{model}-{seed}")
            print(
                f"{model:10s} seed {seed}: val_loss {r['val_loss']:.4f}  train_loss(last 100) {r['train_loss']:.4f}  "
                f"{r['tokens_per_s']:,.0f} tokens/s  {r['wall_s']:.0f} s",
                flush=True,
            )
    gaps = [results["llama-tiny", s]["val_loss"] - results["moe-tiny", s]["val_loss"] for s in args.seeds]
    for model in MODELS:
        vals = [results[model, s]["val_loss"] for s in args.seeds]
        print(f"{model}: val_loss mean {statistics.mean(vals):.4f} over seeds {args.seeds}")
    print(f"dense - MoE val_loss per seed: {' '.join(f'{g:+.4f}' for g in gaps)}")
    print(f"dense - MoE val_loss, mean over {len(gaps)} seeds: {statistics.mean(gaps):+.4f}")


if __name__ == "__main__":
    main()
