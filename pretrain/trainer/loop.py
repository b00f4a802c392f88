"""The one training loop: ``Trainer(cfg).run(task)`` for pretraining and fine-tuning alike.

``run`` sets up, in this order: topology → run-dir check → preflight → process groups → the run
dir's lease → stop signals and watchdog → :func:`pretrain.trainer.startup.resume` (engine, checkpoint,
guards) → metrics; then :meth:`Trainer.loop` runs the steps (skip policy, metrics, checkpoint
before evaluation, in-loop lm-eval, preemption agreement), and one ``try/finally`` tears down
whatever was set up, however the run ends. The step clock restarts after a step's saves and
evaluations, so ``tokens_per_s`` counts training only. A task (``pretrain/tasks/``) supplies the
model and its loss, the batches, what it logs and how it evaluates.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from conf.errors import RunError
from data.output_dir import RUN_DIR_NAMES, check_run_dir
from parallel.checkpoint import PREFIX, CheckpointDir
from parallel.topology import Topology
from parallel.train_state import TrainState
from parallel.watchdog import Watchdog
from pretrain.tasks import Task
from pretrain.trainer.metrics import Metrics
from pretrain.trainer.preemption import INTERRUPTED_EXIT_CODE, StopRequest
from pretrain.trainer.preflight import preflight
from pretrain.trainer.skip_policy import SkipPolicy
from pretrain.trainer.startup import Start, resume, take_lease


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
        self.task, self.topo = task, Topology.from_config(cfg)
        self.run_dir = Path(cfg.run.dir)
        check_run_dir(self.run_dir, (*RUN_DIR_NAMES, "metrics.tmp", "results.json"), command=task.command)
        # train.preflight: will this layout fit the device? (gpt-plan's estimate, before any process group)
        preflight(cfg, self.topo, task.vocab_size, task.seq_len)
        self.ckpts = CheckpointDir(self.run_dir, int(cfg.train.keep_last))
        self.policy = SkipPolicy(cfg.train.spike_factor, int(cfg.train.max_skipped), rank0=self.topo.rank == 0)
        self.topo.init(int(cfg.train.seed), float(cfg.parallel.timeout_s))
        with contextlib.ExitStack() as teardown:
            lease = take_lease(cfg, self.run_dir, self.topo.rank == 0)  # before anything in run.dir is touched
            if lease is not None:
                teardown.callback(lease.release)
            self.lease = lease
            # before the engine and loader start helpers (forked helpers ignore these: process_hygiene)
            self.stop = StopRequest([*cfg.train.preempt_signals, "SIGINT"]).install()
            teardown.callback(self.stop.uninstall)
            topo = self.topo
            self.watchdog = Watchdog(float(cfg.parallel.timeout_s), topo.rank, topo.world_size, topo.world_size > 1)
            teardown.callback(self.watchdog.close)
            start = resume(cfg, task, topo, self.ckpts, self.watchdog, self.policy)
            self.engine = start.engine
            if start.step >= int(cfg.train.max_steps):
                self._say_done(start)
                self.stop.uninstall()  # a Ctrl-C in the task's final outputs is an ordinary Ctrl-C
                return task.finish(self.engine, topo, start.step, None, trained=False)
            self.metrics = self._open_metrics(start)
            teardown.callback(self.metrics.close)
            step, stopped, last_eval = self.loop(start.step)
            self.finalize(step, blocking=True)
            if stopped is not None:
                code = INTERRUPTED_EXIT_CODE if stopped == "SIGINT" else int(cfg.train.requeue_exit_code)
                return {"step": step, "exit_code": code, **(last_eval or {})}
            self.stop.uninstall()
            self.metrics.close()  # metrics and plots complete before the final outputs, under the lease
            return task.finish(self.engine, self.topo, step, last_eval, trained=True)

    def _say_done(self, start: Start) -> None:
        if self.topo.rank == 0:
            where = f"{start.checkpoint} is at step {start.step}" if start.checkpoint else "train.max_steps=0"
            print(f"{where}: nothing to do (raise train.max_steps to continue training)", flush=True)

    def _open_metrics(self, start: Start) -> Metrics:
        """``config.yaml`` (the config in effect), ``metrics.jsonl`` from ``start.step`` with the resume's events."""
        rank0 = self.topo.rank == 0
        if rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
        metrics = Metrics(self.cfg, self.run_dir, start.step, enabled=rank0)
        for event in start.events:
            metrics.log({"step": start.step, **event}, console=False)
        self.task.begin(self.run_dir, start.step)
        return metrics

    def loop(self, step: int) -> tuple[int, str | None, dict[str, float] | None]:
        """Train from ``step`` to ``train.max_steps`` or an agreed stop signal; returns
        (the last step, the stop signal or None, the last evaluation)."""
        cfg, task, policy, watchdog = self.cfg, self.task, self.policy, self.watchdog
        max_steps = int(cfg.train.max_steps)
        eval_every, save_every = task.cadence(cfg)
        last_eval, stopped = None, None
        tick = time.perf_counter()
        while step < max_steps:
            step = self.train_step(step, tick)
            if policy.consecutive >= policy.max_skipped:
                self.finalize(step, blocking=True)  # an in-flight save is of a good state: commit it
                policy.check()
            lost = self.lease.lost() if self.lease is not None else None
            if lost is not None:  # another run took run.dir over: it is the writer now (rank 0 holds the lease)
                raise RunError(f"run.dir={self.run_dir}: this run lost its lease ({lost}); stopped without saving")
            last = step == max_steps
            saved_now = (save_every > 0 and step % save_every == 0) or (last and save_every >= 0)
            if saved_now:  # before evaluation: a failing evaluation never costs the step's checkpoint
                self.save(step, asynchronous=bool(cfg.train.async_save) and not last)
            if (eval_every > 0 and step % eval_every == 0) or last:
                with watchdog.watch("evaluation", step):
                    last_eval = task.evaluate(self.engine, self.topo, watchdog.beat)
                if last_eval:
                    self.metrics.log({"step": step, **last_eval}, console=True)
            in_loop = task.in_loop_eval
            if in_loop is not None and in_loop.due(step, last):  # after the save; never stops training
                with watchdog.watch("in-loop evaluation (eval.tasks)", step):
                    record = in_loop.run(self.engine, self.topo, step, watchdog.beat)
                if record:
                    self.metrics.log({"step": step, **record}, console=True)
            with watchdog.watch("preemption-signal agreement", step):
                stopped = self.stop.agreed() if not last else None
            if stopped is not None:
                if self.topo.rank == 0:
                    print(f"step {step}: {stopped}: saving a checkpoint and exiting", flush=True)
                if not saved_now:
                    self.save(step, asynchronous=False)
                break
            tick = time.perf_counter()
        return step, stopped, last_eval

    def train_step(self, step: int, tick: float) -> int:
        """One optimizer step (or a skipped one) and its ``metrics.jsonl`` line; returns the new step."""
        self.policy.step = step + 1
        with self.watchdog.watch("train step (data, forward/backward, gradient reduction, optimizer)", step + 1):
            result = self.engine.train_step(self.task.next_batches(), accept=self.policy.accept)
        step += 1
        now = time.perf_counter()
        record = {
            "step": step,
            "loss": result.loss if math.isfinite(result.loss) else None,
            "lr": result.lr,
            "grad_norm": result.grad_norm if math.isfinite(result.grad_norm) else None,
            **self.task.step_record(result, now - tick, step),
            **result.metrics,
            "step_time_s": now - tick,
            "skipped_steps": self.policy.total,
        }
        if result.skipped:
            record["skipped"] = self.policy.reason or "optimizer overflow"
        self.metrics.log(record, console=result.skipped)
        if self.ckpts.pending:
            self.finalize(step, blocking=False)
        return step

    def save(self, step: int, asynchronous: bool) -> None:
        cfg, topo, task = self.cfg, self.topo, self.task
        state = TrainState(
            step=step,
            config=OmegaConf.to_container(cfg, resolve=True),
            vocab_size=task.vocab_size,
            engine=str(cfg.parallel.engine),
            layout={"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "vpp": topo.vpp, "ep": topo.ep},
            distributed_optimizer=bool(cfg.parallel.distributed_optimizer),
            data=task.state_dict(),
            skip_policy=self.policy.state_dict(),
            **task.checkpoint_extras(),
        )
        with self.watchdog.watch("checkpoint save", step):
            path = self.ckpts.save(step, self.engine, state, task.files, async_save=asynchronous)
        if not asynchronous:
            self.metrics.log({"step": step, "checkpoint": str(path)}, console=False)

    def finalize(self, step: int, blocking: bool) -> None:
        with self.watchdog.watch("async checkpoint commit", step):
            for path in self.ckpts.finalize(blocking=blocking):
                self.metrics.log({"step": int(path.name[len(PREFIX) :]), "checkpoint": str(path)}, console=False)
