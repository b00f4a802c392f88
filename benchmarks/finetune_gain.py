"""GPT-1's claim on a small scale: unlabeled pretraining makes fine-tuning more accurate.

1. ``gpt-prepare`` the *texts* of TRAIN_JSONL (labels unused) with a BPE tokenizer;
2. ``gpt-pretrain`` ``model=tiny`` (with dropout) on them;
3. ``gpt-finetune`` on ``--examples`` labeled examples of TRAIN_JSONL, from the pretrained
   checkpoint and from scratch (same architecture, tokenizer, seeds, hyper-parameters), each
   with λ = 0 and λ = 0.5; validation on VALIDATION_JSONL, accuracy reported on EVAL_JSONL
   (``task.test``), once per ``--seeds`` seed (accuracies averaged: from-scratch accuracy alone
   varies by ~4 points between seeds on 1,000 examples);
4. print the table and, last, the gain of the best pretrained run over the best from-scratch
   run, in accuracy points on EVAL_JSONL.

    bash benchmarks/finetune_gain.sh TRAIN_JSONL VALIDATION_JSONL EVAL_JSONL [--work DIR]
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args: list[str], log: Path, threads: int | None = None) -> None:
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    with log.open("w") as out:
        cmd = [sys.executable, "-m", *args]
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        sys.exit(f"{args[0]} failed (exit {code}), see {log}:\n{tail}")
    print(f"  {log.stem}: {time.perf_counter() - start:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train")
    parser.add_argument("validation")
    parser.add_argument("eval")
    parser.add_argument("--work", default=None)
    parser.add_argument("--examples", type=int, default=1000, help="labeled train examples for fine-tuning")
    parser.add_argument("--pretrain-steps", type=int, default=12000)
    parser.add_argument("--dropout", type=float, default=0.1, help="model dropout (pretraining and fine-tuning)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary trained on TRAIN's texts")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-4, help="fine-tuning peak learning rate")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[1234, 1],
        help="fine-tuning seeds (head init, example sample, order, dropout); accuracies are averaged over them",
    )
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="fine-tuning runs side by side (1 thread each)"
    )
    args = parser.parse_args()
    files = [Path(p).resolve() for p in (args.train, args.validation, args.eval)]
    for path in files:
        if not path.is_file():
            parser.exit(2, f"error: {path}: no such file\n")
    train, validation, evaluation = files
    work = Path(args.work or tempfile.mkdtemp(prefix="finetune-gain-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    started = time.perf_counter()
    data = work / "data"
    if not (data / "manifest.json").is_file():
        prep = [f"input={train}", f"out={data}", "tokenizer=bpe", f"vocab_size={args.vocab_size}", "seq_len=64"]
        run(["data.prepare", *prep, "overwrite=true"], work / "prepare.log")
    pretrained = work / "pretrain"
    steps = args.pretrain_steps
    run(
        [
            "pretrain.train",
            f"data.dir={data}",
            "model=tiny",
            f"model.dropout={args.dropout}",
            f"run.dir={pretrained}",
            f"train.max_steps={steps}",
            "train.micro_batch=16",
            "train.global_batch=16",
            f"train.eval_every={max(steps // 4, 1)}",
            f"train.save_every={steps}",
            "train.sample_tokens=0",
            "logging.wandb=disabled",
            "logging.progress_bar=false",
        ],
        work / "pretrain.log",
    )
    arms = [(scratch, weight) for scratch in (False, True) for weight in (0.0, 0.5)]
    runs = []  # (arm, run name, gpt-finetune overrides)
    for scratch, weight in arms:
        for seed in args.seeds:
            name = f"{'scratch' if scratch else 'pretrained'}-lambda{weight}-seed{seed}"
            overrides = [
                f"init.checkpoint={pretrained}",
                "task.type=classification",
                f"task.train={train}",
                f"task.validation={validation}",
                f"task.test={evaluation}",
                f"task.max_train_examples={args.examples}",
                f"finetune.aux_lm_weight={weight}",
                f"finetune.from_scratch={str(scratch).lower()}",
                f"finetune.epochs={args.epochs}",
                f"train.lr={args.lr}",
                f"train.seed={seed}",
                "train.eval_every=1000000",  # validation once, at the end
                f"run.dir={work / name}",
                "train.save_every=-1",
                "logging.wandb=disabled",
                "logging.progress_bar=false",
            ]
            runs.append(((scratch, weight), name, overrides))
    # independent runs side by side, one thread each: on a few cores that beats one run using all
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        jobs = [pool.submit(run, ["pretrain.finetune", *over], work / f"{name}.log", threads) for _, name, over in runs]
        for job in jobs:
            job.result()  # re-raises a failed run's exit
    rows = []
    for arm in arms:
        results = []
        for name in (name for run_arm, name, _ in runs if run_arm == arm):
            result = json.loads((work / name / "results.json").read_text())
            results.append((result["val_acc"], result["test_acc"]))
        val = sum(r[0] for r in results) / len(results)
        test = sum(r[1] for r in results) / len(results)
        rows.append((arm[0], arm[1], val, test, [r[1] for r in results]))
    total = time.perf_counter() - started
    seeds = ", ".join(map(str, args.seeds))
    print(f"\n{args.examples} labeled examples, {Path(args.eval).name} as eval set, seeds {seeds}, total {total:.0f}s")
    print("| init | λ (aux LM weight) | val acc | eval acc | eval acc per seed |")
    print("|---|---|---|---|---|")
    for scratch, weight, val, test, per_seed in rows:
        each = " / ".join(f"{a:.4f}" for a in per_seed)
        print(f"| {'from scratch' if scratch else 'pretrained'} | {weight} | {val:.4f} | {test:.4f} | {each} |")
    best_pretrained = max((row for row in rows if not row[0]), key=lambda row: row[3])
    best_scratch = max((row for row in rows if row[0]), key=lambda row: row[3])
    # the two best arms share seeds (same labeled sample and order): the spread of the
    # per-seed differences is the gain's noise, which can exceed the gain on a few seeds
    diffs = [100 * (p - s) for p, s in zip(best_pretrained[4], best_scratch[4], strict=True)]
    if len(diffs) > 1:
        print(f"per-seed gain, points: {' / '.join(f'{d:.1f}' for d in diffs)}; {paired_error(diffs)}")
    gain = 100 * (best_pretrained[3] - best_scratch[3])
    print(f"gain of pretraining (best pretrained - best from scratch, means over seeds), points: {gain:.1f}")


def paired_error(diffs: list[float]) -> str:
    """Standard error of the mean per-seed gain (sample standard deviation / sqrt(seeds))."""
    return f"standard error of the mean gain {statistics.stdev(diffs) / len(diffs) ** 0.5:.1f}"


if __name__ == "__main__":
    main()
