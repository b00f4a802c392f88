"""Make megatron-core run on CPU-only machines (gloo backend), and fix it where the pinned version needs it.

The entry points call :func:`apply` explicitly, once, before building a model:

- :mod:`.version_fixes`: fixes of megatron-core bugs on the path it takes without Apex or
  Transformer Engine, applied on CPU and GPU alike;
- :mod:`.shims`: CPU-only stand-ins for megatron-core's CUDA assumptions (placement,
  syncing, the RNG tracker, CUDA type checks), applied only when CUDA is absent;
- :mod:`.targets`: the one table of every third-party attribute this project patches
  anywhere in ``parallel/``, with what each patch relies on; a test checks it against the
  installed packages, and :func:`apply` checks its own rows before patching.

Both kinds are written for the megatron-core range in :data:`TESTED_MEGATRON`: on another
version :func:`apply` raises instead of silently running half-patched code.
"""

from __future__ import annotations

import torch

from parallel.cpu_compat import shims, targets, version_fixes
from parallel.cpu_compat.shims import _CpuRNGStatesTracker, _CpuTorch, tensors_pass_as_cuda
from parallel.cpu_compat.targets import FACADE_MODULES
from parallel.cpu_compat.version_fixes import _foreach_l2_norm

__all__ = [
    "FACADE_MODULES",
    "TESTED_MEGATRON",
    "_CpuRNGStatesTracker",
    "_CpuTorch",
    "_foreach_l2_norm",
    "apply",
    "check_version",
    "is_applied",
    "tensors_pass_as_cuda",
]

TESTED_MEGATRON = ((0, 16), (0, 17))  # [low, high) of (major, minor)

_applied = False  # the CPU shims are in place
_checked = False  # version and this package's rows of the targets table checked


def check_version() -> tuple[int, int]:
    """Refuse megatron-core versions the patches were not tested against."""
    from importlib.metadata import version

    text = version("megatron-core")
    major_minor = tuple(int(x) for x in text.split(".")[:2])
    low, high = TESTED_MEGATRON
    if not (low <= major_minor < high):
        raise RuntimeError(
            f"parallel/cpu_compat was tested with megatron-core {low[0]}.{low[1]}.x; "
            f"found {text}. Re-run tests/unit/test_cpu_compat.py and update TESTED_MEGATRON."
        )
    return major_minor  # type: ignore[return-value]


def apply(force: bool = False) -> bool:
    """Apply the version fixes, then the CPU shims when CUDA is absent (or ``force``).

    Idempotent. True when the CPU shims are in place, False with CUDA (fixes only).
    """
    global _applied, _checked
    if _applied:
        return True
    if not _checked:
        check_version()
        targets.verify(patched_by=(targets.SHIMS, targets.VERSION_FIXES))
        _checked = True
    version_fixes.apply()
    if torch.cuda.is_available() and not force:
        return False
    shims.apply()
    _applied = True
    return True


def is_applied() -> bool:
    return _applied
