"""``gpt-goodput RUN_DIR``: where a run's wall time went, and its goodput.

The command only: read ``RUN_DIR/metrics.jsonl``, add it up (``pretrain/trainer/goodput.py``, which
says exactly what each row counts), print the table (or ``--json``) and write ``RUN_DIR/goodput.png``.
It reads a finished run, a running one or a killed one alike; it imports no torch. Not a Hydra app:
it takes a run dir, not a config. A bad RUN_DIR is one ``error:`` line and exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

USAGE = "usage: gpt-goodput RUN_DIR [--json]  (the account of a gpt-pretrain / gpt-finetune run dir)"
HELP = """Where a run's wall time went, from RUN_DIR/metrics.jsonl (a finished, running or killed run, all of its
sessions): productive steps, start-up and checkpoint load, checkpoint save stalls, evaluation, skipped
steps, steps recomputed after a failure, time between a failure (or stop) and the next start, and
goodput = productive / total wall time (MaxText's definition; docs/logging.md says what each row counts).
Writes RUN_DIR/goodput.png.
  --json   one JSON object instead of the table"""
PLOT = "goodput.png"


def main(argv: list[str] | None = None) -> None:
    from conf.cli import fail

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(f"{USAGE}\n\n{HELP}")
        return
    as_json = "--json" in args
    rest = [a for a in args if a != "--json"]
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        fail(f"{unknown[0]}: unknown option ({USAGE})")
    if len(rest) != 1:
        fail(f"expected one RUN_DIR, got {len(rest)} ({USAGE})")
    run_dir = Path(rest[0].removeprefix("run.dir=")).expanduser()
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        fail(f"{run_dir}: not a directory (a run dir of gpt-pretrain or gpt-finetune)")
    if not metrics.is_file():
        fail(f"{run_dir}: no metrics.jsonl (not a run dir, or a run that never started training)")

    from pretrain.trainer import goodput
    from pretrain.trainer.metrics import read_metrics

    try:
        acc = goodput.account(read_metrics(run_dir), goodput.last_write(metrics))
    except ValueError as exc:
        fail(f"{metrics}: {exc}")
    plot = None
    try:
        plot = goodput.plot(acc, run_dir / PLOT)
    except Exception as exc:  # noqa: BLE001 - the figures matter more than the picture: say why, go on
        print(f"warning: {PLOT} not written ({type(exc).__name__}: {exc})", file=sys.stderr)
    if as_json:
        print(json.dumps({**acc.to_dict(), "plot": str(plot) if plot else None}, indent=1))
    else:
        print(f"goodput of {run_dir} ({goodput.sessions(acc)})")
        print(goodput.table(acc))
        if plot is not None:
            print(f"plot: {plot}")


if __name__ == "__main__":
    main()
