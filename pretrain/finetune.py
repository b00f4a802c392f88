"""``gpt-finetune``: GPT-1 supervised fine-tuning (L3 = L2 + λ·L1) from a pretraining checkpoint.

The pretrained checkpoint may come from any layout of either engine: DeepSpeed steps are read
through their converted megatron view, and megatron-core's ``dist_checkpointing`` reshards the
weights into this run's (tp, pp, dp). The run then trains like pretraining does: the megatron
engine (pipeline schedule, DDP / distributed optimizer), checkpoints in ``run.dir/checkpoints``
(resumed automatically), ``metrics.jsonl`` with ``val_acc``, and ``results.json`` at the end.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from conf.cli import exit_on_user_error, quiet_third_party, set_rank_threads
from conf.errors import UserError
from data.output_dir import RUN_DIR_NAMES, check_run_dir
from data.tasks import TASK_TYPES, SpecialTokens, batch_arrays, encode_examples, label_vocabulary, read_jsonl
from data.tokenizer import TOKENIZER_FILE, load_tokenizer
from parallel import process_hygiene
from parallel.checkpoint import CheckpointDir, read_common
from parallel.deepspeed_convert import model_checkpoint
from parallel.topology import Topology
from pretrain.finetune_data import TaskBatches, eval_micro_batches, write_results
from pretrain.metrics import Metrics

HEAD_PARAMS = "*finetune_head.*"  # the task head's parameter names (under megatron's DDP wrapper)


def load_task(cfg: DictConfig, tokenizer: Any, special: SpecialTokens, seq_len: int) -> dict[str, Any]:
    """Encoded train / validation / test examples, the label vocabulary and the sequence length."""
    task_type = str(cfg.task.type)
    if task_type not in TASK_TYPES:
        raise UserError(f"task.type={task_type}: expected one of {', '.join(TASK_TYPES)}")
    max_len = min(int(cfg.task.max_len or seq_len), seq_len)
    rows = read_jsonl(cfg.task.train, task_type)
    limit = cfg.task.max_train_examples
    if limit is not None:
        if int(limit) < 1:
            raise UserError(f"task.max_train_examples={limit}: must be >= 1")
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


def engine_config(cfg: DictConfig, pretrained: dict[str, Any], max_steps: int) -> DictConfig:
    """The config the megatron engine reads: the pretrained model's shape, this run's training keys."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    train.update(
        max_steps=max_steps,
        warmup_steps=int(round(float(cfg.train.warmup_fraction) * max_steps)),
        lr_decay_steps=max_steps,
    )
    head_mult = float(cfg.finetune.get("head_lr_mult", 1.0))
    if head_mult <= 0:
        raise UserError(f"finetune.head_lr_mult={head_mult}: must be > 0")
    if head_mult != 1.0:
        train["lr_mult"] = {**(train.get("lr_mult") or {}), HEAD_PARAMS: head_mult}  # keeps the user's
    return OmegaConf.create(
        {
            "model": pretrained["config"]["model"],
            "train": train,
            "parallel": OmegaConf.to_container(cfg.parallel, resolve=True),
            "logging": OmegaConf.to_container(cfg.logging, resolve=True),
            "run": {"dir": str(cfg.run.dir)},
        }
    )


def load_pretrained(
    engine: Any, init_dir: Path, pretrained: dict[str, Any], special: SpecialTokens, eot_id: int, seed: int
) -> None:
    """The pretrained GPT weights into every chunk (resharded), the added tokens initialised."""
    from megatron.core import dist_checkpointing

    from parallel import cpu_compat
    from parallel.megatron_engine import _unwrap
    from pretrain.finetune_model import init_added_tokens

    std = float(pretrained["config"]["model"]["init_std"])
    for chunk in engine.model:
        gpt = _unwrap(chunk).module
        with cpu_compat.tensors_pass_as_cuda():
            loaded = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, str(init_dir))
        gpt.load_state_dict(loaded["model"])
        init_added_tokens(gpt, [special.start, special.delim, special.extract], eot_id, seed, std)
    engine.optimizer.reload_model_params()  # fp32 main copies (bf16, distributed optimizer) follow


def evaluate(engine: Any, arrays: dict[str, np.ndarray], micro: int, topo: Topology) -> dict[str, float]:
    totals: dict[str, float] = {}
    for group in eval_micro_batches(arrays, micro, topo.dp_rank, topo.dp, topo.pp):
        for name, value in engine.eval_totals(group).items():
            totals[name] = totals.get(name, 0.0) + value
    examples = max(totals.get("examples", 0.0), 1.0)
    lm = totals.get("lm_sum", 0.0) / max(totals.get("lm_tokens", 0.0), 1.0)
    return {"acc": totals.get("correct", 0.0) / examples, "loss": totals.get("cls_sum", 0.0) / examples, "lm": lm}


def finetune(cfg: DictConfig) -> dict[str, Any]:
    from parallel.megatron_engine import MegatronEngine
    from pretrain.finetune_model import FinetuneGPT, make_forward_step, task_batch_shape

    if str(cfg.parallel.engine) != "megatron":
        raise UserError(f"parallel.engine={cfg.parallel.engine}: gpt-finetune runs on the megatron engine")
    init_dir = model_checkpoint(cfg.init.checkpoint)
    pretrained = read_common(init_dir)
    tokenizer_dir = init_dir if (init_dir / TOKENIZER_FILE).is_file() else Path(pretrained["config"]["data"]["dir"])
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = int(pretrained["vocab_size"])
    special = SpecialTokens.after(vocab)
    task = load_task(cfg, tokenizer, special, int(pretrained["config"]["model"]["seq_len"]))
    train_arrays = batch_arrays(task["examples"]["train"], task["length"], pad_id=0)
    global_batch = int(cfg.train.global_batch)
    steps_per_epoch = len(task["examples"]["train"]) // global_batch
    if steps_per_epoch == 0:
        raise UserError(
            f"task.train has {len(task['examples']['train'])} examples, fewer than train.global_batch={global_batch}"
        )
    max_steps = int(cfg.train.max_steps or steps_per_epoch * int(cfg.finetune.epochs))
    ecfg = engine_config(cfg, pretrained, max_steps)
    topo = Topology.from_config(ecfg)
    run_dir = Path(cfg.run.dir)
    check_run_dir(run_dir, (*RUN_DIR_NAMES, "metrics.tmp"), command="gpt-finetune")
    ckpts = CheckpointDir(run_dir, int(cfg.train.keep_last))
    topo.init(int(cfg.train.seed), float(cfg.parallel.timeout_s))
    ckpts.remove_stale()
    latest, _ = ckpts.select()  # the newest intact step (a corrupt newer one is named and skipped)
    rank0 = topo.rank == 0
    task_type, weight = str(cfg.task.type), float(cfg.finetune.aux_lm_weight)
    seed = int(cfg.train.seed)

    def wrap(gpt: torch.nn.Module) -> torch.nn.Module:
        return FinetuneGPT(gpt, task_type, len(task["labels"]), float(cfg.finetune.classifier_dropout), seed)

    saved = read_common(latest) if latest is not None else None
    distributed = saved["distributed_optimizer"] if saved else topo.dp > 1
    step_fn = make_forward_step(weight, special.start)
    engine = MegatronEngine(ecfg, topo, vocab + 3, distributed, wrap, step_fn, task_batch_shape)
    batches = TaskBatches(train_arrays, global_batch, int(cfg.train.micro_batch), topo.dp_rank, topo.dp, seed)
    step = 0
    if latest is not None:
        common = ckpts.load(latest, engine, restore_rng=True)
        step = int(common["step"])
        batches.load_state_dict(common["data"])
        if rank0:
            print(f"resumed from {latest} at step {step}", flush=True)
    elif not bool(cfg.finetune.from_scratch):
        load_pretrained(engine, init_dir, pretrained, special, tokenizer.eot_id, seed)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    metrics = Metrics(ecfg, run_dir, step, enabled=rank0)
    eval_every = int(cfg.train.eval_every) or steps_per_epoch
    save_every = int(cfg.train.save_every) or steps_per_epoch
    val_arrays = batch_arrays(task["examples"]["validation"], task["length"], pad_id=0)
    micro_eval = int(cfg.train.eval_micro_batch)
    val = None
    tick = time.perf_counter()
    while step < max_steps:
        result = engine.train_step(batches.next_step())
        step += 1
        totals = result.totals
        if not math.isfinite(result.loss):
            raise RuntimeError(f"step {step}: loss is {result.loss}; lower train.lr")
        record = {"step": step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm}
        record["cls_loss"] = totals["cls_sum"] / max(totals["examples"], 1.0)
        record["lm_loss"] = totals["lm_sum"] / max(totals["lm_tokens"], 1.0)
        record["train_acc"] = totals["correct"] / max(totals["examples"], 1.0)
        record["examples_per_s"] = global_batch / (time.perf_counter() - tick)
        record["epoch"] = batches.epoch
        metrics.log(record)
        last = step == max_steps
        if (save_every > 0 and step % save_every == 0) or (last and save_every >= 0):  # before evaluation
            common = {"step": step, "data": batches.state_dict(), "config": OmegaConf.to_container(ecfg)}
            common.update(distributed_optimizer=engine.distributed_optimizer, vocab_size=vocab, engine="megatron")
            common.update(layout={"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "vpp": topo.vpp}, labels=task["labels"])
            ckpts.save(step, engine, common, files=(tokenizer_dir / TOKENIZER_FILE,))
        if step % eval_every == 0 or last:
            val = evaluate(engine, val_arrays, micro_eval, topo)
            metrics.log({"step": step, "val_loss": val["loss"], "val_acc": val["acc"], "val_lm_loss": val["lm"]}, True)
        tick = time.perf_counter()
    ckpts.finalize(blocking=True)  # waits for pruned steps to be deleted
    metrics.close()
    if val is None:  # resumed a finished run
        val = evaluate(engine, val_arrays, micro_eval, topo)
    results: dict[str, Any] = {"val_acc": val["acc"], "val_loss": val["loss"], "step": step}
    if "test" in task["examples"]:
        test = evaluate(engine, batch_arrays(task["examples"]["test"], task["length"], 0), micro_eval, topo)
        results.update(test_acc=test["acc"], test_loss=test["loss"])
    if rank0:
        write_results(run_dir, cfg, results, task, init_dir)
        test = f"  test_acc {results['test_acc']:.4f}" if "test_acc" in results else ""
        print(f"val_acc {results['val_acc']:.4f}{test}", flush=True)
    return results


@hydra.main(version_base=None, config_path="../conf", config_name="finetune")
def _hydra_main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        finetune(cfg)
    Topology.destroy()


def main() -> None:
    set_rank_threads()
    process_hygiene.install()  # helper processes (writers, loader workers, megatron's Manager) die with this one
    quiet_third_party()
    _hydra_main()


if __name__ == "__main__":
    sys.exit(main())
