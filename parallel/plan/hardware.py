"""The device a plan is for: a ``hardware`` preset resolved into rates, or this machine measured.

A GPU preset is datasheet peaks and link bandwidths with one calibrated matmul efficiency.
``hardware=cpu`` (and ``auto`` without a GPU) is calibrated instead (``hardware.calibrate``): on a
CPU the rate of a product depends on its shape and thread count far more than any one efficiency
says, so the planner times each matrix product and attention it predicts at its own shape, with
the threads a rank gets (all cores for one process, one under torchrun), plus a copy (memory
bandwidth) and a two-process gloo all-reduce (latency and bandwidth). Each probe takes
milliseconds and is cached per shape; the whole calibration of a plan is ~1-3 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from conf.errors import UserError
from conf.groups import HardwareConfig
from parallel.plan.memory import MemoryPlan, RankMemory

GiB = float(1 << 30)
PRESETS = Path(__file__).resolve().parents[2] / "conf" / "hardware"
# torch's device name -> preset (auto)
GPU_NAMES = (("H200", "h200"), ("H100", "h100-sxm"), ("A100", "a100-80g"))
HOST_GIB_PER_NODE = 2048.0  # a DGX H100 / A100 node's 2 TB of host memory (offload's limit on GPU presets)
CPU_DEFAULTS = {"intra_node_gbps": 1.0, "inter_node_gbps": 0.1, "pcie_gbps": 10.0}


@dataclass
class Hardware:
    """Rates per device, SI units (bytes, bytes/s, FLOP/s, s)."""

    name: str
    memory_bytes: float
    peak_flops: float  # in the training dtype (bf16 or fp32), dense
    matmul_efficiency: float
    memory_bw: float
    intra_bw: float
    inter_bw: float
    pcie_bw: float
    host_bw: float
    latency_s: float
    layer_overhead_s: float
    gpus_per_node: int
    nodes: int
    host_bytes: float = float("inf")  # host memory per device (offloaded optimizer states)
    collectives: dict[str, tuple[float, float]] | None = None  # measured: kind -> (latency, s per byte)
    measured: dict[str, float] = field(default_factory=dict)  # what calibration measured (shown by gpt-plan)
    probe: Probe | None = None  # per-shape timings (calibrated hardware)

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def shares_host(self) -> bool:
        """A CPU "device" is host memory: offloaded states count against the same bytes."""
        return self.name == "cpu"

    @property
    def asynchronous(self) -> bool:
        """A GPU runs kernels while the host launches the next ones; a CPU does one thing at a time."""
        return self.name != "cpu"

    def needs(self, rank: RankMemory) -> float:
        """Bytes of ``rank`` counted against ``memory_bytes``."""
        return rank.total + (rank.cpu_offload if self.shares_host else 0)

    def fits(self, plan: MemoryPlan) -> bool:
        device = max(self.needs(r) for r in plan.ranks) <= self.memory_bytes
        return device and (self.shares_host or max(r.cpu_offload for r in plan.ranks) <= self.host_bytes)

    def gemm_s(self, m: int, k: int, n: int, bytes_per: int) -> float:
        """Seconds of one [m,k] @ [k,n] product."""
        if self.probe is not None:
            return self.probe.gemm(m, k, n)
        flops = 2.0 * m * k * n
        traffic = bytes_per * (m * k + k * n + m * n)
        return max(flops / (self.peak_flops * self.matmul_efficiency), traffic / self.memory_bw)

    def linear_s(self, n: int, k: int, o: int, bytes_per: int) -> float:
        """Seconds of a linear layer's forward and backward on ``n`` tokens, ``k`` -> ``o`` features:
        its product, the input's gradient and the weight's (accumulated)."""
        if self.probe is not None:
            return self.probe.linear(n, k, o)
        return self.gemm_s(n, k, o, bytes_per) + self.gemm_s(n, o, k, bytes_per) + self.gemm_s(k, n, o, bytes_per)

    def attention_s(self, batch: int, heads: int, groups: int, seq: int, head_dim: int, bytes_per: int) -> float:
        """Seconds of causal attention forward + backward (fused SDPA / flash) for one micro-batch."""
        if self.probe is not None:
            return self.probe.attention(batch, heads, groups, seq, head_dim)
        forward = 2.0 * batch * heads * seq * seq * head_dim  # QK^T and PV, causal half of 4*b*h*s^2*d
        return 3.5 * forward / (self.peak_flops * self.matmul_efficiency)  # backward ~2.5x (flash recomputes)

    def collective_s(self, kind: str, nbytes: float, ranks: int, bw: float) -> float:
        """Seconds of one collective over ``ranks`` on a link of bandwidth ``bw``; ``nbytes`` is the
        whole tensor (all-reduced, gathered, or reduce-scattered; a send's message). Measured kinds
        scale from the probe's 2 processes by the ring's (n-1)/n share."""
        if ranks <= 1:
            return 0.0
        share = (ranks - 1) / ranks
        if self.collectives and kind in self.collectives:
            latency, per_byte = self.collectives[kind]
            return latency + per_byte * nbytes * (1.0 if kind == "send" else share / 0.5)
        if kind == "send":
            return nbytes / bw + self.latency_s
        return share * nbytes * (2 if kind == "all-reduce" else 1) / bw + self.latency_s

    def latency(self, kind: str) -> float:
        return self.collectives[kind][0] if self.collectives and kind in self.collectives else self.latency_s

    def elementwise_s(self, nbytes: float) -> float:
        return nbytes / self.memory_bw

    def describe(self) -> str:
        where = f"{self.world_size} = {self.gpus_per_node} x {self.nodes} node{'s' if self.nodes > 1 else ''}"
        text = (
            f"hardware={self.name}: {where}, {self.memory_bytes / GiB:.1f} GiB each, "
            f"peak {self.peak_flops / 1e12:.4g} TFLOP/s"
        )
        if self.probe is not None:
            return text + " (measured: " + ", ".join(f"{k} {v:.4g}" for k, v in self.measured.items()) + ")"
        return text + f", matmul efficiency {self.matmul_efficiency:g}"


def preset(name: str) -> dict:
    path = PRESETS / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}


def host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def detected_gpu() -> tuple[str | None, float, int]:
    """(preset name or None, memory bytes, devices) of this machine's GPU; (None, 0, 0) without one."""
    import torch

    if not torch.cuda.is_available():
        return None, 0.0, 0
    props = torch.cuda.get_device_properties(0)
    name = next((p for key, p in GPU_NAMES if key in props.name), None)
    if name == "a100-80g" and props.total_memory < 60 * GiB:
        name = None  # an A100 40GB: its own rates are not a preset
    return name, float(props.total_memory), torch.cuda.device_count()


def resolve(
    hw: DictConfig,
    bf16: bool,
    processes_per_node: int | None = None,
    calibrate: bool | None = None,
    rates: bool = True,
) -> Hardware:
    """The rates of ``hardware.*`` (its preset's, overridden by any key set), the memory detected
    when not given, and, for a CPU, measured ones. ``processes_per_node``: the ranks sharing one
    machine (the preflight's LOCAL_WORLD_SIZE), else ``hardware.gpus_per_node``. ``rates=False``:
    memory only (the preflight), nothing measured."""
    values = dict(OmegaConf.to_container(hw, resolve=True))
    name = str(values["name"])
    gpu_memory, devices = 0.0, 0
    if name == "auto":  # this machine: its GPU's preset (or cpu's), with what the user set on top
        gpu_name, gpu_memory, devices = detected_gpu()
        defaults = dataclasses.asdict(HardwareConfig())
        user = {k: v for k, v in values.items() if v != defaults.get(k)}
        name = gpu_name or ("gpu" if devices else "cpu")
        values = {**defaults, **preset(gpu_name or "cpu"), **user, "name": name}
        if devices and "gpus_per_node" not in user:
            values["gpus_per_node"] = devices
    per_node = int(processes_per_node or values["gpus_per_node"])
    if calibrate is None:
        calibrate = values.get("calibrate")
    if calibrate is None:
        calibrate = name in ("cpu", "gpu")
    memory = values.get("memory_gb")
    if memory is None:
        memory = gpu_memory / GiB if devices else host_memory_bytes() / GiB / max(1, per_node)
    peak_key = "peak_tflops_bf16" if bf16 else "peak_tflops_fp32"
    out = Hardware(
        name=name,
        memory_bytes=float(memory) * GiB,
        peak_flops=float(values.get(peak_key) or 1.0) * 1e12,
        matmul_efficiency=float(values["matmul_efficiency"]),
        memory_bw=float(values.get("memory_bandwidth_gbps") or 10.0) * 1e9,
        intra_bw=float(values.get("intra_node_gbps") or CPU_DEFAULTS["intra_node_gbps"]) * 1e9,
        inter_bw=float(values.get("inter_node_gbps") or CPU_DEFAULTS["inter_node_gbps"]) * 1e9,
        pcie_bw=float(values.get("pcie_gbps") or CPU_DEFAULTS["pcie_gbps"]) * 1e9,
        host_bw=float(values["host_gbps"]) * 1e9,
        latency_s=float(values["latency_us"]) * 1e-6,
        layer_overhead_s=float(values["layer_overhead_us"]) * 1e-6,
        gpus_per_node=int(values["gpus_per_node"]),
        nodes=int(values["nodes"]),
        host_bytes=HOST_GIB_PER_NODE * GiB / max(1, per_node),
    )
    if not rates:
        return out
    if calibrate:
        keep = {k for k in _MEASURED if values.get(k) is not None and k in _user_set(hw, name)}
        calibrate_here(out, bf16, per_node, keep)
    elif not values.get(peak_key):
        raise UserError(f"hardware={name}: no hardware.{peak_key} (set it, or hardware.calibrate=true to measure)")
    return out


def _user_set(hw: DictConfig, name: str) -> set[str]:
    """The keys of ``hw`` that differ from its preset's (a command-line ``hardware.KEY=...``)."""
    base = {**dataclasses.asdict(HardwareConfig()), **preset(name)}
    return {k for k, v in OmegaConf.to_container(hw, resolve=True).items() if v != base.get(k)}


_MEASURED = ("peak_tflops_bf16", "peak_tflops_fp32", "memory_bandwidth_gbps", "intra_node_gbps", "latency_us")


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


def calibrate_here(hw: Hardware, bf16: bool, processes: int, keep: set[str]) -> None:
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
