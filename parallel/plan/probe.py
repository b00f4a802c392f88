"""Calibration on this machine (``hardware.calibrate``): timings of what a plan asks for, at its shapes.

The planner times each linear layer (``F.linear`` forward + backward) and attention it predicts at
its own shape, with the threads a rank gets (all cores for one process, one under torchrun), plus a
copy (memory bandwidth) and gloo's collectives between two forked processes (latency and bytes).
Each probe takes milliseconds and is cached per shape; a plan's calibration is ~1-3 s.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timed(fn: Callable[[], object], budget_s: float = 0.06, cuda: bool = False) -> float:
    """Seconds per call of ``fn``: the best of rounds of calls (a round lasts >= 1 ms) within
    ``budget_s`` after a warm-up: the best is what the code reaches when the machine lets it."""
    import torch

    def round_of(calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls

    first = round_of(1)
    calls = max(1, int(1e-3 / max(first, 1e-7)))
    best, spent = first, first
    while spent < budget_s or spent == first:
        seconds = round_of(calls)
        best, spent = min(best, seconds), spent + seconds * calls
    return best


class Probe:
    """Times products and attention at the shapes a plan asks for, with a rank's threads (cached)."""

    def __init__(self, threads: int, bf16: bool):
        import torch

        self.threads = threads
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self._cache: dict[tuple, float] = {}

    def gemm(self, m: int, k: int, n: int) -> float:
        key = ("gemm", m, k, n)
        if key not in self._cache:
            import torch

            a = torch.randn(m, k, dtype=self.dtype, device=self.device)
            b = torch.randn(k, n, dtype=self.dtype, device=self.device)
            with _threads(self.threads):
                self._cache[key] = _timed(lambda: a @ b, cuda=self.cuda)
        return self._cache[key]

    def linear(self, n: int, k: int, o: int) -> float:
        """``F.linear`` forward + backward through autograd, as a layer runs it (bias, gradient accumulation)."""
        key = ("linear", n, k, o)
        if key not in self._cache:
            import torch
            import torch.nn.functional as F

            x = torch.randn(n, k, dtype=self.dtype, device=self.device, requires_grad=True)
            w = torch.randn(o, k, dtype=self.dtype, device=self.device, requires_grad=True)
            bias = torch.zeros(o, dtype=self.dtype, device=self.device, requires_grad=True)
            grad = torch.ones(n, o, dtype=self.dtype, device=self.device)

            def step() -> None:
                F.linear(x, w, bias).backward(grad)

            with _threads(self.threads):
                self._cache[key] = _timed(step, cuda=self.cuda)
        return self._cache[key]

    def attention(self, batch: int, heads: int, groups: int, seq: int, head_dim: int) -> float:
        key = ("sdpa", batch, heads, groups, seq, head_dim)
        if key not in self._cache:
            import torch
            import torch.nn.functional as F

            def shaped(n: int) -> torch.Tensor:
                x = torch.randn(batch, n, seq, head_dim, dtype=self.dtype, device=self.device)
                return x.requires_grad_()

            q, k, v = shaped(heads), shaped(heads), shaped(heads)  # k/v expanded to the heads (GQA)

            def step() -> None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                out.backward(torch.ones_like(out))

            with _threads(self.threads):
                self._cache[key] = _timed(step, cuda=self.cuda)
        return self._cache[key]

    def peak(self) -> float:
        import torch

        size = 4096 if self.cuda else 1024
        a = torch.randn(size, size, dtype=self.dtype, device=self.device)
        with _threads(self.threads):
            return 2.0 * size**3 / _timed(lambda: a @ a, budget_s=0.25, cuda=self.cuda)

    def copy_bandwidth(self) -> float:
        import torch

        n = 1 << 23  # 32 MB of fp32
        x = torch.randn(n, device=self.device)
        y = torch.empty_like(x)
        with _threads(self.threads):
            seconds = _timed(lambda: y.copy_(x), budget_s=0.05, cuda=self.cuda)
        return 2.0 * x.numel() * x.element_size() / seconds


def calibrate_here(hw: Any, bf16: bool, processes: int, keep: set[str]) -> None:  # a plan.hardware.Hardware
    """Measure peak, memory bandwidth and (``processes`` > 1) a gloo all-reduce on this machine;
    keys the user set (``keep``) are not measured."""
    import torch

    threads = torch.get_num_threads() if processes <= 1 else max(1, int(os.environ.get("OMP_NUM_THREADS", 1)))
    probe = Probe(threads, bf16)
    hw.probe = probe
    peak_key = "peak_tflops_bf16" if bf16 else "peak_tflops_fp32"
    if peak_key not in keep:
        hw.peak_flops = probe.peak()
    hw.measured["TFLOP/s"] = hw.peak_flops / 1e12
    if "memory_bandwidth_gbps" not in keep:
        hw.memory_bw = probe.copy_bandwidth()
    hw.measured["copy GB/s"] = hw.memory_bw / 1e9
    hw.measured["threads/rank"] = threads
    if processes > 1 and not probe.cuda and {"intra_node_gbps", "latency_us"} - keep:
        hw.collectives = collectives_probe(processes)
        latency, per_byte = hw.collectives["all-reduce"]
        hw.latency_s, hw.intra_bw = latency, 1.0 / per_byte  # all-reduce's, as the presets state them
        hw.measured["all-reduce GB/s"] = hw.intra_bw / 1e9
        hw.measured["latency us"] = hw.latency_s * 1e6


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "send")


def _collectives_worker(rank: int, world: int, store_path: str, queue: object) -> None:
    """Time each collective the engines use, at 8 bytes and at 4 MiB (the whole tensor: gathered,
    or before the reduce-scatter), between ``world`` gloo processes of one thread."""
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", message=r".*is deprecated.*")  # *_into_tensor: what megatron calls
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)

    def ops(numel: int) -> dict[str, Callable[[], object]]:
        full, part = torch.zeros(numel), torch.zeros(numel // world)
        peer = 1 - rank if world == 2 else (rank + 1) % world

        def send() -> None:
            (dist.send if rank % 2 == 0 else dist.recv)(full, peer)
            (dist.recv if rank % 2 == 0 else dist.send)(full, peer)

        return {
            "all-reduce": lambda: dist.all_reduce(full),
            "all-gather": lambda: dist.all_gather_into_tensor(full, part),
            "reduce-scatter": lambda: dist.reduce_scatter_tensor(part, full),
            "send": send,  # there and back: two messages
        }

    small, big = ops(2 * world), ops(1 << 20)
    result = {}
    for kind in COLLECTIVES:
        times = []
        for fn, rounds in ((small[kind], 20), (big[kind], 5)):
            fn()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(rounds):
                fn()
            times.append((time.perf_counter() - start) / rounds / (2 if kind == "send" else 1))
        result[kind] = (times[0], max(times[1] - times[0], 1e-12) / ((1 << 20) * 4))
    if rank == 0:
        queue.put(result)  # type: ignore[attr-defined]
    dist.destroy_process_group()


def collectives_probe(processes: int) -> dict[str, tuple[float, float]]:
    """{kind: (latency s, seconds per byte of the whole tensor)} among ``min(processes, 2)`` forked
    gloo processes (all-reduce, all-gather and reduce-scatter into / from one tensor, send / recv)."""
    import multiprocessing as mp

    world = min(processes, 2)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="gpt-plan-probe-") as tmp:
        procs = [
            ctx.Process(target=_collectives_worker, args=(r, world, str(Path(tmp) / "store"), queue), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            result = queue.get(timeout=60)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    return result
