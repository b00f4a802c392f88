"""``train.keep_freed_memory``: memory a step frees is reused by the next step, not faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from parallel import heap

# 64 blocks of 1 MiB written, then freed, four times: a step's allocations in miniature
PROGRAM = """
import ctypes, ctypes.util, resource, sys
from parallel import heap
if sys.argv[1] == "kept":
    assert heap.keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(1 << 20) for _ in range(64)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    for block in blocks:
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def faults_after_first_round(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(heap._glibc() is None, reason="glibc's mallopt only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    # glibc's defaults trim the freed 64 MiB back to the OS each round: 3 x 16,384 pages fault in again
    assert faults_after_first_round("default") > 30_000
    assert faults_after_first_round("kept") < 1_000
