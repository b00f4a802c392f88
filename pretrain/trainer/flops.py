"""Model FLOPs utilisation: achieved training FLOP/s over the device's matmul peak.

The peak is ``train.peak_tflops`` when given (a datasheet number, e.g. 989 for H100 bf16
dense), else measured at start with a short square-matmul benchmark in the training dtype, so
that MFU on a CPU is relative to what this CPU's BLAS actually reaches.
"""

from __future__ import annotations

import time

import torch


def measured_peak_flops(dtype: torch.dtype = torch.float32, size: int | None = None, seconds: float = 0.3) -> float:
    """FLOP/s of repeated [size×size] @ [size×size] matmuls on the current device.

    GPUs need large products (8192) and batches of launches between synchronisations to
    reach their peak; a CPU's BLAS peaks by 1024.
    """
    cuda = torch.cuda.is_available()
    size = size or (8192 if cuda else 1024)
    device = "cuda" if cuda else "cpu"
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    per_round = 10 if cuda else 1
    for _ in range(3):  # warm-up (clocks, cuBLAS heuristics)
        a @ b
    if cuda:
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(per_round):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        count += per_round
    return 2.0 * size**3 * count / (time.perf_counter() - start)


def peak_flops(peak_tflops: float | None, bf16: bool) -> float:
    if peak_tflops:
        return float(peak_tflops) * 1e12
    dtype = torch.bfloat16 if bf16 else torch.float32
    if torch.cuda.is_available():
        return measured_peak_flops(dtype)
    # a CPU's BLAS may peak at 1024 or 2048 depending on its caches: take the better
    return max(measured_peak_flops(dtype, size, seconds=0.2) for size in (1024, 2048))
