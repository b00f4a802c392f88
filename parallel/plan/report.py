"""gpt-plan's text report and its search plot (``plot=PATH``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conf.errors import UserError

TERMS = {  # the step-time terms in print order, with the names people read
    "matmul": "matmul",
    "attention": "attention",
    "elementwise": "element-wise",
    "recompute": "recompute",
    "overhead": "per-layer overhead",
    "tp_comm": "TP comm",
    "ep_comm": "EP all-to-all",
    "pp_p2p": "PP send/recv",
    "pp_bubble": "PP bubble",
    "dp_comm": "DP grad reduce",
    "zero3_gather": "ZeRO-3 param gather",
    "optimizer": "optimizer step",
    "offload_pcie": "offload PCIe",
}
SOFTWARE = "gpt-plan"  # the PNG text chunk that marks a plot as ours (replaced on the next run)


LEGEND = (  # the search table's columns, for the names too long to head a column
    "tp, pp, vpp, dp, ep: tensor-, pipeline-, virtual-pipeline-, data- and expert-parallel sizes; micro: micro-batch "
    "(sequences per rank per forward); accum: gradient-accumulation steps (global batch = micro x accum x dp)",
    "optimizer: the engine and where its optimizer state lives: megatron dist-opt (sharded over dp by its "
    "distributed optimizer) or replicated, deepspeed zero0-zero3, +offload (in host memory)",
    "GiB: memory of the largest rank; step s: seconds per optimizer step; MFU: model FLOPs utilization",
)


def _header(report: dict[str, Any]) -> list[str]:
    """What is planned: model, hardware, precision and (outside a search, which says it) the global batch."""
    model = report["model"]
    if model["params"] is None:
        lines = [f"gpt-plan: model={model['name']} (not sized: its keys fail a check below)"]
    else:
        lines = [
            f"gpt-plan: model={model['name']} ({model['params'] / 1e6:,.1f}M parameters, vocab {model['vocab_size']} "
            f"padded to {model['padded_vocab']}, sequence {model['seq_len']})"
        ]
    lines.append(f"  {report['hardware']['description']}")
    precision = report["precision"]
    lines.append(f"  precision: {precision['dtype']} ({precision['why']})")
    if "global_batch" in report and "search" not in report:  # a search says it in its own header
        origin = report["global_batch"]
        lines.append(f"  global batch: {origin['value']} sequences, {_batch(origin)}")
    return lines


def _batch(origin: dict[str, Any]) -> str:
    """Tokens per step and where the global batch comes from (with the GPU-sized one when it is the demo's)."""
    note = f", {origin['note']}" if origin.get("note") else ""
    return f"{origin['tokens_per_step']:,} tokens per step ({origin['source']}{note})"


def _checks(report: dict[str, Any]) -> list[str]:
    lines = ["checks (those gpt-pretrain makes before launch):"]
    lines += [f"  ok    {c['name']:<8}  {c['detail']}" for c in report["checks"]]
    lines += [f"  FAIL  {line}" for line in report["errors"]]
    return lines


def _memory(report: dict[str, Any]) -> list[str]:
    memory = report["memory"]
    head = f"{'rank':<5} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'comm':>6} {'logits':>7} {'total':>7}"
    title = f"memory per rank, GiB (largest: {memory['largest']}; device {memory['limit_gib']:.1f})"
    if memory.get("estimated_at"):  # the config's layout fails on what does not change memory
        one = " " not in memory["estimated_at"]
        title += f", estimated at {memory['estimated_at']} (the nearest {'value' if one else 'values'} that divide)"
        lines = [title + ":", f"  at {report['layout']['description']}"]
    else:
        lines = [title + ":"]
    lines.append("  " + head)
    offloaded = any(r["cpu_offload_gib"] for r in memory["ranks"])
    for r in memory["ranks"]:
        cells = [r[f"{k}_gib"] for k in ("params", "grads", "optimizer", "activations", "comm_buffers", "logits")]
        text = f"  {r['rank']:<5} " + " ".join(f"{c:>7.2f}" if i != 4 else f"{c:>6.2f}" for i, c in enumerate(cells))
        text += f" {r['total_gib']:>7.2f}" + (f"  (+{r['cpu_offload_gib']:.2f} offloaded)" if offloaded else "")
        lines.append(text)
    biggest = next(r for r in memory["ranks"] if r["rank"] == memory["largest"])
    items = sorted(biggest["items"].items(), key=lambda kv: -kv[1])
    lines.append(f"  {memory['largest']} in detail: " + ", ".join(f"{k} {v / (1 << 30):.3g}" for k, v in items if v))
    return lines


def _time(report: dict[str, Any]) -> list[str]:
    time = report["time"]
    terms = [(TERMS.get(k, k), v) for k, v in time["terms_s"].items() if v > 0]
    step = time["step_s"]
    shown = " + ".join(f"{name} {v:.3g}" for name, v in terms)
    lines = [f"step time {step:.4g} s = {shown}"]
    shares = ", ".join(f"{name} {100 * v / step:.0f}%" for name, v in terms if v / step >= 0.01)
    lines.append(f"  shares: {shares}")
    lines.append(
        f"throughput {time['tokens_per_s']:,.0f} tokens/s, MFU {100 * time['mfu']:.1f}% "
        f"({time['tflops_per_device']:.4g} TFLOP/s per device)"
    )
    lines += [f"  note: {n}" for n in time["notes"]]
    return lines


def _search(report: dict[str, Any], top: int) -> list[str]:
    found = report["search"]
    dropped = ", ".join(f"{v} {k}" for k, v in found["dropped"].items())
    origin = report["global_batch"]
    lines = [f"search over {found['world_size']} ranks at train.global_batch={origin['value']}, {_batch(origin)}:"]
    unreachable = [f"dp {dp} ({', '.join(keys)} not multiples of it)" for dp, keys in found["unreachable_dp"].items()]
    if unreachable:  # the search keeps the global batch and data streams: they rule these out
        lines.append("  not searched: " + ", ".join(unreachable))
    lines += [
        f"  {found['listed']} layouts pass every check and fit"
        + (f" (dropped: {dropped})" if dropped else "")
        + (f"; the best {top}" if found["listed"] > top else "")
        + ", fastest first:",
    ]
    head = f"{'#':>3} {'tp':>3} {'pp':>3} {'vpp':>3} {'dp':>4} {'ep':>3} {'micro':>5} {'accum':>5} {'recompute':<9} "
    head += f"{'optimizer':<23} {'GiB':>7} {'step s':>8} {'tokens/s':>11} {'MFU':>6}"
    lines.append("  " + head)
    for r in found["layouts"][:top]:
        lines.append(
            f"  {r['rank']:>3} {r['tp']:>3} {r['pp']:>3} {r['vpp']:>3} {r['dp']:>4} {r.get('ep', 1):>3} "
            f"{r['micro_batch']:>5} {r['accumulation']:>5} {r['recompute']:<9} {_optimizer(r):<23} "
            f"{r['memory_gib']:>7.2f} {r['step_s']:>8.4g} {r['tokens_per_s']:>11,.0f} {100 * r['mfu']:>5.1f}%"
        )
    if found["layouts"]:
        lines += [f"  {line}" for line in LEGEND]
        best = found["layouts"][0]
        lines.append(
            f"best: global batch {best['global_batch']} = micro-batch {best['micro_batch']} x "
            f"{best['accumulation']} accumulation steps x dp {best['dp']}; tp {best['tp']}, pp {best['pp']}, "
            f"vpp {best['vpp']}, recompute {best['recompute']}, {_optimizer(best)}"
        )
        lines.append(f"  overrides: {best['overrides']}")
    if found.get("plot"):
        lines.append(f"plot: {found['plot']}")
    return lines


def _optimizer(row: dict[str, Any]) -> str:
    return f"{row['engine']} {row['optimizer']}"


def render_text(report: dict[str, Any], top: int = 20) -> str:
    """The report as text: the header first, whatever failed, so the plan still says what it planned."""
    lines = _header(report) + _checks(report)
    if "memory" in report:
        lines += _memory(report)
    if "suggestion" in report:
        lines.append(f"try: {report['suggestion']['text']}")
    if "search" in report:
        lines += _search(report, top)
    if "time" in report:
        lines += (["predicted for the best layout:"] if "search" in report else []) + _time(report)
    return "\n".join(lines)


def _ours(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get("Software") == SOFTWARE
    except OSError:
        return False


def plot_search(path: str, rows: list[dict[str, Any]], hw: Any) -> str:
    """Predicted memory of the largest rank vs tokens/s, one point per layout, by optimizer kind;
    written to ``path`` (replacing only a plot gpt-plan wrote)."""
    target = Path(path).expanduser()
    if target.exists() and not (target.is_file() and _ours(target)):
        raise UserError(f"plot={path}: exists and is not a plot gpt-plan wrote; choose a new path")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    kinds = sorted({_optimizer(r) for r in rows})
    for kind in kinds:
        points = [r for r in rows if _optimizer(r) == kind]
        ax.scatter([r["memory_gib"] for r in points], [r["tokens_per_s"] for r in points], s=14, label=kind, alpha=0.7)
    ax.axvline(hw.memory_bytes / (1 << 30), color="red", linestyle="--", label=f"{hw.name} memory")
    if rows:
        best = rows[0]
        ax.annotate(
            f"best: tp{best['tp']} pp{best['pp']} vpp{best['vpp']} dp{best['dp']} ep{best.get('ep', 1)} "
            f"mb{best['micro_batch']}",
            (best["memory_gib"], best["tokens_per_s"]),
            fontsize=8,
        )
    ax.set_xlabel("predicted memory of the largest rank (GiB)")
    ax.set_ylabel("predicted tokens/s")
    ax.set_title(f"gpt-plan search: {len(rows)} layouts on {hw.world_size} x {hw.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110, metadata={"Software": SOFTWARE})
    plt.close(fig)
    return str(target)
