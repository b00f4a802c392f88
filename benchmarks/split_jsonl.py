"""Split a JSONL file in two by a grouping field, so that no group is on both sides.

    python benchmarks/split_jsonl.py ../shared/data/rotten_tomatoes.validation.jsonl /tmp/rt [--by movie]

writes ``/tmp/rt/dev.jsonl`` and ``/tmp/rt/test.jsonl`` (groups dealt by a hash of their name: the
same split on every machine). rotten_tomatoes has no test file of its own; its validation file is
split by movie so that the reviews of one film do not sit on both sides of a model selection.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("out_dir")
    parser.add_argument("--by", default="movie", help="the grouping field (rows without it form one group each)")
    parser.add_argument("--salt", default="", help="another split of the same groups (e.g. of a dev file in two)")
    args = parser.parse_args()
    source, out = Path(args.input), Path(args.out_dir)
    if not source.is_file():
        parser.exit(2, f"error: {source}: no such file\n")
    targets = [out / "dev.jsonl", out / "test.jsonl"]
    if any(path.exists() for path in targets):
        parser.exit(2, f"error: {out} already holds dev.jsonl or test.jsonl (not overwritten)\n")
    out.mkdir(parents=True, exist_ok=True)
    sides: list[list[str]] = [[], []]
    for number, line in enumerate(source.read_text().split("\n")):
        if not line.strip():
            continue
        row = json.loads(line)
        group = str(row.get(args.by, f"row {number}"))
        sides[hashlib.sha256((args.salt + group).encode()).digest()[0] % 2].append(line)
    if not all(sides):
        parser.exit(2, f"error: {source}: every row fell on one side ({len(sides[0])} / {len(sides[1])}); try --salt\n")
    for path, lines in zip(targets, sides, strict=True):
        path.write_text("\n".join(lines) + "\n")
        print(f"{path}: {len(lines)} rows")


if __name__ == "__main__":
    main()
