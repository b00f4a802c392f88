"""What gpt-plan infers and suggests around the config it is given: the precision it plans in, where
the global batch comes from (and a GPU-sized one when it is the CPU demo's), and, when the layout
check fails on the global batch or the data streams, the nearest values that divide and the layout at
them, so that a failing plan still shows the memory of the run the user most likely meant.

Nothing here changes what gpt-pretrain runs: gpt-plan only plans (and says so) at these values."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from conf.errors import UserError
from conf.groups import TrainConfig
from parallel.run_config import Groups, Run, replaced

TOKENS_PER_STEP = 1 << 19  # ~0.5 M tokens per optimizer step: the low end of GPT-style pretraining batches
DEFAULT_GLOBAL_BATCH = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "global_batch")


def set_on_command_line(overrides: Sequence[str]) -> set[str]:
    """The keys the user set (``key=value``, ``+key=``, ``++key=``): only those override a planner
    default, since a value equal to the schema's default cannot say whether it was chosen."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


@dataclass(frozen=True)
class Precision:
    """The dtype planned in and why (the header prints both: the peak and memory depend on it)."""

    bf16: bool
    why: str

    @property
    def dtype(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def as_dict(self) -> dict[str, object]:
        return {"dtype": self.dtype, "bf16": self.bf16, "why": self.why}


def precision(configured: bool, explicit: bool, gpu: bool) -> Precision:
    """bf16 on a GPU unless ``train.bf16`` was set on the command line: a GPU run in fp32 is the
    exception, and planning it silently at the fp32 peak answers a question nobody asked.
    gpt-pretrain's own default (fp32, which a CPU needs) is left as it is."""
    if explicit:
        return Precision(configured, f"train.bf16={str(configured).lower()}")
    if gpu:
        return Precision(True, "the GPU default; train.bf16=false plans fp32")
    if configured:
        return Precision(True, "train.bf16=true in the config")
    return Precision(False, "the CPU default; train.bf16=true plans bf16")


@dataclass(frozen=True)
class Divides:
    """A key the layout check needs divisible (the global batch, the data streams), and by what."""

    key: str  # group.key
    value: int
    step: int
    by: str  # the step spelled as keys: train.micro_batch*dp=12*8

    @property
    def nearest(self) -> list[int]:
        """The multiples of ``step`` either side of the value (only the one above when none is below)."""
        below = self.value // self.step * self.step
        return [m for m in (below, below + self.step) if m >= self.step]

    @property
    def best(self) -> int:
        """The nearest multiple (the larger on a tie: as many tokens per step or more)."""
        return min(self.nearest, key=lambda m: (abs(m - self.value), -m))


def divides(groups: Groups, world: int) -> list[Divides]:
    """What the layout check needs divisible at the config's tp x pp; empty when the world size does
    not split into tp x pp (there is no dp to divide by). The global batch comes first."""
    par, micro = groups.parallel, int(groups.train.micro_batch)
    if world % (par.tp * par.pp):
        return []
    dp = world // (par.tp * par.pp)
    step, by = micro * dp, f"train.micro_batch*dp={micro}*{dp}"
    if par.vpp > 1:  # the interleaved schedule: micro-batches per step a multiple of pp
        step, by = step * par.pp, f"train.micro_batch*dp*parallel.pp={micro}*{dp}*{par.pp}"
    out = [Divides("train.global_batch", int(groups.train.global_batch), step, by)]
    if groups.data is not None:
        out.append(Divides("data.num_streams", int(groups.data.num_streams), dp, f"dp={dp}"))
    return out


def failing(groups: Groups, world: int) -> list[Divides]:
    return [d for d in divides(groups, world) if d.value % d.step]


def nearby_run(groups: Groups, world: int) -> Run | None:
    """The config's layout with its global batch and data streams moved to the nearest values that
    divide, when those are what fail: neither changes a rank's memory, so its memory is the run's."""
    fixes = failing(groups, world)
    if not fixes:
        return None
    changed = groups.as_dict()
    for fix in fixes:
        name, key = fix.key.split(".")
        changed[name] = replaced(changed[name], **{key: fix.best})
    try:
        return Run.build(changed, world, 0)
    except UserError:  # another layout check fails too: nothing nearby to estimate
        return None


def layout_fix(groups: Groups, world: int) -> dict[str, object]:
    """What to try when the layout check fails: the nearest global batch (and data streams) that
    divide, when that is what fails, else the search, which tries every layout of the world size."""
    fixes = failing(groups, world)
    overrides = [f"{f.key}={f.best}" for f in fixes]
    text = ""
    if fixes:
        multiples = "a multiple of " if len(fixes) == 1 else "multiples of "
        text = " ".join(overrides) + f" ({multiples}" + " and of ".join(f.by for f in fixes)
        others = [f"{f.key}={m}" for f in fixes for m in f.nearest if m != f.best]
        text += (f"; {', '.join(others)} also divide{'s' if len(others) == 1 else ''}" if others else "") + "), or "
    return {"overrides": overrides, "search": True, "text": f"{text}search=true (every layout of {world} ranks)"}


def unreachable_dp(groups: Groups, world: int) -> dict[str, list[str]]:
    """The data-parallel sizes of ``world`` no searched layout can have, with the keys that are not
    multiples of them: the search keeps the global batch and data streams, so a small default of
    either silently leaves out the widest layouts."""
    keys = {"train.global_batch": int(groups.train.global_batch)}
    if groups.data is not None:
        keys["data.num_streams"] = int(groups.data.num_streams)
    out = {}
    for dp in (d for d in range(1, world + 1) if world % d == 0):
        refused = [f"{k}={v}" for k, v in keys.items() if v % dp]
        if refused:
            out[str(dp)] = refused
    return out


def gpu_global_batch(seq_len: int, unit: int) -> int:
    """The smallest multiple of ``unit`` with at least ~0.5 M tokens per step."""
    sequences = -(-TOKENS_PER_STEP // max(1, seq_len))
    return -(-sequences // unit) * unit


def global_batch_origin(groups: Groups, explicit: Collection[str], seq_len: int, gpu: bool, unit: int) -> dict:
    """Where the global batch comes from, its tokens per step and, when it is the CPU demo's default
    on a GPU, the one to consider (suggested, never applied: it changes the run's optimisation)."""
    value = int(groups.train.global_batch)
    if "train.global_batch" in explicit:
        source = "set on the command line"
    elif value == DEFAULT_GLOBAL_BATCH:
        source = "the default"
    else:
        source = "from the config"
    out: dict = {"value": value, "source": source, "tokens_per_step": value * seq_len, "suggested": None}
    if gpu and source == "the default":
        out["suggested"] = gpu_global_batch(seq_len, unit)
        out["note"] = (
            f"sized for the CPU demo; a GPU run takes ~0.5 M tokens per step: "
            f"train.global_batch={out['suggested']} is {out['suggested'] * seq_len:,} tokens"
        )
    return out
