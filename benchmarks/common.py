"""Helpers shared by the benchmarks: a prepared shard set and the run's step times."""

from __future__ import annotations

import json
import statistics
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


def pretrain_tokens_per_s(run_dir: Path, skip: int) -> float:
    """Median tokens/s of the training steps logged by gpt-pretrain (after ``skip`` warm-up steps)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > skip]
    return statistics.median(rates)
