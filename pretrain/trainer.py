"""The one training loop: ``Trainer(cfg).run(task)`` for pretraining and fine-tuning alike.

It owns, in this order: topology → run dir and checkpoints (verified, with fallback) →
resume guards → preemption and watchdog → engine → the task's batches → the step loop
(skip policy, metrics, checkpoint before evaluation, in-loop lm-eval, preemption agreement) →
the task's final outputs. The step clock restarts after a step's saves and evaluations, so
``tokens_per_s`` counts training only. A task (``pretrain/tasks/``) supplies only the model and
its loss, the batches, what it logs and how it evaluates.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from conf.errors import RunError, UserError
from data.output_dir import RUN_DIR_NAMES, check_run_dir
from parallel.checkpoint import PREFIX, CheckpointDir, CheckpointException, one_line
from parallel.engine import Engine, ModelSpec, engine_class
from parallel.run_lease import Lease
from parallel.topology import Topology
from parallel.train_state import TrainState
from parallel.watchdog import Watchdog
from pretrain.metrics import Metrics
from pretrain.preemption import INTERRUPTED_EXIT_CODE, StopRequest
from pretrain.preflight import preflight
from pretrain.resume import check_resume, config_changes
from pretrain.skip_policy import SkipPolicy
from pretrain.tasks import Task

RUN_FILES = ("metrics.jsonl", "config.yaml", "loss.png", "eval.png", "samples_rank*.jsonl", "results.json")


def resolve_distributed_optimizer(cfg: DictConfig, topo: Topology, saved: TrainState | None) -> bool:
    """``parallel.distributed_optimizer`` (true / false / auto) as a bool.

    ``auto`` is what the checkpoint being resumed used (its optimizer state only loads
    into the same kind of optimizer, at any tp/pp/dp), else dp > 1 on the megatron engine:
    the distributed optimizer shards Adam state over dp but costs a share of every step at dp = 1.
    """
    value = str(cfg.parallel.distributed_optimizer).lower()
    previous = None if saved is None else saved.distributed_optimizer
    if cfg.parallel.engine != "megatron":
        return False  # ZeRO is parallel.zero_stage there
    if value == "auto":
        return bool(previous) if previous is not None else topo.dp > 1
    if value not in ("true", "false"):
        raise UserError(f"parallel.distributed_optimizer={value}: expected true, false or auto")
    wanted = value == "true"
    if previous is not None and wanted != previous:
        raise UserError(
            f"parallel.distributed_optimizer={value}, but the checkpoint in run.dir={cfg.run.dir} was written "
            f"with distributed_optimizer={str(previous).lower()}: pass that value (or auto)"
        )
    return wanted


def prepare_run_dir(cfg: DictConfig, ckpts: CheckpointDir, run_dir: Path, rank0: bool) -> None:
    """Clear what a killed save left (ours), and honour ``run.restart=true``: the earlier run's
    checkpoints and files move to ``restarted-<time>/`` (nothing is deleted). A relaunch with the
    flag still set (a requeue) resumes the restarted run instead of starting over again."""
    ckpts.remove_stale()
    steps = ckpts.steps()
    if not cfg.run.get("restart", False) or not steps:
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


def take_lease(cfg: DictConfig, run_dir: Path, rank0: bool) -> Lease | None:
    """Rank 0 takes ``run.dir``'s lease (one writer per run dir); every rank raises the same one-line
    refusal when it is held by a live run. The other ranks write only their own checkpoint files."""
    import torch.distributed as dist

    lease, problem = None, None
    if rank0:
        lease = Lease(run_dir, float(cfg.run.lease_expiry_s), bool(cfg.run.takeover))
        try:
            note = lease.acquire()
            if note:
                print(note, flush=True)
        except UserError as exc:
            lease, problem = None, str(exc)
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


class Trainer:
    """Runs one task under the config in effect; returns the task's summary (``exit_code`` when stopped)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def run(self, task: Task) -> dict[str, Any]:
        cfg = self.cfg
        with open_dict(cfg):
            task.configure(cfg)
            if cfg.train.get("warmup_fraction") is not None:  # of the run's max_steps, either task
                cfg.train.warmup_steps = int(round(float(cfg.train.warmup_fraction) * int(cfg.train.max_steps)))
        topo = Topology.from_config(cfg)
        run_dir = Path(cfg.run.dir)
        check_run_dir(run_dir, (*RUN_DIR_NAMES, "metrics.tmp", "results.json"), command=task.command)
        # train.preflight: will this layout fit the device? (gpt-plan's estimate, before any process group)
        preflight(cfg, topo, task.vocab_size, getattr(getattr(task, "manifest", None), "seq_len", None))
        ckpts = CheckpointDir(run_dir, int(cfg.train.keep_last))
        policy = SkipPolicy(cfg.train.spike_factor, int(cfg.train.max_skipped), rank0=topo.rank == 0)
        topo.init(int(cfg.train.seed), float(cfg.parallel.timeout_s))
        rank0 = topo.rank == 0
        lease = take_lease(cfg, run_dir, rank0)  # before anything in run.dir is touched
        try:
            return self._run(task, cfg, topo, run_dir, ckpts, lease, policy)
        finally:
            if lease is not None:
                lease.release()

    def _run(
        self,
        task: Task,
        cfg: DictConfig,
        topo: Topology,
        run_dir: Path,
        ckpts: CheckpointDir,
        lease: Lease | None,
        policy: SkipPolicy,
    ) -> dict[str, Any]:
        rank0 = topo.rank == 0
        prepare_run_dir(cfg, ckpts, run_dir, rank0)
        latest, events = ckpts.select()
        saved = TrainState.read(latest) if latest is not None else None
        weights = latest if saved is not None and saved.weights_only else None  # e.g. gpt-import's step_0
        restore_data = True
        if saved is not None:
            check_resume(cfg, saved, latest)
            restore_data = task.check_resume(cfg, saved, latest)
        with open_dict(cfg):
            cfg.parallel.distributed_optimizer = resolve_distributed_optimizer(cfg, topo, None if weights else saved)
        # before the engine and loader start helpers (forked helpers ignore these: process_hygiene)
        stop = StopRequest([*cfg.train.preempt_signals, "SIGINT"]).install()
        watchdog = Watchdog(float(cfg.parallel.timeout_s), topo.rank, topo.world_size, enabled=topo.world_size > 1)
        spec = task.model_spec(cfg, resuming=saved is not None)
        engine = engine_class(str(cfg.parallel.engine))(cfg, topo, with_weights(spec, weights) if weights else spec)
        task.start(cfg, topo)
        step, state = 0, None
        if weights is not None:
            step, latest = saved.step, None  # a fresh optimizer, schedule and data order from these weights
            events.append({"event": "init_weights", "checkpoint": str(weights), "from": saved.converted_from})
            if rank0:
                print(
                    f"continuing from the model weights of {weights} ({saved.converted_from or 'weights only'}) at "
                    f"step {step}: new optimizer state and data order",
                    flush=True,
                )
        while latest is not None:
            with watchdog.watch("checkpoint load", 0):
                state, problem = load_agreed(ckpts, latest, engine)
            if problem is None:
                break
            # a half-done load may have changed the engine's state: the older step starts from a new one
            engine = engine_class(str(cfg.parallel.engine))(cfg, topo, task.model_spec(cfg, resuming=True))
            events.append(ckpts.fallback(latest, problem))
            latest, more = ckpts.select(older_than=int(latest.name[len(PREFIX) :]))
            events += more
        if saved is not None and state is None and weights is None:  # no checkpoint could be loaded: start fresh
            engine = engine_class(str(cfg.parallel.engine))(cfg, topo, task.model_spec(cfg, resuming=False))
        if latest is not None and state is not None:
            step = state.step
            if restore_data:
                task.load_state_dict(state.data)
                events += getattr(task, "resume_events", list)()  # e.g. a mixture's new weights
            else:
                events.append({"event": "new_data", "data_dir": cfg.data.dir, "was": state.data_identity})
            policy.load_state_dict(state.skip_policy)
            events += config_changes(cfg, state)
            if rank0:
                print(f"resumed from {latest} at step {step}", flush=True)
                for event in events:
                    if event["event"] == "config_change":
                        print(f"resume: {event['key']} {event['old']} -> {event['new']} (the config in effect wins)")
                    elif event["event"] == "new_data":
                        print(f"resume: data.allow_new=true: continuing on the new shard set {cfg.data.dir}")
        max_steps = int(cfg.train.max_steps)
        if step >= max_steps:
            if rank0:
                where = f"{latest} is at step {step}" if latest is not None else "train.max_steps=0"
                print(f"{where}: nothing to do (raise train.max_steps to continue training)", flush=True)
            stop.uninstall()
            watchdog.close()
            return task.finish(engine, topo, step, None, trained=False)
        if rank0:
            run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        metrics = Metrics(cfg, run_dir, step, enabled=rank0)
        for event in events:
            metrics.log({"step": step, **event}, console=False)
        task.begin(run_dir, step)
        eval_every, save_every = task.cadence(cfg)
        in_loop = getattr(task, "in_loop_eval", None)  # eval.every_steps (pretraining; pretrain/in_loop_eval.py)
        async_save = bool(cfg.train.async_save)
        last_eval, stopped = None, None

        def save(step: int, asynchronous: bool) -> None:
            state = TrainState(
                step=step,
                config=OmegaConf.to_container(cfg, resolve=True),
                vocab_size=task.vocab_size,
                engine=str(cfg.parallel.engine),
                layout={"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "vpp": topo.vpp},
                distributed_optimizer=bool(cfg.parallel.distributed_optimizer),
                data=task.state_dict(),
                skip_policy=policy.state_dict(),
                **task.checkpoint_extras(),
            )
            with watchdog.watch("checkpoint save", step):
                path = ckpts.save(step, engine, state, task.files, async_save=asynchronous)
            if not asynchronous:
                metrics.log({"step": step, "checkpoint": str(path)}, console=False)

        def finalize(step: int, blocking: bool) -> None:
            with watchdog.watch("async checkpoint commit", step):
                for path in ckpts.finalize(blocking=blocking):
                    metrics.log({"step": int(path.name[len(PREFIX) :]), "checkpoint": str(path)}, console=False)

        tick = time.perf_counter()
        while step < max_steps:
            policy.step = step + 1
            with watchdog.watch("train step (data, forward/backward, gradient reduction, optimizer)", step + 1):
                result = engine.train_step(task.next_batches(), accept=policy.accept)
            step += 1
            now = time.perf_counter()
            record = {
                "step": step,
                "loss": result.loss if math.isfinite(result.loss) else None,
                "lr": result.lr,
                "grad_norm": result.grad_norm if math.isfinite(result.grad_norm) else None,
                **task.step_record(result, now - tick, step),
                "step_time_s": now - tick,
                "skipped_steps": policy.total,
            }
            if result.skipped:
                record["skipped"] = policy.reason or "optimizer overflow"
            metrics.log(record, console=result.skipped)
            if ckpts.pending:
                finalize(step, blocking=False)
            if policy.consecutive >= policy.max_skipped:
                finalize(step, blocking=True)  # an in-flight save is of a good state: commit it
                policy.check()
            last = step == max_steps
            saved_now = (save_every > 0 and step % save_every == 0) or (last and save_every >= 0)
            if saved_now:  # before evaluation: a failing evaluation never costs the step's checkpoint
                save(step, asynchronous=async_save and not last)
            if (eval_every > 0 and step % eval_every == 0) or last:
                with watchdog.watch("evaluation", step):
                    last_eval = task.evaluate(engine, topo, watchdog.beat)
                if last_eval:
                    metrics.log({"step": step, **last_eval}, console=True)
            if in_loop is not None and in_loop.due(step, last):  # after the save; never stops training
                with watchdog.watch("in-loop evaluation (eval.tasks)", step):
                    record = in_loop.run(engine, topo, step, watchdog.beat)
                if record:
                    metrics.log({"step": step, **record}, console=True)
            lost = lease.lost() if lease is not None else None
            if lost is not None:  # another run took run.dir over: it is the writer now
                raise RunError(f"run.dir={run_dir}: this run lost its lease ({lost}); stopped without saving")
            with watchdog.watch("preemption-signal agreement", step):
                stopped = stop.agreed() if not last else None
            if stopped is not None:
                if rank0:
                    print(f"step {step}: {stopped}: saving a checkpoint and exiting", flush=True)
                if not saved_now:
                    save(step, asynchronous=False)
                break
            tick = time.perf_counter()
        finalize(step, blocking=True)
        stop.uninstall()
        watchdog.close()
        metrics.close()
        if stopped is not None:
            code = INTERRUPTED_EXIT_CODE if stopped == "SIGINT" else int(cfg.train.requeue_exit_code)
            return {"step": step, "exit_code": code, **(last_eval or {})}
        return task.finish(engine, topo, step, last_eval, trained=True)
