"""In-loop evaluation: lm-eval tasks on the weights being trained, inside ``gpt-pretrain``.

``eval.every_steps=N eval.tasks=[...]`` runs gpt-eval's bundled tasks (``sentiment``, ``perplexity``,
filled in by ``pretrain/evaluate.py`` from the same ``eval.*`` keys) or local lm-eval task YAMLs at
every N-th step and at the last, on the current weights at any layout and with either engine: no
checkpoint conversion, no extra process. Results are ``eval/<task>/<metric>`` fields of one
``metrics.jsonl`` line, with ``eval_time_s`` and ``eval_failures``.

Why it is built this way:

- **lm-eval runs on rank 0 only.** Its evaluator (task loading, few-shot sampling, metrics) is
  single-process code and its results are needed once; rank 0 writes the metrics anyway.
- **Scoring runs on every rank in lockstep.** tp splits every layer, pp splits the layers and
  ZeRO-3 gathers parameters with collectives, so one rank cannot run the model alone. Rank 0's LM
  (:class:`~pretrain.eval.lm_eval_model.InLoopLM`: gpt-eval's request handling, so the same windows and
  truncation) hands each batch of token rows to :class:`RowScorer`, which broadcasts it to the world
  group (``broadcast_object_list``); every rank builds the same micro-batches and calls
  ``engine.eval_step`` — the engine's own forward-only path (megatron's forward-only pipeline
  schedule over its chunks, or the DeepSpeed module), the one validation uses. Non-zero ranks loop
  on "next batch or done".
- **Per-sequence sums come from the training loss.** ``eval_step`` reduces named scalars over a
  whole batch; a batch carrying a ``row_sums`` list gets each sequence's masked token-loss sum
  appended by ``lm_forward_step`` on the last pipeline stage (no engine change). The token loss is
  -log p of the target normalised over the padded vocabulary, exactly what gpt-eval computes from
  ``LoadedModel.log_probs``, so the numbers agree with gpt-eval on the saved checkpoint up to float
  rounding. ``is_greedy`` is reported False: the loss does not give the argmax, and the bundled
  tasks need only the sums; generation tasks are refused (one eval failure).
- **dp ranks share the work.** Row i of a batch goes to data-parallel rank i % dp; every dp rank
  runs the same number of equal-shaped micro-batches (padded with masked-out rows), a multiple of
  pp for the pipeline schedules and equal across dp for ZeRO-3's parameter gathers. The last
  stage's tp-rank-0 of each pipeline sends its sums to rank 0 (``gather_object``).
- **A failing evaluation never costs training.** An exception in lm-eval or a task (bad YAML,
  missing field, generation task) is one ``warning:`` line and counts in ``eval_failures``; each
  task runs on its own, so the others still report. A forward error on any rank is agreed through
  the same gather, so every rank stays in step. A rank that dies or hangs is the watchdog's, as in
  a train step. What is wrong in the config (a missing ``eval.*.path``, a missing YAML, an
  unreadable bundled task file) is refused before training (``EvalConfig.check``, :meth:`from_config`).
- **Training does not see it.** lm-eval seeds python/numpy/torch; their states are restored
  afterwards. The trainer's step clock restarts after evaluation, so ``tokens_per_s`` excludes it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from conf.groups import EvalConfig, fewshot_counts
from parallel.engine import Engine
from parallel.run_config import Groups, replaced
from parallel.topology import Topology
from pretrain.eval.samples import sample_documents

Row = tuple[list[int], int]  # (tokens of one window, how many of its last tokens are scored)


class RowScorer:
    """Summed log-likelihoods of token rows through the engine, computed by every rank together."""

    def __init__(self, engine: Engine, topo: Topology, seq_len: int, micro_rows: int, beat: Callable[[], None]):
        from megatron.core import parallel_state

        self.engine, self.topo, self.micro_rows, self.beat = engine, topo, max(1, micro_rows), beat
        # one copy of the sums per pipeline: its last stage's first tp rank
        self.reports = parallel_state.get_tensor_model_parallel_rank() == 0
        self.quantum = topo.tp if topo.sequence_parallel else 1  # sequence parallelism splits the sequence over tp
        # the longest window: the model's context (gpt-eval's), a multiple of tp under sequence parallelism
        self.max_length = max(self.quantum, seq_len // self.quantum * self.quantum)

    def _broadcast(self, rows: list[Row] | None) -> list[Row] | None:
        if self.topo.world_size == 1:
            return rows
        box = [rows]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def score(self, rows: list[Row]) -> list[float]:
        """Rank 0: each row's summed log-probability of its scored tokens."""
        self._broadcast(rows)
        return self._round(rows)

    def serve(self) -> None:
        """Other ranks: run rank 0's batches until it says done."""
        while (rows := self._broadcast(None)) is not None:
            self._round(rows)

    def done(self) -> None:
        self._broadcast(None)

    def _width(self, longest: int) -> int:
        """Inputs are padded on the right (causal: no effect on the scores) to a power of two, a
        multiple of the quantum, at most the window: few shapes (compiled models, pipeline messages)."""
        width = 1 << max(3, (longest - 1).bit_length())
        width = -(-width // self.quantum) * self.quantum
        return max(longest, min(width, self.max_length))

    def _round(self, rows: list[Row]) -> list[float]:
        topo = self.topo
        share = -(-len(rows) // topo.dp)  # rows per dp rank (the last ones may get fewer)
        count = topo.pp * -(-share // (topo.pp * self.micro_rows))  # micro-batches: a multiple of pp
        per_micro = max(1, -(-share // count))
        width = self._width(max(len(row) for row, _ in rows) - 1)
        mine = list(range(topo.dp_rank, len(rows), topo.dp))
        batches = []
        for m in range(count):
            tokens = torch.zeros(per_micro, width + 1, dtype=torch.long)
            mask = torch.zeros(per_micro, width)
            for j, i in enumerate(mine[m * per_micro : (m + 1) * per_micro]):
                row, scored = rows[i]
                tokens[j, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[j, len(row) - 1 - scored : len(row) - 1] = 1.0
            batches.append({"tokens": tokens, "mask": mask, "row_sums": []})
        error = None
        try:
            self.engine.eval_step(batches)
        except Exception as exc:  # noqa: BLE001 - agreed below, so that every rank stays in step
            error = f"rank {topo.rank}: {type(exc).__name__}: {exc}"
        sums = [s for batch in batches for s in batch["row_sums"]]
        report = None
        if sums and self.reports and error is None:
            report = dict(zip(mine, torch.cat(sums).tolist(), strict=False))  # padding rows are dropped
        gathered = [(error, report)]
        if topo.world_size > 1:
            gathered = [None] * topo.world_size if topo.rank == 0 else None
            dist.gather_object((error, report), gathered, dst=0)
        self.beat()
        if topo.rank != 0:
            return []
        problems = [e for e, _ in gathered if e]
        if problems:
            raise RuntimeError(f"scoring failed on {problems[0]}")
        losses = {i: s for _, r in gathered if r for i, s in r.items()}
        return [-losses[i] for i in range(len(rows))]  # summed token loss = minus the log-likelihood


def metric_record(results: dict[str, dict[str, Any]], shots: int | None = None) -> dict[str, float | None]:
    """lm-eval's ``results[task]["acc,none"]`` as ``{"eval/task/acc": value}`` (a filter other than
    ``none`` is kept as a suffix; standard errors, counts and aliases are left out); with ``shots``
    (several k evaluated) ``eval/task/<k>shot/acc``."""
    record: dict[str, float | None] = {}
    for task, metrics in results.items():
        for name, value in metrics.items():
            metric, _, filtering = str(name).partition(",")
            if "stderr" in metric or not isinstance(value, float):  # as gpt-eval's report (not sample_len)
                continue
            scope = f"eval/{task}/" if shots is None else f"eval/{task}/{shots}shot/"
            key = scope + metric + (f"_{filtering}" if filtering and filtering != "none" else "")
            record[key] = float(value) if math.isfinite(value) else None
    return record


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore python's, numpy's and torch's global random states afterwards (lm-eval seeds them)."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's and datasets' info lines are not the training log's: errors only, while evaluating."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    import datasets
    import lm_eval.api.task
    from tqdm import tqdm

    datasets.disable_progress_bars()
    bar = getattr(lm_eval.api.task, "tqdm", None)  # its per-task "building requests" bar has no switch
    if bar is not None:
        lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if bar is not None:
            lm_eval.api.task.tqdm = bar


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def resolved_eval(ev: EvalConfig | None) -> EvalConfig | None:
    """``eval`` with its task files' paths resolved: config.yaml and checkpoints work from any cwd."""
    if ev is None or not ev.every_steps:
        return ev
    from pretrain.evaluate import BUILDERS

    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path else path

    groups = {
        "sentiment": replaced(
            ev.sentiment, path=absolute(ev.sentiment.path), fewshot_path=absolute(ev.sentiment.fewshot_path)
        ),
        "perplexity": replaced(ev.perplexity, path=absolute(ev.perplexity.path)),
    }
    tasks = [t if t in BUILDERS else absolute(t) for t in ev.tasks]
    return replaced(ev, tasks=tasks, **groups)


class InLoopEval:
    """The configured tasks, their filled-in files and the evaluation at a step (all ranks)."""

    def __init__(
        self, cfg: Groups, tokenizer_dir: Path, task_dir: tempfile.TemporaryDirectory | None, counts: dict[str, int]
    ):
        ev = cfg.eval
        self.every = int(ev.every_steps)
        self.tasks = [str(t) for t in ev.tasks]
        self.shots = fewshot_counts(ev.num_fewshot, "eval.num_fewshot")
        self.batch_size, self.limit = int(ev.batch_size), ev.limit
        self.seed = int(ev.seed)
        # eval.limit: N documents drawn (seeded) across a bundled task's split, as gpt-eval's limit=N
        self.samples = {task: sample_documents(count, self.limit, self.seed) for task, count in counts.items()}
        self.seq_len = int(cfg.model.seq_len)
        self.micro_rows = int(cfg.train.eval_micro_batch)
        self.tokenizer_dir = tokenizer_dir
        self._task_dir = task_dir
        self._lm: Any = None

    @classmethod
    def from_config(cls, cfg: Groups, tokenizer_dir: Path) -> InLoopEval | None:
        """None when ``eval.every_steps`` is off (``cfg.eval``: :func:`resolved_eval`'s). Every rank fills
        in the bundled task files here (and so refuses the same bad file in one line, before any
        process group); rank 0 keeps them."""
        ev = cfg.eval
        if ev is None or not ev.every_steps:
            return None
        from pretrain.evaluate import BUILDERS

        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only (read at datasets' import)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        task_dir = tempfile.TemporaryDirectory(prefix="gpt-in-loop-eval-")
        counts = {task: BUILDERS[task](cfg, Path(task_dir.name)) for task in ev.tasks if task in BUILDERS}
        if int(os.environ.get("RANK", 0)) != 0:
            task_dir.cleanup()
            task_dir = None
        return cls(cfg, tokenizer_dir, task_dir, counts)

    def due(self, step: int, last: bool) -> bool:
        return self.every > 0 and (step % self.every == 0 or last)

    def run(self, engine: Engine, topo: Topology, step: int, beat: Callable[[], None]) -> dict[str, Any]:
        """Evaluate every task on the current weights; rank 0 returns the ``metrics.jsonl`` fields,
        the other ranks ``{}`` (they only score)."""
        scorer = RowScorer(engine, topo, self.seq_len, self.micro_rows, beat)
        if topo.rank != 0:
            scorer.serve()
            return {}
        start = time.perf_counter()
        record: dict[str, Any] = {}
        failed: list[str] = []
        pending = list(self.tasks)

        def warn(what: str, exc: Exception) -> None:
            print(
                f"warning: in-loop evaluation of {what} failed at step {step} ({_one_line(exc)}); training goes on",
                file=sys.stderr,
                flush=True,
            )

        try:
            with preserved_rng(), quiet_lm_eval():
                while pending:
                    task = pending.pop(0)
                    try:
                        record.update(self._evaluate(task, scorer))
                    except Exception as exc:  # noqa: BLE001 - an evaluation never stops training
                        failed.append(task)
                        warn(task, exc)
        except Exception as exc:  # noqa: BLE001 - lm-eval itself could not be set up (or torn down)
            failed += pending
            warn(", ".join(pending) or "the tasks", exc)
        finally:
            scorer.done()
        return {**record, "eval_time_s": time.perf_counter() - start, "eval_failures": len(failed)}

    def _evaluate(self, task: str, scorer: RowScorer) -> dict[str, float | None]:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        from data.tokenizer import load_tokenizer
        from pretrain.eval.lm_eval_model import InLoopLM

        if self._lm is None:
            self._manager = TaskManager(include_path=self._task_dir.name, include_defaults=False)
            tokenizer = load_tokenizer(self.tokenizer_dir)
            self._lm = InLoopLM(tokenizer, scorer.max_length, self.batch_size, scorer.score)
        self._lm.score_rows = scorer.score  # this evaluation's engine and watchdog
        record: dict[str, float | None] = {}
        for k in self.shots:
            out = simple_evaluate(
                model=self._lm,
                tasks=[task],
                num_fewshot=k,
                task_manager=self._manager,
                # a bundled task: its seeded sample (or all); a task file of the user's: lm-eval's first N
                limit=None if task in self.samples else self.limit,
                samples={task: self.samples[task]} if self.samples.get(task) is not None else None,
                log_samples=False,
                random_seed=self.seed,
                fewshot_random_seed=self.seed,
                bootstrap_iters=0,
            )
            if not out or not out.get("results"):
                raise RuntimeError(f"lm-eval returned no results ({k}-shot)")
            record.update(metric_record(out["results"], k if len(self.shots) > 1 else None))
        return record

    def close(self) -> None:
        if self._task_dir is not None:
            self._task_dir.cleanup()
            self._task_dir = None
