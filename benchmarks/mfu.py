"""MFU of ``gpt-pretrain`` for ``model=tiny`` and ``model=gpt2-small`` on this machine's CPU (or GPU).

MFU = model FLOPs per token (6·N + attention, ``pretrain.model.flops_per_token``) × tokens/s
over the device's peak, here a square-matmul measurement in the training dtype taken once at
the start (``pretrain.trainer.flops.measured_peak_flops``, 2 s) and passed to both runs as
``train.peak_tflops``, so both MFUs are against the same number. Data: tinyshakespeare, char
tokens, windows of each model's context (64 for tiny, 1024 for gpt2-small).

    python benchmarks/mfu.py [--tiny-steps 200] [--small-steps 8]

The last two lines are the MFUs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import REPO, TINYSHAKESPEARE  # noqa: E402
from pretrain.trainer.flops import measured_peak_flops  # noqa: E402


def prepare(work: Path, seq_len: int) -> Path:
    out = work / f"ts-{seq_len}"
    args = [f"input={TINYSHAKESPEARE}", f"out={out}", "tokenizer=char", f"seq_len={seq_len}"]
    subprocess.run([sys.executable, "-m", "data.prepare", *args], cwd=REPO, check=True, capture_output=True)
    return out


def measure(work: Path, preset: str, seq_len: int, micro: int, steps: int, peak_tflops: float) -> tuple[float, float]:
    """(median tokens/s, median MFU) of gpt-pretrain over the steps after the first quarter."""
    run_dir = work / f"run-{preset}"
    args = [f"data.dir={prepare(work, seq_len)}", f"model={preset}", f"run.dir={run_dir}"]
    args += [f"train.max_steps={steps}", f"train.micro_batch={micro}", f"train.global_batch={micro}"]
    args += ["train.eval_every=0", "train.eval_batches=1", "train.save_every=-1", "train.sample_tokens=0"]
    args += ["logging.wandb=disabled", f"train.peak_tflops={peak_tflops}"]
    subprocess.run([sys.executable, "-m", "pretrain.train", *args], cwd=REPO, check=True, capture_output=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "mfu" in r][max(1, steps // 4) :]
    return statistics.median(r["tokens_per_s"] for r in rows), statistics.median(r["mfu"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-steps", type=int, default=200)
    parser.add_argument("--small-steps", type=int, default=8)
    args = parser.parse_args()
    if not TINYSHAKESPEARE.is_file():
        sys.exit(f"benchmark: {TINYSHAKESPEARE} not found")
    work = Path(tempfile.mkdtemp(prefix="bench-mfu-"))
    peak = max(measured_peak_flops(torch.float32, size, seconds=1.0) for size in (1024, 2048)) / 1e12
    print(f"measured fp32 matmul peak: {peak * 1e3:.1f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)
    tiny = measure(work, "tiny", 64, 12, args.tiny_steps, peak)
    small = measure(work, "gpt2-small", 1024, 2, args.small_steps, peak)
    for name, (tps, _) in (("tiny", tiny), ("gpt2-small", small)):
        print(f"model={name}: {tps:,.0f} tokens/s")
    print(f"MFU model=tiny: {tiny[1]:.1%}")
    print(f"MFU model=gpt2-small: {small[1]:.1%}")


if __name__ == "__main__":
    main()
