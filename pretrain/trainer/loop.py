"""The one training loop: ``Trainer(run).run(task)`` for pretraining and fine-tuning alike.

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

from omegaconf import OmegaConf

from conf.errors import RunError
from data.output_dir import RUN_DIR_NAMES, check_run_dir
from parallel.checkpoint import PREFIX, CheckpointDir
from parallel.plan.params import Shape, total_params
from parallel.run_config import Run
from parallel.train_state import TrainState
from parallel.watchdog import Watchdog
from pretrain.tasks import Task
from pretrain.trainer.gc_schedule import GcSchedule
from pretrain.trainer.goodput import process_start
from pretrain.trainer.metrics import Metrics
from pretrain.trainer.preemption import INTERRUPTED_EXIT_CODE, StopRequest
from pretrain.trainer.preflight import describe_layout, preflight
from pretrain.trainer.skip_policy import SkipPolicy
from pretrain.trainer.startup import Start, resume, take_lease
from pretrain.trainer.stragglers import Stragglers
from pretrain.trainer.stragglers import describe as describe_straggler


class Trainer:
    """Runs one task under its :class:`Run`; returns the task's summary (``exit_code`` when stopped)."""

    def __init__(self, config: Run):
        self.config = config  # the run in effect (a resume may settle the distributed optimizer)
        self._stalls: dict[int, float] = {}  # seconds the loop waited in an async save, until its commit is logged
        self._waited = 0.0  # seconds spent in commits that committed nothing yet (goodput: save stalls)

    def run(self, task: Task) -> dict[str, Any]:
        config = self.config
        self.task, self.topo = task, config.layout
        self.run_dir = Path(config.run.dir)
        check_run_dir(self.run_dir, (*RUN_DIR_NAMES, "metrics.tmp", "results.json"), command=task.command)
        # train.preflight: will this layout fit the device? (gpt-plan's estimate, before any process group)
        preflight(config, task.vocab_size, task.seq_len)
        self.ckpts = CheckpointDir(self.run_dir, config.train.keep_last)
        self.policy = SkipPolicy(config.train.spike_factor, config.train.max_skipped, rank0=self.topo.rank == 0)
        par = config.parallel
        self.stragglers = Stragglers(
            par.straggler_every, par.straggler_factor, par.straggler_windows, self.topo.world_size, self.topo.rank
        )
        self.topo.init(config.train.seed, config.parallel.timeout_s)
        with contextlib.ExitStack() as teardown:
            lease = take_lease(config, self.run_dir, self.topo.rank == 0)  # before anything in run.dir is touched
            if lease is not None:
                teardown.callback(lease.release)
            self.lease = lease
            # before the engine and loader start helpers (forked helpers ignore these: process_hygiene)
            self.stop = StopRequest([*config.train.preempt_signals, "SIGINT"]).install()
            teardown.callback(self.stop.uninstall)
            topo = self.topo
            self.watchdog = Watchdog(config.parallel.timeout_s, topo.rank, topo.world_size, topo.world_size > 1)
            teardown.callback(self.watchdog.close)
            if topo.rank == 0:  # the model build and a checkpoint load can take a while: say what happens
                print(
                    f"{task.command}: starting in {self.run_dir} ({topo.world_size} processes): building the model, "
                    "loading the newest checkpoint if any, opening the data...",
                    flush=True,
                )
            start = resume(config, task, self.ckpts, self.watchdog, self.policy)
            self.engine, self.config = start.engine, start.run
            self.first_step = start.step + 1
            self.stragglers.attach(self.engine.unwrapped_model(), self.first_step)
            teardown.callback(self.stragglers.close)
            if start.step >= config.train.max_steps:
                self._say_done(start)
                self.stop.uninstall()  # a Ctrl-C in the task's final outputs is an ordinary Ctrl-C
                return task.finish(self.engine, topo, start.step, None, trained=False)
            self.metrics = self._open_metrics(start)
            teardown.callback(self.metrics.close)
            self._banner(start)
            self.gc = GcSchedule(config.train.gc_every)
            self.gc.start()
            teardown.callback(self.gc.stop)
            step, stopped, last_eval = self.loop(start.step)
            self.finalize(step, blocking=True)
            if stopped is not None:
                code = INTERRUPTED_EXIT_CODE if stopped == "SIGINT" else config.train.requeue_exit_code
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
            OmegaConf.save(OmegaConf.create(self.config.to_dict()), self.run_dir / "config.yaml")
        metrics = Metrics(self.config, self.run_dir, start.step, enabled=rank0)
        for event in start.events:
            metrics.log({"step": start.step, **event}, console=False)
        self.task.begin(self.run_dir, start.step)
        return metrics

    def loop(self, step: int) -> tuple[int, str | None, dict[str, float] | None]:
        """Train from ``step`` to ``train.max_steps`` or an agreed stop signal; returns
        (the last step, the stop signal or None, the last evaluation)."""
        config, task, policy, watchdog = self.config, self.task, self.policy, self.watchdog
        max_steps = config.train.max_steps
        eval_every, save_every = task.cadence(config)
        last_eval, stopped = None, None
        tick = time.perf_counter()
        while step < max_steps:
            self.gc.before_step(step)  # on the step's clock
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
                self.save(step, asynchronous=config.train.async_save and not last)
            if (eval_every > 0 and step % eval_every == 0) or last:
                last_eval = self.evaluate(step)
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

    def evaluate(self, step: int) -> dict[str, float] | None:
        """The task's evaluation, announced (what it covers) and timed on the console; ``loss.png`` redrawn."""
        self.metrics.say(f"step {step}: evaluating {self.task.eval_description()}...")
        start = time.perf_counter()
        with self.watchdog.watch("evaluation", step):
            result = self.task.evaluate(self.engine, self.topo, self.watchdog.beat)
        if result:
            self.metrics.log({"step": step, **result, "val_time_s": time.perf_counter() - start}, console=True)
            self.metrics.plot()
        return result

    def _banner(self, start: Start) -> None:
        """What is about to run, in one line (rank 0): model, layout, batch, steps, run dir, data."""
        config, task = self.config, self.task
        params = total_params(Shape.from_config(config.model, task.vocab_size))
        batch = config.train.global_batch
        per_step = f"{batch * task.seq_len} tokens per step" if task.seq_len else f"{batch} examples per step"
        self.metrics.say(
            f"{task.command}: model {config.model.name} ({params / 1e6:.2f} M parameters); {describe_layout(config)}; "
            f"{per_step}; steps {start.step} -> {config.train.max_steps}; run dir {self.run_dir}; {task.describe()}"
        )

    def train_step(self, step: int, tick: float) -> int:
        """One optimizer step (or a skipped one) and its ``metrics.jsonl`` line; returns the new step."""
        self.policy.step = step + 1
        with self.watchdog.watch("train step (data, forward/backward, gradient reduction, optimizer)", step + 1):
            result = self.engine.train_step(self.stragglers.data(self.task.next_batches), accept=self.policy.accept)
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
        if step == self.first_step:  # the time to the first step: imports, config, model, data, checkpoint load
            record["startup_s"] = time.time() - process_start()
        self.metrics.log(record, console=result.skipped)
        with self.watchdog.watch("straggler check (all-gather of the ranks' compute times)", step):
            named = self.stragglers.step_done(step)
        for event in named:
            self.metrics.log(event)
            self.metrics.say(describe_straggler(event))
        if self.ckpts.pending:
            self.finalize(step, blocking=False)
        return step

    def save(self, step: int, asynchronous: bool) -> None:
        config, topo, task = self.config, self.topo, self.task
        state = TrainState(
            step=step,
            config=config.to_dict(),
            vocab_size=task.vocab_size,
            engine=config.parallel.engine,
            layout={"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "vpp": topo.vpp, "ep": topo.ep},
            distributed_optimizer=config.distributed_optimizer,
            data=task.state_dict(),
            skip_policy=self.policy.state_dict(),
            **task.checkpoint_extras(),
        )
        began = time.perf_counter()
        with self.watchdog.watch("checkpoint save", step):
            path = self.ckpts.save(step, self.engine, state, task.files, async_save=asynchronous)
        stall = time.perf_counter() - began  # the loop's wait: all of a save, or an async save's staging
        if asynchronous:
            self._stalls[step] = stall
        else:
            self.metrics.log({"step": step, "checkpoint": str(path), "save_stall_s": stall}, console=False)

    def finalize(self, step: int, blocking: bool) -> None:
        """Commit the async saves that are done; each ``checkpoint`` record carries the seconds the
        loop waited for it (its staging and the commits since the previous record)."""
        began = time.perf_counter()
        with self.watchdog.watch("async checkpoint commit", step):
            committed = self.ckpts.finalize(blocking=blocking)
        self._waited += time.perf_counter() - began
        for path in committed:
            saved = int(path.name[len(PREFIX) :])
            stall, self._waited = self._stalls.pop(saved, 0.0) + self._waited, 0.0
            self.metrics.log({"step": saved, "checkpoint": str(path), "save_stall_s": stall}, console=False)
