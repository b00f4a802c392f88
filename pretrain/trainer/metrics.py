"""Run-dir logging: ``metrics.jsonl``, console progress, wandb (offline by default), ``loss.png``,
``eval.png`` (in-loop evaluation's ``eval/<task>/<metric>`` over steps).

Only rank 0 writes. On resume, lines for steps after the checkpoint (logged by the
run that was killed) are dropped so that the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from parallel.run_config import Run
from pretrain.trainer import goodput
from pretrain.trainer.console import Interval, fields
from pretrain.trainer.metrics_file import METRICS, parse_lines, read_metrics, truncate_after  # noqa: F401

QUIET_S = 30.0  # a training line at least this often, however slow the steps
BOOKKEEPING = {"step", "checkpoint", "save_stall_s", "event", "time"}  # keys no plot draws


class Metrics:
    def __init__(self, cfg: Run, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = run_dir / METRICS
        self.every = cfg.logging.console_every
        self.interval = Interval(start_step, cfg.train.max_steps)
        self.wandb: Any = None
        self.bar: Any = None
        self.failures = 0
        self.last_step = start_step  # the step of this session's session_end (goodput)
        self.unplotted = True  # lines logged since the plots were last drawn
        if not enabled:
            return
        session = _session_events(cfg, self.path, start_step)  # before the truncation drops the lost steps
        truncate_after(self.path, start_step)
        self.file = self.path.open("a", buffering=1)
        for event in session:
            self.log(event)
        mode = wandb_mode(str(cfg.logging.wandb))
        if mode != "disabled":
            self.wandb = _init_wandb(cfg, run_dir, mode)
        self.bar = tqdm(
            total=int(cfg.train.max_steps),
            initial=start_step,
            desc="train",
            unit="step",
            mininterval=1.0,
            dynamic_ncols=True,
            disable=not cfg.logging.progress_bar or not sys.stderr.isatty(),  # logs get the lines below
        )

    def log(self, record: dict[str, Any], console: bool = False) -> None:
        if not self.enabled:
            return
        self.last_step = max(self.last_step, record["step"])
        self.unplotted = self.unplotted or not set(record) <= BOOKKEEPING
        try:
            self.file.write(json.dumps(record) + "\n")
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        except Exception as exc:  # logging never costs training: warn once, go on
            self.failures += 1
            if self.failures == 1:
                print(f"warning: logging failed ({type(exc).__name__}: {exc}); training goes on", file=sys.stderr)
        if record.get("loss") is not None:
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if "step_time_s" in record:  # a training step: its line every logging.console_every steps
            self.interval.add(record)
            step = record["step"]
            if step % self.every == 0 or step == self.interval.max_steps or self.interval.quiet_for() > QUIET_S:
                tqdm.write(self.interval.line(record))
                return
        if console:
            tqdm.write(fields(record))

    def close(self) -> None:
        if not self.enabled or self.file.closed:  # closed once, whatever calls it again
            return
        self.bar.close()
        if self.unplotted:  # the plots after the last evaluation are current unless lines came since
            self.plot()
        if self.wandb is not None:
            _goodput_summary(self.wandb, self.run_dir)
            self.wandb.finish()
            self.wandb = None
        # the session's last line, after its plots and wandb: the goodput account's end of this session
        self.log({"step": self.last_step, "event": goodput.SESSION_END, "time": time.time()})
        self.file.close()

    def say(self, text: str) -> None:
        """A line on rank 0's console (above the progress bar on a terminal)."""
        if self.enabled:
            tqdm.write(text)

    def plot(self) -> None:
        """``loss.png`` and ``eval.png`` from ``metrics.jsonl`` as it is now (after each evaluation, and
        at the end)."""
        if not self.enabled:
            return
        self.unplotted = False
        from pretrain.trainer.moe_plot import plot_moe

        for plot in (plot_losses, plot_evals, plot_moe):
            try:
                plot(self.run_dir)
            except Exception as exc:  # noqa: BLE001 - a plot never fails a run, nor hides why it failed
                print(f"warning: {plot.__name__} drew nothing ({type(exc).__name__}: {exc})", file=sys.stderr)


def _session_events(cfg: Run, path: Path, start_step: int) -> list[dict[str, Any]]:
    """This session's goodput events (``pretrain/trainer/goodput.py``); a failure is a warning, never
    a reason to stop the run."""
    topo = cfg.layout
    layout = {"world_size": topo.world_size, "tp": topo.tp, "pp": topo.pp, "dp": topo.dp}
    try:
        return goodput.session_events(read_metrics(path.parent), start_step, goodput.last_write(path), layout)
    except Exception as exc:  # noqa: BLE001 - the account is a report, training comes first
        print(f"warning: goodput: no session record ({type(exc).__name__}: {exc})", file=sys.stderr)
        return []


def _goodput_summary(run: Any, run_dir: Path) -> None:
    """The goodput account's figures in wandb's run summary (what ``gpt-goodput`` prints)."""
    try:
        now = time.time()  # the session ends about now: its session_end line follows wandb's finish
        records = [*read_metrics(run_dir), {"step": 0, "event": goodput.SESSION_END, "time": now}]
        run.summary.update(goodput.account(records, now).summary())
    except Exception as exc:  # noqa: BLE001 - a summary never fails a run
        print(f"warning: goodput: no wandb summary ({type(exc).__name__}: {exc})", file=sys.stderr)


def wandb_mode(configured: str) -> str:
    """``logging.wandb``, unless the environment's ``WANDB_MODE`` says ``disabled`` or ``offline``: the
    switch Megatron-LM and torchtitan users turn wandb off (or local) with, for every run of a shell or
    job. Passing the config's mode to ``wandb.init`` would override it, so it is read here; a
    ``WANDB_MODE`` that would reach the network is not taken from the environment (``online`` needs
    the credential check of ``logging.wandb=online``)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    return env if env in ("disabled", "offline") else configured


def _init_wandb(cfg: Run, run_dir: Path, mode: str) -> Any:
    """A wandb run whose id lives in the run dir, so a resumed job continues it."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(
        project=str(cfg.logging.project),
        name=run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        config=cfg.to_dict(),
        settings=wandb.Settings(init_timeout=30, silent=True),
    )


def plot_losses(run_dir: Path) -> Path | None:
    """``loss.png``: training loss per step and validation loss per evaluation."""
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), lw=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_evals(run_dir: Path) -> Path | None:
    """``eval.png``: every ``eval/<task>/<metric>`` of ``metrics.jsonl`` over steps, one panel each
    (their scales differ: accuracy in [0, 1], perplexities in the tens or more)."""
    records = read_metrics(run_dir)
    keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o-")
        ax.set_title(key.removeprefix("eval/"), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    out = run_dir / "eval.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
