"""``moe.png``: what a MoE run's router did over training, from its ``metrics.jsonl`` (``moe/*`` keys,
``pretrain/model/moe_metrics.py``). Drawn beside ``loss.png`` when the run logged them."""

from __future__ import annotations

from pathlib import Path

from pretrain.trainer.metrics_file import read_metrics

LOSSES = ("moe/load_balancing_loss", "moe/seq_load_balancing_loss", "moe/z_loss")


def plot_moe(run_dir: Path) -> Path | None:
    """Left: the router's auxiliary losses (load balancing: 1.0 is a perfectly even load); right: the
    expert load per MoE layer as the coefficient of variation of tokens per expert, and the worst
    layer's max / mean (and the dropped fraction when tokens are dropped)."""
    rows = [r for r in read_metrics(run_dir) if r.get("moe/load_cv") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    for key in LOSSES:
        if key in rows[-1]:
            left.plot(steps, [r.get(key) for r in rows], lw=0.8, label=key.removeprefix("moe/"))
    left.set_xlabel("step")
    left.set_title("router losses (unweighted)")
    layers = {k for r in rows for k in r if k.startswith("moe/load_cv/")}
    layers = sorted(layers, key=lambda k: int(k.rsplit("layer", 1)[1]))
    for key in layers:
        right.plot(steps, [r.get(key) for r in rows], lw=0.6, label=f"CV {key[12:]}")
    right.plot(steps, [r["moe/load_max_over_mean"] for r in rows], "k", lw=1.0, label="max / mean (worst layer)")
    if "moe/dropped_fraction" in rows[-1]:
        right.plot(steps, [r.get("moe/dropped_fraction") for r in rows], "r--", lw=0.8, label="dropped fraction")
    right.set_xlabel("step")
    right.set_title("tokens per expert")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out = run_dir / "moe.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
