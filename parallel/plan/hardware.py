"""The device a plan is for: a ``hardware`` preset resolved into rates, or this machine measured.

A GPU preset is datasheet peaks and link bandwidths with one calibrated matmul efficiency and
launch overhead. ``hardware=cpu`` (and ``auto`` without a GPU) is calibrated instead
(``hardware.calibrate``, ``parallel/plan/probe.py``): on a CPU the rate of a product depends on its
shape and thread count far more than any one efficiency says.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

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
    probe: Any = None  # parallel/plan/probe.py's Probe: per-shape timings (calibrated hardware)

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

    def describe(self, rates: bool = True) -> str:
        """One line: devices, memory and, with ``rates``, the peak (``resolve(rates=False)`` leaves a
        calibrated device's rates unmeasured: printing them would print placeholders)."""
        where = f"{self.world_size} = {self.gpus_per_node} x {self.nodes} node{'s' if self.nodes > 1 else ''}"
        text = f"hardware={self.name}: {where}, {self.memory_bytes / GiB:.1f} GiB each"
        if not rates:
            return text
        text += f", peak {self.peak_flops / 1e12:.4g} TFLOP/s"
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
    hw: HardwareConfig,
    bf16: bool,
    processes_per_node: int | None = None,
    calibrate: bool | None = None,
    rates: bool = True,
) -> Hardware:
    """The rates of ``hardware.*`` (its preset's, overridden by any key set), the memory detected
    when not given, and, for a CPU, measured ones. ``processes_per_node``: the ranks sharing one
    machine (the preflight's LOCAL_WORLD_SIZE), else ``hardware.gpus_per_node``. ``rates=False``:
    memory only (the preflight), nothing measured."""
    values = dataclasses.asdict(hw)
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
        from parallel.plan.probe import calibrate_here

        calibrate_here(out, bf16, per_node, keep)
    elif not values.get(peak_key):
        raise UserError(f"hardware={name}: no hardware.{peak_key} (set it, or hardware.calibrate=true to measure)")
    return out


def _user_set(hw: HardwareConfig, name: str) -> set[str]:
    """The keys of ``hw`` that differ from its preset's (a command-line ``hardware.KEY=...``)."""
    base = {**dataclasses.asdict(HardwareConfig()), **preset(name)}
    return {k for k, v in dataclasses.asdict(hw).items() if v != base.get(k)}


_MEASURED = ("peak_tflops_bf16", "peak_tflops_fp32", "memory_bandwidth_gbps", "intra_node_gbps", "latency_us")
