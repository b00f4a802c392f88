"""A/B: ``gpt-pretrain`` tokens/s of two revisions, in alternated rounds on this machine.

    python benchmarks/ab.py --base REV [--head REV] [--model tiny|llama-tiny|moe-tiny|all] [--rounds 6] [--steps 200]

Each revision is checked out into its own worktree (``git worktree``, under ``--work``, kept and
reused) and run with this venv's packages, the revision's own code first on ``sys.path``
(``PYTHONPATH`` + cwd): the dependency pins must match, which the harness checks
(``pyproject.toml``'s dependencies of both revisions), else it refuses. ``--head`` defaults to the
working tree (uncommitted changes included). Rounds alternate A B, B A, A B, ... so that machine
drift hits both sides alike; each round's figure is its tokens over its steps' seconds after
``--skip`` warm-up steps, and each pair of adjacent rounds gives one ratio head / base.

Printed: every round's tokens/s, the median ratio, and a 90% bootstrap interval of the median
ratio. The verdict ("head is faster / slower by X%") is printed only when the interval excludes
1.0; otherwise "no verdict: the interval is wider than the effect" — run more rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, prepared_shards, steady_tokens_per_s  # noqa: E402

MODELS = ("tiny", "llama-tiny", "moe-tiny")


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def checkout(rev: str | None, work: Path) -> tuple[Path, str]:
    """(a directory holding ``rev``'s tree, its short name); ``None``: this working tree."""
    if rev is None:
        dirty = " + uncommitted" if git("status", "--porcelain", "--untracked-files=no") else ""
        return REPO, f"worktree ({git('rev-parse', '--short', 'HEAD')}{dirty})"
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = work / sha[:12]
    if not (tree / ".git").exists():
        git("worktree", "add", "--detach", str(tree), sha)
    return tree, f"{rev} ({sha[:10]})"


def dependencies(tree: Path) -> list[str]:
    return sorted(tomllib.loads((tree / "pyproject.toml").read_text())["project"]["dependencies"])


def pins_changed(base: list[str], head: list[str]) -> list[str]:
    """Packages both revisions depend on with another requirement (a package only one of them uses
    is fine: this venv has it, and the other revision never imports it)."""
    import re

    def by_name(pins: list[str]) -> dict[str, str]:
        return {re.split(r"[<>=!~\[; ]", pin, maxsplit=1)[0].lower(): pin for pin in pins}

    a, b = by_name(base), by_name(head)
    return sorted(name for name in a.keys() & b.keys() if a[name] != b[name])


def one_round(tree: Path, data: Path, model: str, steps: int, skip: int) -> float:
    """Median tokens/s after ``skip`` steps of one gpt-pretrain run of ``tree``'s code."""
    with tempfile.TemporaryDirectory(prefix="ab-run-") as run:
        args = [f"data.dir={data}", f"run.dir={run}/r", f"model={model}", f"train.max_steps={steps}"]
        args += ["train.micro_batch=12", "train.global_batch=12", "train.eval_every=0", "train.save_every=-1"]
        args += ["train.eval_batches=1", "train.sample_tokens=0", "logging.wandb=disabled"]
        args += ["logging.progress_bar=false", "logging.console_every=100000", "train.preflight=off"]
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        done = subprocess.run(
            [sys.executable, "-m", "pretrain.train", *args], cwd=tree, env=env, capture_output=True, text=True
        )
        if done.returncode:
            sys.exit(f"error: {tree}: gpt-pretrain failed:\n{done.stderr[-2000:]}")
        rows = [json.loads(line) for line in (Path(run) / "r" / "metrics.jsonl").read_text().splitlines()]
    return steady_tokens_per_s(rows, skip)


def interval(ratios: list[float], level: float = 0.90, draws: int = 4000) -> tuple[float, float]:
    """Bootstrap interval of the median of ``ratios`` (seeded: the same rounds give the same interval)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    tail = (1 - level) / 2
    return medians[int(tail * draws)], medians[int((1 - tail) * draws) - 1]


def verdict(ratios: list[float]) -> str:
    low, high = interval(ratios)
    median = statistics.median(ratios)
    line = f"head / base = {median:.3f} (90% interval {low:.3f} - {high:.3f}, {len(ratios)} paired rounds)"
    if low <= 1.0 <= high:
        return f"{line}; no verdict: the interval is wider than the effect (run more rounds)"
    return f"{line}; head is {'faster' if median > 1 else 'slower'} by {abs(median - 1) * 100:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a git revision")
    parser.add_argument("--head", default=None, help="a git revision (default: the working tree)")
    parser.add_argument("--model", choices=(*MODELS, "all"), default="tiny")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per side (alternated)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of each round")
    parser.add_argument("--data", default=None, help="a gpt-prepare output (default: tinyshakespeare, char)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gpt-ab"), help="worktrees, kept")
    args = parser.parse_args()
    if args.rounds < 2 or args.steps <= args.skip:
        sys.exit("error: --rounds >= 2 and --steps > --skip")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        (base, base_name), (head, head_name) = checkout(args.base, work), checkout(args.head, work)
    except subprocess.CalledProcessError as exc:
        sys.exit(f"error: {exc.stderr.strip() or exc}")
    changed = pins_changed(dependencies(base), dependencies(head))
    if changed:  # a package both revisions use, pinned differently: this venv cannot be both
        sys.exit(f"error: the revisions pin {', '.join(changed)} differently; install each into its own venv")
    data = prepared_shards(args.data)
    print(f"A = base {base_name}; B = head {head_name}; {args.steps} steps a round, first {args.skip} left out")
    for model in MODELS if args.model == "all" else (args.model,):
        sides: dict[str, list[float]] = {"base": [], "head": []}
        for number in range(args.rounds):
            order = (("base", base), ("head", head)) if number % 2 == 0 else (("head", head), ("base", base))
            for side, tree in order:
                sides[side].append(one_round(tree, data, model, args.steps, args.skip))
            print(f"{model} round {number + 1}: base {sides['base'][-1]:,.0f}  head {sides['head'][-1]:,.0f} tokens/s")
        ratios = [h / b for h, b in zip(sides["head"], sides["base"], strict=True)]
        print(f"{model}: {verdict(ratios)}")


if __name__ == "__main__":
    main()
