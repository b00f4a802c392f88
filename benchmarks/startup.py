"""Time to the first step: ``startup_s`` of ``gpt-pretrain`` (from the process's start to the end of its
first step: imports, config, model build, data open, checkpoint load), for a new ``model=tiny`` run and for
the resume of a ``model=gpt2-small`` checkpoint, in alternated rounds; prints the medians and ranges.

    python benchmarks/startup.py [--rounds 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, prepared_shards  # noqa: E402

COMMON = [
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "logging.wandb=disabled",
    "logging.progress_bar=false",
]


def pretrain(run_dir: Path, data: Path, *overrides: str) -> tuple[float, float]:
    """(startup_s of the session's first step, wall seconds of the command)."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pretrain.train", f"data.dir={data}", f"run.dir={run_dir}", *COMMON, *overrides]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["startup_s"] for r in rows if "startup_s" in r][-1], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    data = prepared_shards(args.data)
    small = ["model=gpt2-small", "train.micro_batch=1", "train.global_batch=1", "train.save_every=1"]
    results: dict[str, list[float]] = {"tiny, new run": [], "gpt2-small, resume": []}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        saved = Path(tmp) / "gpt2-small"
        pretrain(saved, data, *small, "train.max_steps=1")  # the checkpoint the resumes load
        for i in range(args.rounds):
            results["tiny, new run"].append(
                pretrain(Path(tmp) / f"tiny{i}", data, "model=tiny", "train.max_steps=1")[0]
            )
            resumed = Path(tmp) / f"resume{i}"
            shutil.copytree(saved, resumed)
            results["gpt2-small, resume"].append(pretrain(resumed, data, *small, "train.max_steps=2")[0])
    for name, values in results.items():
        print(
            f"{name:20s} startup_s median {statistics.median(values):6.2f} (range {min(values):.2f}-{max(values):.2f})"
        )


if __name__ == "__main__":
    main()
