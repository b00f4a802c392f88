"""``metrics.jsonl``: reading it (torn lines skipped) and cutting it back to a resumed step. Apart from
``metrics.py`` so the plots and the goodput account read it without importing the logger."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


def parse_lines(text: str) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """``(line, record)`` of every well-formed line, and how many were not: a line cut off by a
    crash or a full disk (or any garbage) is skipped, never a reason to stop a resume or a plot."""
    kept, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"] if isinstance(record, dict) else None
        except (ValueError, KeyError):
            step = None
        if isinstance(step, int) and not isinstance(step, bool):
            kept.append((line, record))
        else:
            bad += 1
    return kept, bad


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [record for _, record in parse_lines(path.read_text(errors="replace"))[0]]


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (by a run killed after its last checkpoint), and any torn
    or garbage line (one note says how many)."""
    if not path.is_file():
        return
    records, bad = parse_lines(path.read_text(errors="replace"))
    if bad:
        print(f"note: {path}: dropped {bad} malformed line(s) (a write cut off by a crash?)", flush=True)
    kept = [line for line, record in records if record["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
