"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

MFU is reported only against a peak a step cannot exceed: ``train.peak_tflops`` when given (a
datasheet number, e.g. 989 for H100 bf16 dense), else the datasheet of a GPU the hardware presets
know (``conf/hardware/``). A CPU has no such number (a short matmul probe at start measures what its
BLAS reached in that moment, which a busy or idle neighbour moves, and a step then "exceeded" it), so
a CPU run logs no MFU unless ``train.peak_tflops`` is given; ``benchmarks/mfu.py`` measures a peak
once and passes it to the runs it compares.
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


def peak_flops(peak_tflops: float | None, bf16: bool) -> float | None:
    """The device's peak FLOP/s for MFU, or None when none is known (module docstring)."""
    if peak_tflops:
        return float(peak_tflops) * 1e12
    if not torch.cuda.is_available():
        return None
    from parallel.plan.hardware import detected_gpu, preset

    name, _, _ = detected_gpu()
    datasheet = preset(name).get("peak_tflops_bf16" if bf16 else "peak_tflops_fp32") if name else None
    return float(datasheet) * 1e12 if datasheet else None
