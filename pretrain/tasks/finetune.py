"""Fine-tuning (GPT-1): L3 = L2 + λ·L1 over labeled examples, from a checkpoint of any layout.

The model is the pretrained GPT (resharded into this run's layout by megatron-core's
``dist_checkpointing``; DeepSpeed runs through their converted megatron view) with three
added tokens and a linear head on the extract token (``pretrain/finetune_model.py``). The
pretrained weights are loaded inside the model builder, before either engine wraps the
model, so both engines start from them with a fresh optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from conf.errors import UserError
from data.tasks import TASK_TYPES, SpecialTokens, batch_arrays, encode_examples, label_vocabulary, read_jsonl
from data.tokenizer import TOKENIZER_FILE, load_tokenizer
from parallel.engine import Engine, ModelSpec, StepResult
from parallel.topology import Topology
from parallel.train_state import TrainState
from pretrain.deepspeed_convert import model_checkpoint
from pretrain.finetune_data import TaskBatches, eval_micro_batches, write_results
from pretrain.tasks.lm import lm_model_spec

HEAD_PARAMS = "*finetune_head.*"  # the task head's parameter names (under megatron's DDP wrapper)
ADDED_TOKENS = 3  # start, delimiter, extract (ids right after the tokenizer's)


def load_examples(cfg: DictConfig, tokenizer: Any, special: SpecialTokens, seq_len: int) -> dict[str, Any]:
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


def load_pretrained(gpt: torch.nn.Module, init_dir: Path, special: SpecialTokens, eot_id: int, seed: int, std: float):  # noqa: ANN201
    """The pretrained GPT weights into this chunk (resharded), the added tokens initialised."""
    from megatron.core import dist_checkpointing

    from pretrain.finetune_model import init_added_tokens

    loaded = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, str(init_dir))
    gpt.load_state_dict(loaded["model"])
    init_added_tokens(gpt, [special.start, special.delim, special.extract], eot_id, seed, std)


class FinetuneTask:
    """GPT-1's supervised fine-tuning on ``task.train``, evaluated (accuracy) on ``task.validation``."""

    command = "gpt-finetune"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
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

    def configure(self, cfg: DictConfig) -> None:
        """The pretrained model's shape; max_steps from the epochs; warmup from its fraction;
        the head's lr multiplier merged into the user's ``train.lr_mult``."""
        cfg.model = OmegaConf.create(self.pretrained.model)
        train = cfg.train
        max_steps = int(train.max_steps or self.steps_per_epoch * int(cfg.finetune.epochs))
        train.max_steps = max_steps
        train.lr_decay_steps = max_steps
        head_mult = float(cfg.finetune.head_lr_mult)  # > 0: conf/groups.py
        if head_mult != 1.0 and cfg.parallel.engine != "megatron":
            raise UserError(
                f"finetune.head_lr_mult={head_mult:g}: per-parameter learning rates need parallel.engine=megatron"
            )
        if head_mult != 1.0:
            train.lr_mult = {**(train.get("lr_mult") or {}), HEAD_PARAMS: head_mult}  # keeps the user's

    def check_resume(self, cfg: DictConfig, state: TrainState, step_dir: Path) -> bool:
        return True

    def model_spec(self, cfg: DictConfig, resuming: bool) -> ModelSpec:
        from pretrain.finetune_model import FinetuneGPT, make_forward_step, task_batch_shape

        seed = int(cfg.train.seed)
        base = lm_model_spec(cfg.model, self.vocab_size + ADDED_TOKENS, seed)
        from_pretrained = not resuming and not bool(cfg.finetune.from_scratch)
        std = float(cfg.model.init_std)

        def build(config: Any, vp_stage: int | None) -> torch.nn.Module:
            gpt = base.build(config, vp_stage)
            if from_pretrained:
                load_pretrained(gpt, self.init_dir, self.special, self.tokenizer.eot_id, seed, std)
            labels = len(self.data["labels"])
            return FinetuneGPT(gpt, str(cfg.task.type), labels, float(cfg.finetune.classifier_dropout), seed)

        step = make_forward_step(float(cfg.finetune.aux_lm_weight), self.special.start)
        return ModelSpec(base.config, build, step, task_batch_shape)

    def start(self, cfg: DictConfig, topo: Topology) -> None:
        self.topo = topo
        train = cfg.train
        self.batches = TaskBatches(
            self.train_arrays, int(train.global_batch), int(train.micro_batch), topo.dp_rank, topo.dp, int(train.seed)
        )

    def begin(self, run_dir: Path, step: int) -> None:
        pass

    def next_batches(self) -> list[dict[str, torch.Tensor]]:
        return self.batches.next_step()

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"task": {"labels": self.data["labels"], "added_tokens": ADDED_TOKENS}}

    def step_record(self, result: StepResult, step_time: float, step: int) -> dict[str, Any]:
        totals = result.totals
        examples = max(totals.get("examples", 0.0), 1.0)
        return {
            "cls_loss": totals.get("cls_sum", 0.0) / examples,
            "lm_loss": totals.get("lm_sum", 0.0) / max(totals.get("lm_tokens", 0.0), 1.0),
            "train_acc": totals.get("correct", 0.0) / examples,
            "examples_per_s": int(self.cfg.train.global_batch) / step_time,
            "epoch": self.batches.epoch,
        }

    def cadence(self, cfg: DictConfig) -> tuple[int, int]:
        """0 = at the end of every epoch (GPT-1 evaluates per epoch)."""
        return int(cfg.train.eval_every) or self.steps_per_epoch, int(cfg.train.save_every) or self.steps_per_epoch

    def accuracy(self, engine: Engine, split: str, beat: Callable[[], None] = lambda: None) -> dict[str, float]:
        """Accuracy, head loss and LM loss of ``split`` on the current weights."""
        arrays = batch_arrays(self.data["examples"][split], self.data["length"], pad_id=0)
        micro, topo = int(self.cfg.train.eval_micro_batch), self.topo
        totals: dict[str, float] = {}
        for group in eval_micro_batches(arrays, micro, topo.dp_rank, topo.dp, topo.pp):
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
