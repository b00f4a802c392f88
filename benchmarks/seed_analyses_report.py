"""Tables, plots and goals of ``benchmarks/seed_analyses.py`` (kept apart: the runs are there)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

TASK = "sentiment_zero_shot"


@dataclass(frozen=True)
class Run:
    """One fine-tuning run: label count, init, λ, LP-FT head-only epochs, layers transferred, seed."""

    labels: int
    scratch: bool
    lam: float
    head_epochs: int
    layers: int | None  # None: all
    seed: int

    @property
    def name(self) -> str:
        init = "scratch" if self.scratch else "pretrained"
        k = "" if self.layers is None else f"-k{self.layers}"
        return f"n{self.labels}-{init}-lambda{self.lam}-head{self.head_epochs}{k}-seed{self.seed}"

    @property
    def config(self) -> str:
        lpft = f", LP-FT {self.head_epochs} ep" if self.head_epochs else ""
        return f"λ = {self.lam}{lpft}"

    def with_seed(self, seed: int) -> Run:
        return replace(self, seed=seed)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def zero_shot(args: argparse.Namespace, pretrained: Path, lines: list[str]) -> tuple[list, float, int]:
    """The in-loop evaluations: (step, {metric: accuracy}) rows; the majority-label rate; documents."""
    docs = [json.loads(line)["label"] for line in args.validation.read_text().split("\n") if line.strip()]
    majority = Counter(docs).most_common(1)[0][1] / len(docs)
    first = sorted(args.verbalizers)[0]
    counts = (sum(label == first for label in docs), sum(label != first for label in docs))
    metrics = _rows(pretrained / "metrics.jsonl")
    losses = {row["step"]: row["val_loss"] for row in metrics if "val_loss" in row}
    keys = [f"{k}shot/{m}" for k in (0, 5) for m in ("acc", "auc")]
    evaluated = {row["step"]: row for row in metrics if "eval_time_s" in row}  # a step evaluated twice: its last
    points = [(step, {key: row.get(f"eval/{TASK}/{key}") for key in keys}) for step, row in sorted(evaluated.items())]
    lines += [
        f"\n## Zero-shot during pretraining ({len(docs)} VALIDATION reviews; majority label {majority:.4f})\n",
        "Accuracy ± sqrt(p(1-p)/n); AUC of the answers' log-likelihood margin (0.5: the review is not "
        "read) ± Hanley and McNeil's standard error.\n",
        "| step | LM val loss | 0-shot acc | 0-shot AUC | 5-shot acc | 5-shot AUC |",
        "|---|---|---|---|---|---|",
    ]
    for step, values in points:
        cells = [
            "—" if values[key] is None else f"{values[key]:.4f} ± {standard_error(key, values[key], counts):.4f}"
            for key in keys
        ]
        loss = f"{losses[step]:.3f}" if step in losses else ""
        lines.append(f"| {step} | {loss} | " + " | ".join(cells) + " |")
    return points, majority, counts


def standard_error(key: str, p: float, counts: tuple[int, int]) -> float:
    """Of an accuracy (binomial) or of an AUC (Hanley and McNeil 1982) over ``counts`` reviews per label."""
    if not key.endswith("auc"):
        return math.sqrt(p * (1 - p) / sum(counts))
    n1, n2 = counts
    q1, q2 = p / (2 - p), 2 * p * p / (1 + p)
    return math.sqrt((p * (1 - p) + (n1 - 1) * (q1 - p * p) + (n2 - 1) * (q2 - p * p)) / (n1 * n2))


def report(
    args: argparse.Namespace,
    work: Path,
    pretrained: Path,
    grid: list[Run],
    selection: dict[str, dict],
    winners: dict[tuple[int, bool], Run],
    results: dict[str, dict],
    transfer: list[Run],
    seconds: float,
) -> None:
    lines = [f"# seed_analyses: {args.train.name} / {args.validation.name} / {args.test.name}, {seconds:.0f} s"]
    points, majority, counts = zero_shot(args, pretrained, lines)

    lines += [
        "\n## Selection on VALIDATION (mean validation accuracy over the selection seeds)\n",
        "| labels | init | configuration | val acc |",
        "|---|---|---|---|",
    ]
    configs: dict[tuple[int, bool, float, int], list[float]] = {}
    for r in grid:
        configs.setdefault((r.labels, r.scratch, r.lam, r.head_epochs), []).append(selection[r.name]["val_acc"])
    for (n, scratch, lam, head), accs in configs.items():
        chosen = winners[(n, scratch)]
        mark = " **chosen**" if (chosen.lam, chosen.head_epochs) == (lam, head) else ""
        config = Run(n, scratch, lam, head, None, 0).config
        lines.append(f"| {n} | {_init(scratch)} | {config}{mark} | {statistics.fmean(accs):.4f} |")

    curve: dict[tuple[int, bool], tuple[float, float, list[float]]] = {}
    lines += [
        f"\n## Label curve: TEST accuracy, {len(args.seeds)} seeds, {args.finetune_steps} updates of 32 "
        "(one epoch where that is more)\n",
        "| labels | init | chosen on VALIDATION | val acc | TEST acc ± s.e. |",
        "|---|---|---|---|---|",
    ]
    for (n, scratch), chosen in winners.items():
        runs = [chosen.with_seed(seed) for seed in args.seeds]
        tests = [results[r.name]["test_acc"] for r in runs]
        val = statistics.fmean(results[r.name]["val_acc"] for r in runs)
        mean, se = mean_se(tests)
        curve[(n, scratch)] = (mean, se, tests)
        lines.append(f"| {n} | {_init(scratch)} | {chosen.config} | {val:.4f} | {mean:.4f} ± {se:.4f} |")
    gains = {}
    for n in args.label_counts:
        diffs = [100 * (p - s) for p, s in zip(curve[(n, False)][2], curve[(n, True)][2], strict=True)]
        gains[n] = mean_se(diffs)
    lines.append(
        "\nGain of pretraining (points, paired over seeds): "
        + "; ".join(f"{n} labels {g:+.1f} ± {se:.1f}" for n, (g, se) in gains.items())
    )

    by_k: dict[int, list[float]] = {}
    layers = max(r.layers for r in transfer if r.layers is not None) + 1
    for r in transfer:
        by_k.setdefault(layers if r.layers is None else r.layers, []).append(results[r.name]["test_acc"])
    lines += [
        f"\n## Layers transferred: TEST accuracy, {transfer[0].labels} labels, λ = {transfer[0].lam}, "
        f"{args.transfer_seeds} seeds\n",
        "| layers kept | TEST acc ± s.e. |",
        "|---|---|",
    ]
    lines += [f"| {k} | {mean_se(v)[0]:.4f} ± {mean_se(v)[1]:.4f} |" for k, v in sorted(by_k.items())]

    lines += ["\n## Goals\n", *goals(points, counts, by_k, gains, args.label_counts)]
    plots(work, points, majority, curve, args.label_counts, by_k)
    smallest = min(args.label_counts)
    lines.append(
        f"\ngain of pretraining at {smallest} labels (pretrained - scratch, TEST, mean over "
        f"{len(args.seeds)} seeds), points: {gains[smallest][0]:.1f}, standard error {gains[smallest][1]:.1f}"
    )
    text = "\n".join(lines) + "\n"
    (work / "tables.md").write_text(text)
    print(text, flush=True)


def _init(scratch: bool) -> str:
    return "from scratch" if scratch else "pretrained"


def goals(points: list, docs: tuple[int, int], by_k: dict, gains: dict, counts: list[int]) -> list[str]:
    out = []
    if len(points) >= 2:
        (first_step, first), (last_step, last) = points[0], points[-1]
        for key, value in last.items():
            if value is None or first[key] is None:
                continue
            se = math.hypot(*(standard_error(key, p, docs) for p in (first[key], value)))
            diff = value - first[key]
            verdict = "met" if diff > 2 * se else "not met"
            out.append(
                f"- zero-shot rises ({key}, step {first_step} → {last_step}): {first[key]:.4f} → {value:.4f}, "
                f"{diff:+.4f} against 2 s.e. {2 * se:.4f}: **{verdict}**"
            )
    ks = sorted(by_k)
    means = [statistics.fmean(by_k[k]) for k in ks]
    rises = sum(b > a for a, b in zip(means, means[1:], strict=False))
    out.append(
        f"- accuracy rises with layers transferred: {' → '.join(f'{m:.4f}' for m in means)} "
        f"({rises} of {len(means) - 1} steps up; k = {ks[-1]} minus k = 0: {100 * (means[-1] - means[0]):+.1f} points)"
    )
    scarce = [n for n in counts if n <= 300]
    if scarce and 1000 in gains:
        best = max(scarce, key=lambda n: gains[n][0])
        met = gains[best][0] >= 5 and gains[best][0] > gains[1000][0]
        out.append(
            f"- gain at ≤ 300 labels ≥ 5 points and larger than at 1,000: best {gains[best][0]:+.1f} ± "
            f"{gains[best][1]:.1f} at {best}, {gains[1000][0]:+.1f} ± {gains[1000][1]:.1f} at 1000: "
            f"**{'met' if met else 'not met'}**"
        )
    return out


@contextlib.contextmanager
def _figure(path: Path, title: str, xlabel: str, ylabel: str) -> Iterator[Any]:
    """One small PNG (they are committed to the README) around the axes drawn in the block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    yield ax
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plots(work: Path, points: list, majority: float, curve: dict, counts: list[int], by_k: dict) -> None:
    title = "Zero-shot sentiment during pretraining"
    with _figure(work / "zero_shot.png", title, "pretraining step", "VALIDATION accuracy, AUC") as ax:
        steps = [step for step, _ in points]
        styles = {"0shot/acc": "o-", "0shot/auc": "s--", "5shot/acc": "^-", "5shot/auc": "v--"}
        for key, style in styles.items():
            label = key.replace("auc", "AUC")
            ax.plot(steps, [values[key] for _, values in points], style, markersize=3, label=label)
        ax.axhline(majority, color="grey", linewidth=0.8, linestyle=":", label="majority label")
    title = "Pretraining and the number of labels"
    with _figure(work / "label_curve.png", title, "labeled examples", "TEST accuracy") as ax:
        for scratch in (False, True):
            means = [curve[(n, scratch)][0] for n in counts]
            errors = [curve[(n, scratch)][1] for n in counts]
            ax.errorbar(counts, means, yerr=errors, marker="o", capsize=3, label=_init(scratch))
        ax.set_xscale("log")
    with _figure(work / "transfer.png", "Layers transferred", "pretrained blocks kept", "TEST accuracy") as ax:
        ks = sorted(by_k)
        stats = [mean_se(by_k[k]) for k in ks]
        ax.errorbar(ks, [m for m, _ in stats], yerr=[e for _, e in stats], marker="o", capsize=3)
        ax.set_xticks(ks)
