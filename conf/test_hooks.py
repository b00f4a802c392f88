"""Test-only fault injection, off in production.

A fault variable (``GPT_FAULT_NAN_STEPS`` ...) inherited by a real run must change nothing, so
each is read only when the test harness switch ``GPT_TEST_HARNESS=1`` is also set (the test suite
sets it for the runs it injects faults into); then one line says a fault is injected, and a
malformed value is a one-line error before any work.
"""

from __future__ import annotations

import os
import sys

from conf.errors import UserError

SWITCH = "GPT_TEST_HARNESS"


def enabled() -> bool:
    return os.environ.get(SWITCH) == "1"


def int_set(name: str, announce: bool = True) -> set[int]:
    """The comma-separated integers of fault variable ``name``; empty unless the harness is on."""
    raw = os.environ.get(name, "") if enabled() else ""
    try:
        values = {int(v) for v in raw.split(",") if v.strip()}
    except ValueError:
        raise UserError(f"{name}={raw}: expected comma-separated integers (a test-only fault hook)") from None
    if values and announce:
        print(f"warning: test fault injected: {name}={raw} ({SWITCH}=1)", file=sys.stderr, flush=True)
    return values


def int_value(name: str, default: int) -> int:
    values = int_set(name, announce=False)
    return next(iter(values)) if len(values) == 1 else default
