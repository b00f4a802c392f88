"""GPT-1's analyses at this scale: zero-shot during pretraining, layers transferred, scarce labels.

    bash benchmarks/seed_analyses.sh TRAIN_JSONL VALIDATION_JSONL TEST_JSONL [--work DIR]

1. ``gpt-prepare`` the texts of TRAIN (labels unused): BPE, ``--seq-len`` windows;
2. ``gpt-pretrain model=tiny`` on them with in-loop evaluation (``eval.every_steps``): a
   sentiment task in GPT-1's zero-shot form (the review, then `` very``; the answer is the more
   likely verbalizer, ``--verbalizers``), 0- and 5-shot, on VALIDATION → ``zero_shot.png``;
3. ``gpt-finetune`` every run below, two side by side with one thread each. A run makes
   ``--finetune-steps`` updates of 32 examples, or one epoch where that is more (all labels: a
   run that stops a third of the way through its examples would not measure them); what varies
   is how many labeled examples of TRAIN it sees (a seeded sample per seed).
   - Selection: for each label count and init, λ ∈ {0, 0.5}, and for the pretrained model with and
     without LP-FT (``finetune.head_only_epochs``: about a third of the steps, where a whole number
     of epochs fits), over ``--select-seeds`` seeds; the configuration with the best mean accuracy
     on VALIDATION wins and gets the remaining ``--seeds``.
   - Label curve: TEST accuracy of the winners, mean ± standard error over the seeds → ``label_curve.png``.
   - Transfer: ``finetune.transfer_layers=k``, k = 0 … num_layers, 1,000 labels, the λ chosen for
     full fine-tuning of the pretrained model at 1,000 labels, ``--transfer-seeds`` → ``transfer.png``.
   Every run scores TEST in passing (cheaper than keeping its checkpoint); the selection reads only
   validation accuracies, and TEST figures are read only for what was selected and for the transfer runs.
4. ``tables.md`` and the goals, with the numbers; the last line is the pretrained − scratch gain at
   the smallest label count and its standard error (paired over seeds: both arms of a seed share
   the labeled sample and its order).

``--work DIR`` keeps everything; a second call reuses the data, the pretraining and each finished
fine-tuning run (``results.json``), so an interrupted call continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from benchmarks.finetune_gain import run  # noqa: E402 - one subprocess runner for both scripts
from benchmarks.seed_analyses_report import Run, report  # noqa: E402
from conf.errors import UserError  # noqa: E402
from data.jsonl import iter_jsonl  # noqa: E402

TASK = """task: sentiment_zero_shot
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {validation}
    train: {train}
output_type: multiple_choice
validation_split: validation
fewshot_split: train
doc_to_text: {doc_to_text}
doc_to_choice: {choices}
doc_to_target: {target}
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
process_results: !function zero_shot_metrics.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: auc
    aggregation: !function zero_shot_metrics.auc
    higher_is_better: true
metadata:
  version: 1.0
"""


def zero_shot_task(args: argparse.Namespace, path: Path) -> None:
    """An lm-eval task: the review, the prompt, then the verbalizer of each label (GPT-1's zero-shot
    sentiment), scored by accuracy and by the AUC of the answers' margin (benchmarks/zero_shot_metrics.py,
    copied next to the YAML, where lm-eval's ``!function`` looks)."""
    labels = sorted(args.verbalizers)
    targets = json.dumps({label: i for i, label in enumerate(labels)})
    quote = json.dumps  # a JSON string is a YAML double-quoted scalar
    path.write_text(
        TASK.format(
            validation=quote(str(args.validation)),
            train=quote(str(args.train)),
            doc_to_text=quote("{{ text }}" + args.prompt),
            choices=json.dumps([args.verbalizers[label] for label in labels]),
            target=quote("{{ " + targets + "[label] }}"),
        )
    )
    shutil.copy(Path(__file__).with_name("zero_shot_metrics.py"), path.with_name("zero_shot_metrics.py"))
    spec = {"labels": labels, "field": "label"}
    path.with_name("sentiment_zero_shot_labels.json").write_text(json.dumps(spec))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train")
    parser.add_argument("validation")
    parser.add_argument("test")
    parser.add_argument("--work", default=None, help="keeps every part; a second call reuses the finished ones")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE trained on TRAIN's texts")
    parser.add_argument("--seq-len", type=int, default=256, help="pretraining context (5-shot prompts need ~250)")
    parser.add_argument("--pretrain-steps", type=int, default=3000, help="of 4 x seq-len tokens")
    parser.add_argument("--eval-every", type=int, default=500, help="in-loop zero-shot evaluation")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--verbalizers", default="rotten=bad,fresh=good", help="LABEL=WORD,...: zero-shot answers")
    parser.add_argument("--prompt", default=" very", help="appended to the review (GPT-1's zero-shot sentiment)")
    parser.add_argument("--labels", nargs="+", default=["100", "300", "1000", "all"], help="label counts")
    parser.add_argument(
        "--finetune-steps", type=int, default=100, help="updates of a fine-tuning run (at least one epoch)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak learning rate")
    parser.add_argument("--max-len", type=int, default=64, help="fine-tuning tokens per example")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--select-seeds", type=int, default=2, help="the first N seeds choose λ and LP-FT")
    parser.add_argument("--transfer-seeds", type=int, default=2)
    parser.add_argument("--transfer-labels", default="1000")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs side by side")
    args = parser.parse_args()
    for key in ("train", "validation", "test"):
        path = Path(getattr(args, key)).resolve()
        if not path.is_file():
            parser.exit(2, f"error: {key} file {path}: no such file\n")
        setattr(args, key, path)
    try:
        args.verbalizers = dict(pair.split("=", 1) for pair in args.verbalizers.split(","))
    except ValueError:
        parser.exit(2, f"error: --verbalizers {args.verbalizers}: expected LABEL=WORD,LABEL=WORD\n")
    try:
        rows = [row for _, row in iter_jsonl(args.train)]
        labels = {str(row["label"]) for row in rows}
    except UserError as exc:
        parser.exit(2, f"error: TRAIN file: {exc}\n")
    except KeyError:
        parser.exit(2, f"error: TRAIN file {args.train}: a row has no label\n")
    if set(args.verbalizers) != labels:
        parser.exit(2, f"error: --verbalizers names {sorted(args.verbalizers)}, TRAIN's labels are {sorted(labels)}\n")
    if not 1 <= args.select_seeds <= len(args.seeds) or not 1 <= args.transfer_seeds <= len(args.seeds):
        parser.exit(2, "error: --select-seeds and --transfer-seeds must be between 1 and the number of --seeds\n")
    size = len(rows)
    args.label_counts = [size if n == "all" else int(n) for n in args.labels]
    args.train_size = size
    return args


def pretrain(args: argparse.Namespace, work: Path) -> Path:
    """The data, the pretrained run and its in-loop zero-shot evaluations (reused when finished)."""
    data = work / "data"
    if not (data / "manifest.json").is_file():
        prep = [f"input={args.train}", f"out={data}", "tokenizer=bpe", f"vocab_size={args.vocab_size}"]
        run(["data.prepare", *prep, f"seq_len={args.seq_len}", "overwrite=true"], work / "prepare.log")
    task = work / "sentiment_zero_shot.yaml"
    zero_shot_task(args, task)
    run_dir = work / "pretrain"
    steps = args.pretrain_steps
    if _last_eval_step(run_dir) != steps:
        micro = max(1, 1024 // args.seq_len)  # 1,024 tokens a step, as finetune_gain.sh's 16 x 64
        overrides = [
            f"data.dir={data}",
            "model=tiny",
            f"model.seq_len={args.seq_len}",
            f"model.dropout={args.dropout}",
            f"run.dir={run_dir}",
            f"train.max_steps={steps}",
            f"train.micro_batch={micro}",
            f"train.global_batch={micro}",
            f"train.eval_every={max(steps // 4, 1)}",
            f"train.save_every={args.eval_every}",  # an interrupted call resumes from the last evaluation
            "train.sample_tokens=0",
            f"eval.every_steps={args.eval_every}",
            f"eval.tasks=[{task}]",
            "eval.num_fewshot=[0,5]",
            "logging.wandb=disabled",
            "logging.progress_bar=false",
        ]
        run(["pretrain.train", *overrides], work / "pretrain.log")
    return run_dir


def _last_eval_step(run_dir: Path) -> int | None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    steps = [
        row["step"]
        for row in map(json.loads, filter(str.strip, metrics.read_text().split("\n")))
        if "eval_time_s" in row
    ]
    return max(steps, default=None)


def updates(args: argparse.Namespace, labels: int) -> int:
    """A run's updates: ``--finetune-steps``, or one epoch where that is more (all the labels are seen)."""
    return max(args.finetune_steps, min(labels, args.train_size) // 32)


def lpft_epochs(args: argparse.Namespace, labels: int) -> int | None:
    """Head-only epochs of LP-FT: about a third of the updates, if a whole epoch fits in half of them."""
    per_epoch, steps = labels // 32, updates(args, labels)
    if per_epoch < 1 or per_epoch > steps // 2:
        return None
    return max(1, round(steps / 3 / per_epoch))


class Runner:
    """Fine-tuning runs by name, each run once (a finished ``results.json`` is reused)."""

    def __init__(self, args: argparse.Namespace, work: Path, pretrained: Path):
        self.args, self.work, self.pretrained = args, work / "finetune", pretrained
        self.work.mkdir(exist_ok=True)

    def overrides(self, r: Run) -> list[str]:
        args = self.args
        labels = [] if r.labels >= args.train_size else [f"task.max_train_examples={r.labels}"]
        return [
            f"init.checkpoint={self.pretrained}",
            "task.type=classification",
            f"task.train={args.train}",
            f"task.validation={args.validation}",
            f"task.test={args.test}",
            f"task.max_len={args.max_len}",
            *labels,
            f"finetune.aux_lm_weight={r.lam}",
            f"finetune.from_scratch={str(r.scratch).lower()}",
            f"finetune.head_only_epochs={r.head_epochs}",
            *([] if r.layers is None else [f"finetune.transfer_layers={r.layers}"]),
            "finetune.epochs=1",  # the length is train.max_steps
            f"train.max_steps={updates(args, r.labels)}",
            f"train.lr={args.lr}",
            f"train.seed={r.seed}",
            "train.eval_every=1000000",  # validation once, at the end
            f"run.dir={self.work / r.name}",
            "train.save_every=-1",
            "logging.wandb=disabled",
            "logging.progress_bar=false",
        ]

    def results(self, runs: list[Run]) -> dict[str, dict]:
        """Run what has no results yet (side by side, one thread each); every run's results.json."""
        todo = {r.name: r for r in runs if not (self.work / r.name / "results.json").is_file()}
        threads = max(1, (os.cpu_count() or 1) // self.args.jobs)
        for name in todo:  # a run stopped half-way wrote no checkpoint (save_every=-1): start it afresh
            partial = self.work / name
            if partial.exists():
                shutil.rmtree(partial)  # only ever this script's own run dir
        with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            jobs = [
                pool.submit(run, ["pretrain.finetune", *self.overrides(r)], self.work / f"{name}.log", threads)
                for name, r in todo.items()
            ]
            for job in jobs:
                job.result()
        return {r.name: json.loads((self.work / r.name / "results.json").read_text()) for r in runs}


def selection_grid(args: argparse.Namespace, labels: int, seeds: list[int]) -> list[Run]:
    grid = []
    for scratch in (False, True):
        for lam in (0.0, 0.5):
            heads = [0] if scratch else [0, lpft_epochs(args, labels)]
            for head in heads:
                if head is None:
                    continue
                grid += [Run(labels, scratch, lam, head, None, seed) for seed in seeds]
    return grid


def main() -> None:
    args = parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="seed-analyses-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    started = time.perf_counter()
    pretrained = pretrain(args, work)
    runner = Runner(args, work, pretrained)
    select = args.seeds[: args.select_seeds]
    grid = [r for n in args.label_counts for r in selection_grid(args, n, select)]
    chosen_runs = runner.results(grid)
    winners: dict[tuple[int, bool], Run] = {}
    for n in args.label_counts:
        for scratch in (False, True):
            configs: dict[tuple[float, int], list[float]] = {}
            for r in grid:
                if r.labels == n and r.scratch == scratch:
                    configs.setdefault((r.lam, r.head_epochs), []).append(chosen_runs[r.name]["val_acc"])
            lam, head = max(configs, key=lambda c: sum(configs[c]) / len(configs[c]))
            winners[(n, scratch)] = Run(n, scratch, lam, head, None, 0)
    full = [r.with_seed(seed) for r in winners.values() for seed in args.seeds]
    transfer_n = args.train_size if args.transfer_labels == "all" else int(args.transfer_labels)
    full_ft: dict[float, list[float]] = {}  # the pretrained model's full fine-tuning at the transfer label count
    for r in grid:
        if (r.labels, r.scratch, r.head_epochs) == (transfer_n, False, 0):
            full_ft.setdefault(r.lam, []).append(chosen_runs[r.name]["val_acc"])
    transfer_lam = max(full_ft, key=lambda lam: sum(full_ft[lam]) / len(full_ft[lam])) if full_ft else 0.0
    layers = int(OmegaConf.load(pretrained / "config.yaml").model.num_layers)
    transfer = [
        Run(transfer_n, False, transfer_lam, 0, k if k < layers else None, seed)
        for k in range(layers + 1)
        for seed in args.seeds[: args.transfer_seeds]
    ]
    results = runner.results(full + transfer)
    report(args, work, pretrained, grid, chosen_runs, winners, results, transfer, time.perf_counter() - started)


if __name__ == "__main__":
    main()
