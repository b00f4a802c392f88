"""How a run starts in its run dir: ``resume(...) -> Start``.

In this order: the run dir made ready (a killed save's temp dirs removed, ``run.restart``), the
newest verified checkpoint selected, the resume guards (``pretrain/trainer/resume_checks.py``), the engine built —
from a weights-only step (``gpt-import``) or loaded from a full one, falling back past a step that
verified but cannot be loaded on some rank — and the task's loader and the skip policy restored.
Every change the resume makes is an event for ``metrics.jsonl`` (``Start.events``) and one line on
rank 0. The lease on the run dir (``take_lease``) is taken before any of it.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conf.errors import UserError
from parallel.capabilities import distributed_optimizer_in_effect
from parallel.checkpoint import PREFIX, CheckpointDir, CheckpointException, one_line
from parallel.engine import Engine, ModelSpec, engine_class
from parallel.run_config import Run
from parallel.run_lease import Lease
from parallel.train_state import TrainState
from parallel.watchdog import Watchdog
from pretrain.tasks import Task
from pretrain.trainer.resume_checks import check_resume, config_changes
from pretrain.trainer.skip_policy import SkipPolicy

RUN_FILES = ("metrics.jsonl", "config.yaml", "loss.png", "eval.png", "samples_rank*.jsonl", "results.json")


@dataclass
class Start:
    """Where the step loop starts: the engine (state loaded), the step, what the resume did, and the run
    in effect (the distributed optimizer as the resumed checkpoint settles it)."""

    run: Run
    engine: Engine
    step: int
    checkpoint: Path | None  # the step dir resumed from; None: a fresh start or weights only
    events: list[dict[str, Any]] = field(default_factory=list)


def prepare_run_dir(config: Run, ckpts: CheckpointDir, run_dir: Path, rank0: bool) -> None:
    """Clear what a killed save left (ours), and honour ``run.restart=true``: the earlier run's
    checkpoints and files move to ``restarted-<time>/`` (nothing is deleted). A relaunch with the
    flag still set (a requeue) resumes the restarted run instead of starting over again."""
    ckpts.remove_stale()
    steps = ckpts.steps()
    if not config.run.restart or not steps:
        return
    try:
        restarted = bool(TrainState.read(steps[0]).config["run"].get("restart", False))
    except (OSError, ValueError, KeyError, TypeError):
        restarted = False
    if restarted:
        if rank0:
            print(
                f"run.restart=true: {steps[0].name} was written after a restart (a requeue?): resuming it; "
                "move run.dir away to start over again",
                flush=True,
            )
        return
    target = ckpts.archive(run_dir, RUN_FILES)
    if rank0:
        print(f"run.restart=true: moved the earlier run's checkpoints and metrics to {target}", flush=True)


def load_agreed(ckpts: CheckpointDir, path: Path, engine: Engine) -> tuple[TrainState | None, str | None]:
    """Load ``path``; a step that verified but cannot be read (any rank) is reported, not raised,
    so that every rank falls back to the same older step."""
    import torch.distributed as dist

    state, problem = None, None
    try:
        state = ckpts.load(path, engine, restore_rng=True)
    except (Exception, CheckpointException) as exc:  # DCP's exception is a BaseException
        problem = f"unreadable: {one_line(exc)}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, problem)
        problem = next((p for p in gathered if p), None)
    return state, problem


def take_lease(config: Run, run_dir: Path, rank0: bool) -> Lease | None:
    """Rank 0 takes ``run.dir``'s lease (one writer per run dir); every rank raises the same one-line
    refusal when it is held by a live run. The other ranks write only their own checkpoint files."""
    import torch.distributed as dist

    lease, problem = None, None
    if rank0:
        lease = Lease(run_dir, config.run.lease_expiry_s, config.run.takeover)
        try:
            note = lease.acquire()
            if note:
                print(note, flush=True)
        except UserError as exc:
            lease, problem = None, str(exc)
        except OSError as exc:  # every rank must hear it: the others wait in the broadcast below
            lease, problem = None, f"run.dir={run_dir}: cannot create its lease ({exc.strerror or exc})"
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [problem]
        dist.broadcast_object_list(gathered, src=0)
        problem = gathered[0]
    if problem is not None:
        raise UserError(problem)
    return lease


def with_weights(spec: ModelSpec, step_dir: Path) -> ModelSpec:
    """``spec`` whose chunks start from the model weights saved in ``step_dir`` (resharded to this
    layout by ``dist_checkpointing``), loaded before either engine wraps them."""

    def build(config: Any, vp_stage: int | None) -> Any:
        from megatron.core import dist_checkpointing

        chunk = spec.build(config, vp_stage)
        chunk.load_state_dict(dist_checkpointing.load({"model": chunk.sharded_state_dict()}, str(step_dir))["model"])
        return chunk

    return dataclasses.replace(spec, build=build)


def resize_event(config: Run, state: TrainState) -> dict[str, Any] | None:
    """``{"event": "resize"}`` when the checkpoint was written at another dp with the same tp and pp:
    the world grew or shrank (an elastic restart, a requeue on fewer nodes). The layout rule: tp and
    pp stay, dp absorbs the change; the global batch stays (the accumulation changes), so the sample
    order and the lr schedule go on as if nothing happened. None for the same dp, a tp / pp reshard,
    or a checkpoint that did not record its layout."""
    old, topo = state.layout, config.layout
    if not old or "dp" not in old or old["dp"] == topo.dp or (old.get("tp"), old.get("pp")) != (topo.tp, topo.pp):
        return None
    recorded = state.config.get("train", {})  # the checkpoint's run (an older one may lack a key)
    micro = int(recorded.get("micro_batch", config.train.micro_batch))
    return {
        "event": "resize",
        "dp_from": old["dp"],
        "dp_to": topo.dp,
        "world_from": old["dp"] * topo.tp * topo.pp,
        "world_to": topo.world_size,
        "tp": topo.tp,
        "pp": topo.pp,
        "global_batch": config.train.global_batch,
        "accumulation_from": int(recorded.get("global_batch", config.train.global_batch)) // (micro * old["dp"]),
        "accumulation_to": config.micro_batches,
    }


def describe_resize(event: dict[str, Any]) -> str:
    """The resize in one line (rank 0's console)."""
    return (
        f"resize: dp {event['dp_from']} -> {event['dp_to']} (world {event['world_from']} -> {event['world_to']}; "
        f"tp={event['tp']} pp={event['pp']} kept): global batch {event['global_batch']} kept with "
        f"{event['accumulation_from']} -> {event['accumulation_to']} micro-batches per rank per step; "
        "the sample order and the lr schedule go on unchanged"
    )


def resume(config: Run, task: Task, ckpts: CheckpointDir, watchdog: Watchdog, policy: SkipPolicy) -> Start:
    """The engine and task ready at the step the run continues from (0 for a new run)."""
    topo = config.layout
    rank0 = topo.rank == 0
    prepare_run_dir(config, ckpts, Path(config.run.dir), rank0)
    latest, events = ckpts.select()
    saved = TrainState.read(latest) if latest is not None else None
    weights = latest if saved is not None and saved.weights_only else None  # e.g. gpt-import's step_0
    restore_data = True
    if saved is not None:
        check_resume(config, saved, latest)
        restore_data = task.check_resume(config, saved, latest)
    config = config.with_distributed_optimizer(
        distributed_optimizer_in_effect(config, topo.dp, None if weights else saved)
    )

    def build(resuming: bool) -> Engine:
        spec = task.model_spec(config, resuming=resuming)
        return engine_class(config.parallel.engine)(config, topo, with_weights(spec, weights) if weights else spec)

    engine = build(resuming=saved is not None)
    task.start(config, topo)
    if weights is not None:  # a fresh optimizer, schedule and data order from these weights
        events.append({"event": "init_weights", "checkpoint": str(weights), "from": saved.converted_from})
        if rank0:
            print(
                f"continuing from the model weights of {weights} ({saved.converted_from or 'weights only'}) at "
                f"step {saved.step}: new optimizer state and data order",
                flush=True,
            )
        return Start(config, engine, saved.step, None, events)
    state = None
    while latest is not None:
        with watchdog.watch("checkpoint load", 0):
            state, problem = load_agreed(ckpts, latest, engine)
        if problem is None:
            break
        del engine  # a half-done load may have changed its state; free it before building the next
        gc.collect()
        engine = build(resuming=True)
        events.append(ckpts.fallback(latest, problem))
        latest, more = ckpts.select(older_than=int(latest.name[len(PREFIX) :]))
        events += more
    if state is None:
        if saved is not None:  # no checkpoint could be loaded: start fresh
            engine = build(resuming=False)
        return Start(config, engine, 0, None, events)
    if restore_data:
        task.load_state_dict(state.data)
        events += task.resume_events()  # e.g. a mixture's new weights
    else:
        events.append({"event": "new_data", "data_dir": config.data.dir, "was": state.data_identity})
    policy.load_state_dict(state.skip_policy)
    events += config_changes(config, state)
    resized = resize_event(config, state)
    if resized is not None:
        events.append(resized)
    if rank0:
        print(f"resumed from {latest} at step {state.step}", flush=True)
        if resized is not None:
            print(describe_resize(resized), flush=True)
        for event in events:
            if event["event"] == "config_change":
                print(f"resume: {event['key']} {event['old']} -> {event['new']} (the config in effect wins)")
            elif event["event"] == "new_data":
                print(f"resume: data.allow_new=true: continuing on the new shard set {config.data.dir}")
    return Start(config, engine, state.step, latest, events)
