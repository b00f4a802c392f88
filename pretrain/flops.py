"""Model FLOPs utilisation: achieved training FLOP/s over the device's matmul peak.

The peak is ``train.peak_tflops`` when given (a datasheet number, e.g. 989 for H100 bf16
dense), else measured here with a short square-matmul benchmark in the training dtype, so
that MFU on a CPU is relative to what this CPU's BLAS actually reaches.
"""

from __future__ import annotations

import time

import torch


def measured_peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of repeated [size×size] @ [size×size] matmuls on the current device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return 2.0 * size**3 * count / (time.perf_counter() - start)


def peak_flops(peak_tflops: float | None, bf16: bool) -> float:
    if peak_tflops:
        return float(peak_tflops) * 1e12
    return measured_peak_flops(torch.bfloat16 if bf16 else torch.float32)
