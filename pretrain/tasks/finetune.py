"""Fine-tuning (GPT-1): L3 = L2 + λ·L1 over labeled examples, from a checkpoint of any layout.

The model is the pretrained GPT (resharded into this run's layout by megatron-core's
``dist_checkpointing``; DeepSpeed runs through their converted megatron view) with three
added tokens and a linear head on the extract token (``pretrain/tasks/finetune_head.py``). The
pretrained weights are loaded inside the model builder, before either engine wraps the
model, so both engines start from them with a fresh optimizer; ``finetune.transfer_layers``
loads only the embeddings and the lowest blocks there. ``finetune.head_only_epochs`` (LP-FT)
is :class:`HeadOnlyPhase`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from conf.errors import UserError
from conf.schema import typed_group
from data.tasks import TASK_TYPES, SpecialTokens, batch_arrays, encode_examples, label_vocabulary, read_jsonl
from data.tokenizer import TOKENIZER_FILE, load_tokenizer
from parallel.capabilities import capabilities
from parallel.engine import Engine, ModelSpec, StepResult
from parallel.run_config import Groups, Run, replaced
from parallel.topology import Topology
from parallel.train_state import TrainState
from pretrain.interop.deepspeed_convert import model_checkpoint
from pretrain.tasks.finetune_examples import TaskBatches, eval_micro_batches, write_results
from pretrain.tasks.lm import lm_model_spec

HEAD_PARAMS = "*finetune_head.*"  # the task head's parameter names (under megatron's DDP wrapper)
ADDED_TOKENS = 3  # start, delimiter, extract (ids right after the tokenizer's)


def load_examples(cfg: Groups, tokenizer: Any, special: SpecialTokens, seq_len: int) -> dict[str, Any]:
    """Encoded train / validation / test examples, the label vocabulary and the sequence length."""
    task_type = str(cfg.task.type)
    if task_type not in TASK_TYPES:
        raise UserError(f"task.type={task_type}: expected one of {', '.join(TASK_TYPES)}")
    max_len = min(int(cfg.task.max_len or seq_len), seq_len)
    rows = read_jsonl(cfg.task.train, task_type)
    limit = cfg.task.max_train_examples
    if limit is not None:  # >= 1: conf/groups.py
        keep = np.random.default_rng(int(cfg.train.seed)).permutation(len(rows))[: int(limit)]
        rows = [rows[i] for i in sorted(keep)]
    labels = label_vocabulary(rows, task_type)
    splits = {"train": (cfg.task.train, rows), "validation": (cfg.task.validation, None), "test": (cfg.task.test, None)}
    encoded = {}
    for split, (path, split_rows) in splits.items():
        if path is None:
            continue
        split_rows = split_rows if split_rows is not None else read_jsonl(path, task_type)
        encoded[split] = encode_examples(split_rows, task_type, labels, tokenizer, special, max_len, str(path))
    longest = max(len(s) for examples in encoded.values() for e in examples for s in e.sequences)
    length = min(seq_len, int(math.ceil(longest / 8) * 8))
    return {"examples": encoded, "labels": labels, "length": length}


def top_prefixes(gpt: torch.nn.Module, transfer_layers: int | None) -> tuple[str, ...]:
    """State-dict prefixes of this chunk's parameters above block ``transfer_layers - 1``: the
    blocks of global index >= K (a pipeline stage numbers its layers from its offset), and with
    K < num_layers the final norm and an untied output layer, which sit on the top block's output."""
    if transfer_layers is None or transfer_layers >= gpt.config.num_layers:
        return ()
    top = [f"decoder.layers.{i}." for i, layer in enumerate(gpt.decoder.layers) if layer.layer_number > transfer_layers]
    if gpt.post_process:
        top.append("decoder.final_layernorm.")
        if not gpt.share_embeddings_and_output_weights:
            top.append("output_layer.")
    return tuple(top)


def load_pretrained(
    gpt: torch.nn.Module,
    init_dir: Path,
    special: SpecialTokens,
    eot_id: int,
    seed: int,
    std: float,
    transfer_layers: int | None = None,
) -> None:
    """The pretrained GPT weights into this chunk (resharded), the added tokens initialised.

    With ``transfer_layers`` = K the parameters above block K-1 (:func:`top_prefixes`) get back the
    weights the builder gave them, which are ``finetune.from_scratch=true``'s (the init is a
    function of (seed, global layer number): ``SeededTransformerLayer``). The whole checkpoint is
    still read: megatron stores the blocks as one tensor per weight with a layer axis."""
    from megatron.core import dist_checkpointing

    from pretrain.tasks.finetune_head import init_added_tokens

    top = top_prefixes(gpt, transfer_layers)
    fresh = {n: t.detach().clone() for n, t in gpt.state_dict().items() if n.startswith(top) and torch.is_tensor(t)}
    loaded = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, str(init_dir))
    gpt.load_state_dict(loaded["model"])
    if fresh:
        gpt.load_state_dict(fresh, strict=False)  # these keys only
    init_added_tokens(gpt, [special.start, special.delim, special.extract], eot_id, seed, std)


class HeadOnlyPhase:
    """LP-FT (Kumar et al. 2022): steps 1..``head_steps`` train the head only, the rest everything.

    Neither engine can freeze the body for a while: megatron's DDP buffers and DeepSpeed's ZeRO
    partitions hold what required grad when the engine was built. So the body stays in the
    optimizer and, in a head-only step, (1) its gradients are zero (``FinetuneGPT``'s hooks) and
    (2) torch's optimizer-step pre-hook, which fires for the inner optimizer of either engine
    (whole parameters or flat shards alike), sets every group's weight decay to 0 for that step.
    AdamW's moments of the body stay exactly 0 (a fresh optimizer that has seen only zero
    gradients), so its update is 0 and the body is bit-identical after the phase. The head trains
    without weight decay meanwhile: the groups mix head and body.

    At the first full step the optimizer state is dropped (LP-FT's two runs: full fine-tuning
    starts from the probed weights with a fresh AdamW; the body's step counter, which advanced on
    zero gradients, would otherwise skew Adam's bias correction). Each phase has the configured
    schedule (warmup fraction, decay) over its own steps, so the full phase is the fine-tuning of
    ``finetune.epochs`` a run without the head-only epochs does; the hook sets each group's lr from
    it (``metrics.jsonl``'s ``lr`` is this lr; the engine's own schedule is overridden).

    Everything is a function of the step, and of whether the reset happened (in the task state),
    so a run resumed in either phase continues exactly.
    """

    def __init__(self, head_steps: int, max_steps: int, train: Any, warmup_fraction: float | None):
        from parallel.engine import lr_scheduler

        self.head_steps = head_steps
        self.step = 0  # the step being run (1-based)
        self.reset_done = False
        self._reset_step: int | None = None
        self._handle: Any = None
        self.schedules: list[Any] = []  # megatron's OptimizerParamScheduler of each phase, read via get_lr
        for steps in (head_steps, max(max_steps - head_steps, 1)):
            warmup = int(round(warmup_fraction * steps)) if warmup_fraction is not None else int(train.warmup_steps)
            phase = SimpleNamespace(
                lr=train.lr,
                min_lr_ratio=train.min_lr_ratio,
                lr_schedule=train.lr_schedule,
                weight_decay=train.weight_decay,
                warmup_steps=warmup,
                max_steps=steps,
                lr_decay_steps=steps,
            )
            self.schedules.append(lr_scheduler(SimpleNamespace(param_groups=[]), phase))

    @property
    def head_only(self) -> bool:
        return self.step <= self.head_steps

    def lr(self, group: dict[str, Any]) -> float:
        """The lr of ``group`` (its own peak and final lr: ``finetune.head_lr_mult``) at this step."""
        schedule = self.schedules[0 if self.head_only else 1]
        schedule.num_steps = self.step - 1 - (0 if self.head_only else self.head_steps)
        return float(schedule.get_lr(group))

    def install(self, step: int) -> None:
        self.step = step
        if self._handle is None:
            from torch.optim.optimizer import register_optimizer_step_pre_hook

            self._handle = register_optimizer_step_pre_hook(self._before_step)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """This step's lr and weight decay; at the first full step, a fresh state (each optimizer of
        the step: megatron chains some, DeepSpeed steps one group at a time)."""
        head_only = self.head_only
        if not head_only and (not self.reset_done or self._reset_step == self.step):
            self.reset_done, self._reset_step = True, self.step
            for group in optimizer.param_groups:
                for param in group["params"]:
                    optimizer.state.pop(param, None)
        for group in optimizer.param_groups:
            group["lr"] = self.lr(group)
            if head_only:
                group["weight_decay"] = 0.0


class FinetuneTask:
    """GPT-1's supervised fine-tuning on ``task.train``, evaluated (accuracy) on ``task.validation``."""

    command = "gpt-finetune"
    seq_len = None  # the preflight uses the pretrained model's
    in_loop_eval = None

    def __init__(self, cfg: Groups):
        self.init_dir = model_checkpoint(cfg.init.checkpoint)
        self.pretrained = TrainState.read(self.init_dir)
        tokenizer_dir = self.init_dir
        if not (tokenizer_dir / TOKENIZER_FILE).is_file():
            tokenizer_dir = Path(self.pretrained.config["data"]["dir"])
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.files = (tokenizer_dir / TOKENIZER_FILE,)
        vocab = self.pretrained.vocab_size  # the tokenizer's; the model adds start, delimiter, extract
        self.special = SpecialTokens.after(vocab)
        self.vocab_size = vocab
        self.data = load_examples(cfg, self.tokenizer, self.special, int(self.pretrained.model["seq_len"]))
        self.train_arrays = batch_arrays(self.data["examples"]["train"], self.data["length"], pad_id=0)
        self.steps_per_epoch = len(self.data["examples"]["train"]) // int(cfg.train.global_batch)
        if self.steps_per_epoch == 0:
            raise UserError(
                f"task.train has {len(self.data['examples']['train'])} examples, "
                f"fewer than train.global_batch={cfg.train.global_batch}"
            )
        layers, transfer = int(self.pretrained.model["num_layers"]), cfg.finetune.transfer_layers
        if transfer is not None and int(transfer) > layers:
            raise UserError(
                f"finetune.transfer_layers={transfer}: the checkpoint has {layers} layers (expected 0 ... {layers})"
            )
        self.phase: HeadOnlyPhase | None = None

    def configure(self, cfg: Groups) -> dict[str, Any]:
        """The pretrained model's shape; max_steps from the epochs; the head's lr multiplier merged into
        the user's ``train.lr_mult`` (the run records them: config.yaml, the checkpoints)."""
        train = cfg.train
        head_steps = self.steps_per_epoch * cfg.finetune.head_only_epochs
        max_steps = train.max_steps or head_steps + self.steps_per_epoch * cfg.finetune.epochs
        changes: dict[str, Any] = {"max_steps": max_steps, "lr_decay_steps": max_steps}
        if head_steps:  # its own schedules, from warmup_fraction of each phase (not of the whole run)
            self.phase = HeadOnlyPhase(head_steps, max_steps, train, train.warmup_fraction)
        head_mult = cfg.finetune.head_lr_mult  # > 0: conf/groups.py
        if head_mult != 1.0 and not capabilities(cfg.parallel.engine).lr_mult:
            raise UserError(
                f"finetune.head_lr_mult={head_mult:g}: per-parameter learning rates need parallel.engine=megatron"
            )
        if head_mult != 1.0:
            changes["lr_mult"] = {**(train.lr_mult or {}), HEAD_PARAMS: head_mult}  # keeps the user's
        return {"model": typed_group("model", self.pretrained.model), "train": replaced(train, **changes)}

    def check_resume(self, cfg: Run, state: TrainState, step_dir: Path) -> bool:
        """Refuse another ``transfer_layers`` or ``head_only_epochs``: the checkpoint's weights were
        initialised, and its steps trained, under the saved ones."""
        saved = state.config.get("finetune", {})
        for key, default in (("transfer_layers", None), ("head_only_epochs", 0)):
            old, new = (("null" if v is None else v) for v in (saved.get(key, default), getattr(cfg.finetune, key)))
            if old != new:
                raise UserError(
                    f"finetune.{key}={new}, but run.dir={cfg.run.dir} holds a run with finetune.{key}={old} "
                    f"({step_dir.name}): pass that value, or use a new run.dir"
                )
        return True

    def model_spec(self, cfg: Run, resuming: bool) -> ModelSpec:
        from pretrain.tasks.finetune_head import FinetuneGPT, make_forward_step, task_batch_shape

        seed = int(cfg.train.seed)
        base = lm_model_spec(cfg.model, self.vocab_size + ADDED_TOKENS, seed)
        from_pretrained = not resuming and not bool(cfg.finetune.from_scratch)
        std = float(cfg.model.init_std)

        transfer = cfg.finetune.transfer_layers
        phase = self.phase
        frozen = None if phase is None else (lambda: phase.head_only)

        def build(config: Any, vp_stage: int | None) -> torch.nn.Module:
            gpt = base.build(config, vp_stage)
            if from_pretrained:
                load_pretrained(gpt, self.init_dir, self.special, self.tokenizer.eot_id, seed, std, transfer)
            labels = len(self.data["labels"])
            dropout = float(cfg.finetune.classifier_dropout)
            return FinetuneGPT(gpt, str(cfg.task.type), labels, dropout, seed, body_frozen=frozen)

        step = make_forward_step(float(cfg.finetune.aux_lm_weight), self.special.start)
        return ModelSpec(base.config, build, step, task_batch_shape)

    def start(self, cfg: Run, topo: Topology) -> None:
        self.cfg, self.topo = cfg, topo
        train = cfg.train
        self.quantum = math.lcm(8, topo.tp) if topo.sequence_parallel else 8  # widths sequence parallelism can split
        self.batches = TaskBatches(
            self.train_arrays,
            int(train.global_batch),
            int(train.micro_batch),
            topo.dp_rank,
            topo.dp,
            int(train.seed),
            self.quantum,
        )

    def describe(self) -> str:
        train = self.data["examples"]["train"]
        return (
            f"task.type={self.cfg.task.type}: {len(train)} training examples from {self.cfg.task.train}, "
            f"{self.steps_per_epoch} steps per epoch"
        )

    def eval_description(self) -> str:
        examples = self.data["examples"].get("validation") or []
        return f"accuracy over {len(examples)} validation examples (task.validation)"

    def begin(self, run_dir: Path, step: int) -> None:
        if self.phase is not None:
            self.phase.install(step)

    def next_batches(self) -> list[dict[str, torch.Tensor]]:
        if self.phase is not None:
            self.phase.step += 1
        return self.batches.next_step()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self.batches.state_dict()
        if self.phase is not None:
            state["optimizer_reset"] = self.phase.reset_done  # full fine-tuning's fresh AdamW happened
        return state

    def resume_events(self) -> list[dict[str, Any]]:
        return []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)
        if self.phase is not None:
            self.phase.reset_done = bool(state.get("optimizer_reset", False))

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"task": {"labels": self.data["labels"], "added_tokens": ADDED_TOKENS}}

    def step_record(self, result: StepResult, step_time: float, step: int) -> dict[str, Any]:
        totals = result.totals
        examples = max(totals.get("examples", 0.0), 1.0)
        record = {
            "cls_loss": totals.get("cls_sum", 0.0) / examples,
            "lm_loss": totals.get("lm_sum", 0.0) / max(totals.get("lm_tokens", 0.0), 1.0),
            "train_acc": totals.get("correct", 0.0) / examples,
            "examples_per_s": int(self.cfg.train.global_batch) / step_time,
            "epoch": self.batches.epoch,
        }
        if self.phase is not None:  # the phase's schedule at train.lr (the engine's was overridden)
            record.update(lr=self.phase.lr({}), phase="head" if self.phase.head_only else "full")
        return record

    def cadence(self, cfg: Run) -> tuple[int, int]:
        """0 = at the end of every epoch (GPT-1 evaluates per epoch)."""
        return int(cfg.train.eval_every) or self.steps_per_epoch, int(cfg.train.save_every) or self.steps_per_epoch

    def accuracy(self, engine: Engine, split: str, beat: Callable[[], None] = lambda: None) -> dict[str, float]:
        """Accuracy, head loss and LM loss of ``split`` on the current weights."""
        arrays = batch_arrays(self.data["examples"][split], self.data["length"], pad_id=0)
        micro, topo = int(self.cfg.train.eval_micro_batch), self.topo
        totals: dict[str, float] = {}
        for group in eval_micro_batches(arrays, micro, topo.dp_rank, topo.dp, topo.pp, self.quantum):
            for name, value in engine.eval_step(group).items():
                totals[name] = totals.get(name, 0.0) + value
            beat()
        examples = max(totals.get("examples", 0.0), 1.0)
        lm = totals.get("lm_sum", 0.0) / max(totals.get("lm_tokens", 0.0), 1.0)
        return {"acc": totals.get("correct", 0.0) / examples, "loss": totals.get("cls_sum", 0.0) / examples, "lm": lm}

    def evaluate(self, engine: Engine, topo: Topology, beat: Callable[[], None]) -> dict[str, float]:
        val = self.accuracy(engine, "validation", beat)
        return {"val_loss": val["loss"], "val_acc": val["acc"], "val_lm_loss": val["lm"]}

    def finish(
        self, engine: Engine, topo: Topology, step: int, last_eval: dict[str, float] | None, trained: bool
    ) -> dict:
        """``results.json`` (rank 0): validation (and test) accuracy of the final weights."""
        if self.phase is not None:
            self.phase.remove()
        if last_eval is None:  # resumed a finished run
            last_eval = self.evaluate(engine, topo, lambda: None)
        results: dict[str, Any] = {"val_acc": last_eval["val_acc"], "val_loss": last_eval["val_loss"], "step": step}
        if "test" in self.data["examples"]:
            test = self.accuracy(engine, "test")
            results.update(test_acc=test["acc"], test_loss=test["loss"])
        if topo.rank == 0:
            run_dir = Path(self.cfg.run.dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_results(run_dir, self.cfg, results, self.data, self.init_dir)
            test_line = f"  test_acc {results['test_acc']:.4f}" if "test_acc" in results else ""
            print(f"val_acc {results['val_acc']:.4f}{test_line}", flush=True)
        return results
