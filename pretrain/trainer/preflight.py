"""What gpt-pretrain checks before launch, run without launching: gpt-plan's checks and the trainer's
memory preflight (``train.preflight``).

The checks are the trainer's own functions (schema validation, ``Topology.from_config``, the data
manifest and shard files, the run dir, the resume guards), called here one group at a time so that
each failure is one line and the others still run. Nothing here builds a model or a process group.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from conf.errors import UserError
from parallel.capabilities import distributed_optimizer_in_effect
from parallel.plan.hardware import GiB, Hardware
from parallel.plan.memory import MemoryPlan, RankMemory
from parallel.plan.params import GPT2_VOCAB
from parallel.run_config import Groups, Run
from parallel.topology import Topology

KINDS = ("params", "grads", "optimizer", "activations", "comm_buffers", "logits")


@dataclass
class Checked:
    """The outcome of the checks: what passed (name, detail), what failed (one line each), and what
    the estimates need (topology, vocabulary, window, the checkpoint to resume)."""

    passed: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    topo: Topology | None = None
    groups: Groups | None = None  # the validated config (the "config" check)
    planned: Run | None = None  # the run at the config's layout (the "layout" check)
    vocab_size: int = GPT2_VOCAB
    seq_len: int = 0
    manifest: Any = None
    saved: Any = None  # TrainState of the newest step in run.dir
    saved_dir: Path | None = None

    def run(self, name: str, check: Any) -> Any:
        """``check()``; its UserError becomes one failure line, its string result the detail."""
        try:
            result = check()
        except UserError as exc:
            self.errors.append(str(exc))
            return None
        self.passed.append((name, result if isinstance(result, str) else "ok"))
        return result


def _validated(cfg: DictConfig, checked: Checked) -> str:
    from conf.schema import validate

    probe = copy.deepcopy(cfg)
    if not _has_data(probe):  # gpt-plan plans without data (vocab_size=, else GPT-2's)
        with open_dict(probe):
            probe.data.dir = "<not given>"
    checked.groups = Groups(validate(probe))
    return "every key has its type and passes its group's checks"


def _has_data(cfg: DictConfig) -> bool:
    data = cfg.data
    return not OmegaConf.is_missing(data, "dir") and bool(data.get("dir") or data.get("sources"))


def _data(cfg: Groups, checked: Checked) -> str:
    from data.remote import is_remote
    from data.shards import check_files, load_manifest
    from data.tokenizer import check_saved_tokenizer

    dirs = [cfg.data.dir] if cfg.data.dir else [s.dir for s in cfg.data.sources]
    dirs = [d if is_remote(d) else str(Path(d).expanduser()) for d in dirs]
    for directory in dirs[1:]:  # a mixture: each source's shard files (gpt-pretrain checks their tokenizers)
        check_files(load_manifest(directory))
    manifest = load_manifest(dirs[0])
    check_files(manifest)
    check_saved_tokenizer(manifest.directory, manifest.vocab_size, manifest.eot_id)  # the trainer's, too
    if manifest.seq_len > int(cfg.model.seq_len):  # the trainer's check (pretrain/tasks/lm.py)
        raise UserError(
            f"data.dir={manifest.directory} has seq_len={manifest.seq_len} > model.seq_len={cfg.model.seq_len}"
        )
    checked.manifest, checked.vocab_size, checked.seq_len = manifest, manifest.vocab_size, manifest.seq_len
    return (
        f"{manifest.directory}: {manifest.tokenizer} tokenizer, vocab {manifest.vocab_size}, "
        f"windows of {manifest.seq_len}"
    )


def _run_dir(cfg: Groups, checked: Checked) -> str:
    from data.output_dir import RUN_DIR_NAMES, check_run_dir
    from parallel.checkpoint import CheckpointDir
    from parallel.train_state import TrainState

    run_dir = Path(cfg.run.dir).expanduser()
    check_run_dir(run_dir, (*RUN_DIR_NAMES, "metrics.tmp", "results.json"), command="gpt-pretrain")
    steps = CheckpointDir(run_dir).steps()
    if not steps:
        return f"{run_dir}: no checkpoint (a new run)"
    if cfg.run.restart:
        return f"{run_dir}: {steps[0].name} is moved aside (run.restart=true)"
    try:
        checked.saved, checked.saved_dir = TrainState.read(steps[0]), steps[0]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"run.dir={run_dir}: {steps[0].name} is unreadable ({exc})") from None
    if checked.manifest is None and checked.saved.vocab_size:
        checked.vocab_size = int(checked.saved.vocab_size)
    return f"{run_dir}: resumes {steps[0].name} (checksums are verified at start)"


def resume_problem(cfg: Run, checked: Checked) -> str | None:
    """Why the checkpoint in run.dir cannot be resumed at ``cfg``'s layout, or None."""
    if checked.saved is None:
        return None
    from pretrain.trainer.resume_checks import check_data, check_resume, data_identity

    try:
        check_resume(cfg, checked.saved, checked.saved_dir)
        if checked.manifest is not None:
            check_data(cfg, checked.saved, data_identity(checked.manifest))
        weights_only = bool(checked.saved.weights_only)
        distributed_optimizer_in_effect(cfg, cfg.layout.dp, None if weights_only else checked.saved)
    except UserError as exc:
        return str(exc)
    return None


def run_checks(cfg: DictConfig, world_size: int, layout: bool = True) -> Checked:
    """Every check gpt-pretrain makes before launch, at ``world_size`` ranks. ``layout=False``
    (the search) leaves out the layout of the config, whose alternatives are checked one by one."""
    checked = Checked(seq_len=int(cfg.model.seq_len))
    if checked.run("config", lambda: _validated(cfg, checked)) is None:
        return checked  # the other checks read the values this one refused
    groups = checked.groups
    if not _has_data(cfg):
        given = cfg.vocab_size if "vocab_size" in cfg else None  # gpt-plan's (check_plan)
        checked.vocab_size = int(given) if given is not None else GPT2_VOCAB  # check_plan refused 0
        checked.passed.append(("data", f"not given: vocab {checked.vocab_size} assumed (data.dir=DIR or vocab_size=N)"))
    else:
        checked.run("data", lambda: _data(groups, checked))
    checked.run("run dir", lambda: _run_dir(groups, checked))
    if layout:
        run = checked.run("layout", lambda: Run.build(groups, world_size=world_size, rank=0))
        if isinstance(run, Run):
            checked.planned, checked.topo = run, run.layout
            checked.passed[-1] = ("layout", describe_layout(run))
            if checked.saved is not None:
                problem = resume_problem(run, checked)
                if problem:
                    checked.errors.append(problem)
                else:
                    checked.passed.append(("resume", f"{checked.saved_dir.name} continues at this layout"))
    return checked


def describe_layout(cfg: Run) -> str:
    train, par, topo = cfg.train, cfg.parallel, cfg.layout
    text = f"tp={topo.tp} pp={topo.pp} vpp={topo.vpp} dp={topo.dp}" + (" +sp" if topo.sequence_parallel else "")
    text += f" ep={topo.ep}" if topo.ep > 1 else ""  # experts split over ep of the dp ranks
    if cfg.caps.zero:
        text += f", {par.engine} ZeRO-{par.zero_stage}" + (" +offload" if par.offload == "cpu" else "")
    else:
        text += f", {par.engine}" + (" +distributed optimizer" if cfg.distributed_optimizer else "")
    return (
        f"{text}; micro-batch {train.micro_batch} x {cfg.micro_batches} accumulation x dp {topo.dp} "
        f"= global {train.global_batch}; recompute {cfg.model.recompute}"
    )


def size(n: float) -> str:
    """Bytes as people read them: GiB, or MiB / KiB below a tenth of the next unit."""
    for unit, scale in (("GiB", GiB), ("MiB", float(1 << 20))):
        if n >= 0.1 * scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def largest(plan: MemoryPlan, hw: Hardware) -> tuple[int, RankMemory]:
    index = max(range(len(plan.ranks)), key=lambda i: hw.needs(plan.ranks[i]))
    return index, plan.ranks[index]


def suggestion(rank: RankMemory, cfg: Run) -> str:
    """What would most likely make ``rank`` fit: the remedy of its largest term."""
    states = rank.params + rank.grads + rank.optimizer
    if rank.activations >= states:
        if cfg.model.recompute != "full":
            return "model.recompute=selective or full, a smaller train.micro_batch, or more parallel.tp"
        return "a smaller train.micro_batch, or more parallel.tp / parallel.pp"
    if cfg.layout.dp > 1 and cfg.caps.distributed_optimizer and not cfg.distributed_optimizer:
        return "parallel.distributed_optimizer=true, or more parallel.tp / parallel.pp"
    return "more parallel.tp / parallel.pp, or parallel.engine=deepspeed with a higher parallel.zero_stage / offload"


def memory_problem(plan: MemoryPlan, hw: Hardware, cfg: Run) -> str | None:
    """The one line refusing a layout that does not fit, or None."""
    index, rank = largest(plan, hw)
    if hw.fits(plan):
        return None
    parts = ", ".join(f"{k.replace('_', ' ')} {size(getattr(rank, k))}" for k in KINDS if getattr(rank, k))
    if rank.cpu_offload:
        parts += f", offloaded {size(rank.cpu_offload)}"
    need = hw.needs(rank)
    where = f"{size(hw.memory_bytes)} on {hw.name}"
    if need <= hw.memory_bytes:  # the device fits, the host does not
        need, where = rank.cpu_offload, f"{size(hw.host_bytes)} of host memory per device"
    return (
        f"preflight: rank pp{index} needs {size(need)} ({parts}) > {where}; "
        f"try {suggestion(rank, cfg)} (gpt-plan search=true lists the layouts that fit)"
    )


def preflight(cfg: Run, vocab_size: int | None, seq_len: int | None) -> None:
    """gpt-pretrain's memory check before the model is built (``train.preflight``): ``error`` refuses
    a layout predicted not to fit in one line, ``warn`` prints that line and goes on, ``off`` skips.
    The device's memory: ``hardware.memory_gb``, else the preset's, else the GPU's, else host RAM
    divided by the processes on this machine (LOCAL_WORLD_SIZE)."""
    mode, topo = cfg.train.preflight, cfg.layout
    if mode == "off":
        return
    from conf.groups import HardwareConfig
    from parallel.plan.hardware import resolve
    from parallel.plan.memory import estimate_memory

    hw_cfg = cfg.hardware or HardwareConfig()  # gpt-finetune has no hardware group: this machine
    local = int(os.environ.get("LOCAL_WORLD_SIZE", topo.world_size if topo.world_size > 1 else 1))
    hw = resolve(hw_cfg, cfg.train.bf16, processes_per_node=local, calibrate=False, rates=False)
    plan = estimate_memory(cfg, topo, vocab_size=vocab_size, seq_len=seq_len)
    problem = memory_problem(plan, hw, cfg)
    if problem is None:
        return
    if mode == "error":
        raise UserError(problem + "; train.preflight=warn runs it anyway")
    if topo.rank == 0:
        print(f"warning: {problem.replace('preflight: ', 'preflight (train.preflight=warn): ', 1)}", flush=True)
