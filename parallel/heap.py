"""Keep freed CPU memory in the process: glibc's heap tuned for a training loop.

A training step allocates and frees the same tensors every step (activations, gradients,
optimizer temporaries). glibc's ``malloc`` serves blocks above its mmap threshold with fresh
``mmap`` calls and returns them with ``munmap`` when freed, and it trims the top of its heap back
to the OS once the free space there passes its trim threshold. Both thresholds start low (128 KiB,
raised only by some frees), so in a trainer process the next step takes the same memory back page
by page: every page is a minor fault that the kernel zeroes. A ``model=tiny`` CPU step was seen
to take ~2,000 faults where a bare loop of the same model took ~100 (which frees decide glibc's
dynamic threshold differs between processes; ``benchmarks/README.md`` has the counts and the speed).

So, once per trainer process: blocks up to 32 MiB (glibc's largest mmap threshold) come from the
heap, and the heap is never trimmed: memory freed in one step is reused by the next, as PyTorch's
own caching allocator does on a GPU. The cost is that the process's resident size stays at its
peak of such blocks instead of shrinking between steps. Blocks above 32 MiB are still mapped and
unmapped. ``train.keep_freed_memory=false`` keeps glibc's defaults; off glibc (macOS, musl) this is
a no-op. Done with ``mallopt`` (glibc's documented interface) rather than preloading another
allocator, which would need a library on every node and a relaunch.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's malloc.h parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: a larger value is refused


def keep_freed_memory() -> bool:
    """Set the two thresholds; True when glibc took both (False off glibc or if it refused)."""
    libc = _glibc()
    if libc is None:
        return False
    # -1 as the trim threshold (a size_t inside glibc) means: never trim (mallopt(3))
    trim = libc.mallopt(M_TRIM_THRESHOLD, -1)
    mmap = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    return bool(trim and mmap)


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it (and mallopt's parameter numbers)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
