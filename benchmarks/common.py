"""Helpers shared by the benchmarks: a prepared shard set and the run's step times."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINYSHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def prepared_shards(data_dir: str | None) -> Path:
    """``--data DIR`` if given, else tinyshakespeare (char, seq_len 64) in a temp dir."""
    if data_dir:
        return Path(data_dir)
    if not TINYSHAKESPEARE.is_file():
        sys.exit(f"benchmark: {TINYSHAKESPEARE} not found; pass --data DIR (a gpt-prepare output)")
    out = Path(tempfile.mkdtemp(prefix="bench-")) / "ts"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data.prepare",
            f"input={TINYSHAKESPEARE}",
            f"out={out}",
            "tokenizer=char",
            "seq_len=64",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return out


def steady_tokens_per_s(rows: list[dict], skip: int) -> float:
    """Tokens over seconds of the training steps after ``skip`` warm-up steps (``metrics.jsonl`` rows):
    the rate a run's wall clock sees. A median of per-step rates would leave out the slow steps a
    garbage collection or a neighbour's burst causes, and they are part of any run's time."""
    steps = [r for r in rows if "tokens_per_s" in r and "step_time_s" in r and r["step"] > skip]
    return sum(r["tokens_per_s"] * r["step_time_s"] for r in steps) / sum(r["step_time_s"] for r in steps)


def pretrain_tokens_per_s(run_dir: Path, skip: int) -> float:
    """Steady tokens/s of a ``gpt-pretrain`` run from its ``metrics.jsonl`` (:func:`steady_tokens_per_s`)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return steady_tokens_per_s(rows, skip)
