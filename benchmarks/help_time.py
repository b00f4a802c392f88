"""Wall time of every console script's ``--help`` (median of N runs each, runs alternated across
commands so machine drift hits them alike). Goal: well under 1.5 s each.

    python benchmarks/help_time.py [--runs 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = (
    "gpt-prepare",
    "gpt-pretrain",
    "gpt-finetune",
    "gpt-eval",
    "gpt-generate",
    "gpt-export",
    "gpt-import",
    "gpt-plan",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        sys.exit(f"error: {', '.join(missing)} not on PATH (pip install -e . in this venv)")
    times: dict[str, list[float]] = {c: [] for c in COMMANDS}
    for _ in range(args.runs):
        for command in COMMANDS:
            start = time.perf_counter()
            subprocess.run([command, "--help"], check=True, capture_output=True)
            times[command].append(time.perf_counter() - start)
    for command, values in times.items():
        print(f"{command:14s} median {statistics.median(values):.2f} s  (min {min(values):.2f}, max {max(values):.2f})")
    print(f"slowest median: {max(statistics.median(v) for v in times.values()):.2f} s")


if __name__ == "__main__":
    main()
