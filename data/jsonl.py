"""JSONL reading shared by ``gpt-prepare``, ``gpt-eval`` and ``gpt-finetune``: one object per line,
errors that name ``file:line``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conf.errors import UserError


def iter_jsonl(path: Path, text: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of ``path`` (or of ``text`` read from it).

    Lines are split on ``\\n`` only: ``str.splitlines()`` would also break at U+0085 and
    U+2028, which occur inside JSON strings of real data (rotten_tomatoes has them).
    """
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object")
        yield lineno, record
