"""``gpt-pretrain``: next-token (L1) pretraining, single process or under torchrun / srun.

The loop only: build topology, data, engine; resume if ``run.dir`` has a checkpoint;
step, evaluate, checkpoint, log. Everything parallel lives behind the engine.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data.errors import UserError
from data.shards import Manifest, check_files, load_manifest
from data.stream import Layout, TrainLoader, eval_batches
from data.tokenizer import TOKENIZER_FILE, load_tokenizer
from parallel.checkpoint import PREFIX, CheckpointDir, checkpoint_engine, read_common
from parallel.topology import Topology
from parallel.watchdog import Watchdog
from pretrain.cli import check_group_choices, exit_on_user_error, quiet_third_party, set_rank_threads
from pretrain.flops import peak_flops
from pretrain.metrics import Metrics, truncate_after
from pretrain.model import flops_per_token
from pretrain.preemption import StopRequest, exit_for_requeue


def build_engine(cfg: DictConfig, topo: Topology, vocab_size: int, saved: dict | None):  # noqa: ANN201 - Engine
    if cfg.parallel.engine == "megatron":
        from parallel.megatron_engine import MegatronEngine

        return MegatronEngine(cfg, topo, vocab_size, use_distributed_optimizer(cfg, topo, saved))
    from parallel.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(cfg, topo, vocab_size, saved)


def evaluate(  # noqa: ANN001
    cfg: DictConfig, engine, manifest: Manifest, topo: Topology, beat: Callable[[], None] = lambda: None
) -> float | None:
    """Mean token loss over the validation split (all of it unless train.eval_batches).

    Micro-batches go to the engine in groups whose size is a multiple of pp (the
    interleaved pipeline schedule needs at least pp of them), padded with empty ones.
    """
    if "val" not in manifest.splits:
        return None
    micro = int(cfg.train.eval_micro_batch)
    batches = eval_batches(manifest, "val", micro, topo.dp_rank, topo.dp, limit=cfg.train.eval_batches)
    group = topo.pp * max(1, 16 // topo.pp)
    loss_sum = tokens = 0.0
    chunk: list = []
    for batch in itertools.chain(batches, [None]):
        if batch is not None:
            chunk.append(batch)
        if chunk and (len(chunk) == group or batch is None):
            while len(chunk) % topo.pp:
                chunk.append({"tokens": chunk[0]["tokens"], "mask": torch.zeros_like(chunk[0]["mask"])})
            s, n = engine.eval_step(chunk)
            loss_sum, tokens, chunk = loss_sum + s, tokens + n, []
            beat()
    return loss_sum / tokens


def use_distributed_optimizer(cfg: DictConfig, topo: Topology, saved: dict | None) -> bool:
    """Resolve ``parallel.distributed_optimizer`` (true / false / auto).

    ``auto`` is what the checkpoint being resumed used (its optimizer state only loads
    into the same kind of optimizer, at any tp/pp/dp), else dp > 1: the distributed
    optimizer shards Adam state over dp but costs ~40% of a step at dp = 1 on CPU.
    """
    value = str(cfg.parallel.distributed_optimizer).lower()
    previous = None if saved is None else saved.get("distributed_optimizer")
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


def check_resume(cfg: DictConfig, checkpoint: Path) -> dict:
    """Refuse to resume a checkpoint of another model shape or engine into this run; returns its common state."""
    common = read_common(checkpoint)
    engine = checkpoint_engine(common)
    if engine != cfg.parallel.engine:
        raise UserError(
            f"run.dir={cfg.run.dir} holds a parallel.engine={engine} checkpoint ({checkpoint.name}); resume it with "
            f"parallel.engine={engine}, or start a new run.dir (gpt-finetune/gpt-eval load either engine's checkpoints)"
        )
    if engine == "deepspeed" and int(common["config"]["parallel"]["zero_stage"]) != int(cfg.parallel.zero_stage):
        raise UserError(
            f"run.dir={cfg.run.dir} holds a parallel.zero_stage={common['config']['parallel']['zero_stage']} "
            f"checkpoint; resume it with that stage (the dp size may change)"
        )
    saved = common["config"]["model"]
    keys = ("num_layers", "num_heads", "hidden_size", "ffn_hidden_size", "seq_len", "vocab_multiple", "tie_embeddings")
    diff = [k for k in keys if saved.get(k) != cfg.model.get(k)]
    if diff:
        saved_shape = ", ".join(f"{k}={saved.get(k)}" for k in diff)
        raise UserError(
            f"run.dir={cfg.run.dir} holds a checkpoint of another model ({saved_shape}); "
            "use a new run.dir or the same model"
        )
    return common


def train(cfg: DictConfig) -> dict:
    topo = Topology.from_config(cfg)
    cfg.data.dir = str(Path(cfg.data.dir).expanduser().resolve())  # config.yaml and checkpoints work from any cwd
    manifest = load_manifest(cfg.data.dir)
    check_files(manifest)
    if manifest.seq_len > cfg.model.seq_len:
        raise UserError(
            f"data.dir={manifest.directory} has seq_len={manifest.seq_len} > model.seq_len={cfg.model.seq_len}"
        )
    if cfg.train.async_save and cfg.parallel.engine != "megatron":
        raise UserError(
            "train.async_save=true: only the megatron engine saves asynchronously "
            f"(parallel.engine={cfg.parallel.engine})"
        )
    run_dir = Path(cfg.run.dir)
    ckpts = CheckpointDir(run_dir, int(cfg.train.keep_last))
    latest = ckpts.latest()
    saved = check_resume(cfg, latest) if latest is not None else None
    topo.init(int(cfg.train.seed), float(cfg.parallel.timeout_s))
    rank0 = topo.rank == 0
    # signals first: loader workers and checkpoint writers fork from here and inherit the handler
    stop = StopRequest(list(cfg.train.preempt_signals)).install()
    watchdog = Watchdog(float(cfg.parallel.timeout_s), topo.rank, topo.world_size, enabled=topo.world_size > 1)
    engine = build_engine(cfg, topo, manifest.vocab_size, saved)
    layout = Layout(int(cfg.train.global_batch), int(cfg.train.micro_batch), topo.dp_rank, topo.dp)
    loader = TrainLoader(manifest, layout, int(cfg.train.seed), int(cfg.data.num_streams), int(cfg.data.num_workers))
    step = 0
    if latest is not None:
        with watchdog.watch("checkpoint load", 0):
            common = ckpts.load(latest, engine, restore_rng=True)
        step = int(common["step"])
        loader.load_state_dict(common["data"])
        if rank0:
            print(f"resumed from {latest} at step {step}", flush=True)
    if step >= int(cfg.train.max_steps):
        if rank0:
            print(
                f"{latest} is at step {step} >= train.max_steps={cfg.train.max_steps}: nothing to do "
                "(raise train.max_steps to continue training)",
                flush=True,
            )
        return {"step": step, "val_loss": None}
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    metrics = Metrics(cfg, run_dir, step, enabled=rank0)
    max_steps, seq_len = int(cfg.train.max_steps), manifest.seq_len
    tokens_per_step = layout.global_batch * seq_len
    # MFU: model FLOPs per token (6N + attention) over all ranks' peak
    model_flops = flops_per_token(cfg.model, manifest.vocab_size, seq_len)
    world_peak = peak_flops(cfg.train.peak_tflops, bool(cfg.train.bf16)) * topo.world_size
    eval_every, save_every = int(cfg.train.eval_every), int(cfg.train.save_every)
    async_save = bool(cfg.train.async_save)
    val_loss, preempted = None, None
    sample_log = open_sample_log(run_dir, topo, step) if cfg.train.log_samples else None

    def save(step: int, asynchronous: bool) -> None:
        common = {
            "step": step,
            "data": loader.state_dict(),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "distributed_optimizer": engine.distributed_optimizer,
            "vocab_size": manifest.vocab_size,
            "engine": str(cfg.parallel.engine),
            "layout": {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "vpp": topo.vpp},
        }
        with watchdog.watch("checkpoint save", step):
            path = ckpts.save(step, engine, common, (manifest.directory / TOKENIZER_FILE,), async_save=asynchronous)
        if not asynchronous:
            metrics.log({"step": step, "checkpoint": str(path)}, console=False)

    def finalize(step: int, blocking: bool) -> None:
        with watchdog.watch("async checkpoint commit", step):
            for path in ckpts.finalize(blocking=blocking):
                metrics.log({"step": int(path.name[len(PREFIX) :]), "checkpoint": str(path)}, console=False)

    tick = time.perf_counter()
    while step < max_steps:
        with watchdog.watch("train step (data, forward/backward, gradient reduction, optimizer)", step + 1):
            micro_batches = [next(loader) for _ in range(layout.micro_batches_per_step)]
            result = engine.train_step(micro_batches)
        if sample_log is not None:
            ids = [i for batch in micro_batches for i in batch["ids"].tolist()]
            sample_log.write(json.dumps({"step": step + 1, "ids": ids}) + "\n")
        step += 1
        now = time.perf_counter()
        if not math.isfinite(result.loss):
            raise RuntimeError(f"step {step}: loss is {result.loss}; lower train.lr or check the data")
        metrics.log(
            {
                "step": step,
                "loss": result.loss,
                "lr": result.lr,
                "grad_norm": result.grad_norm,
                "tokens": step * tokens_per_step,
                "tokens_per_s": tokens_per_step / (now - tick),
                "mfu": model_flops * tokens_per_step / (now - tick) / world_peak,
                "step_time_s": now - tick,
            }
        )
        if ckpts.pending:
            finalize(step, blocking=False)
        last = step == max_steps
        if (eval_every and step % eval_every == 0) or last:
            with watchdog.watch("evaluation", step):
                val_loss = evaluate(cfg, engine, manifest, topo, beat=watchdog.beat)
            if val_loss is not None:
                metrics.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, console=True)
        saved = (save_every > 0 and step % save_every == 0) or (last and save_every >= 0)
        if saved:
            save(step, asynchronous=async_save and not last)
        with watchdog.watch("preemption-signal agreement", step):
            preempted = stop.agreed() if not last else None
        if preempted is not None:
            if rank0:
                print(f"step {step}: {preempted}: saving a checkpoint and exiting for requeue", flush=True)
            if not saved:
                save(step, asynchronous=False)
            break
        tick = time.perf_counter()
    finalize(step, blocking=True)
    stop.uninstall()
    watchdog.close()
    metrics.close()
    if sample_log is not None:
        sample_log.close()
    if preempted is not None:
        return {"step": step, "val_loss": val_loss, "requeue_exit_code": int(cfg.train.requeue_exit_code)}
    summary = {"step": step, "val_loss": val_loss}
    if rank0 and val_loss is not None:
        print(f"val_loss {val_loss:.4f} (whole validation split, step {step})", flush=True)
    if rank0 and int(cfg.train.sample_tokens) > 0:
        print_sample(cfg, engine, manifest, topo)
    return summary


def open_sample_log(run_dir: Path, topo: Topology, step: int):  # noqa: ANN201 - text file
    """``samples_rank<R>.jsonl``: the sample ids each data-parallel rank trained on, per step."""
    path = run_dir / f"samples_rank{topo.rank}.jsonl"
    truncate_after(path, step)
    run_dir.mkdir(parents=True, exist_ok=True)
    return path.open("a", buffering=1)


def print_sample(cfg: DictConfig, engine, manifest: Manifest, topo: Topology) -> None:  # noqa: ANN001
    if topo.world_size > 1:
        print("(sample skipped in a multi-process run: use gpt-generate on the checkpoint)")
        return
    from pretrain.generate import sample

    tokenizer = load_tokenizer(manifest.directory)
    prompt = tokenizer.encode(str(cfg.train.sample_prompt)) or [tokenizer.eot_id]
    ids = sample(
        engine.unwrapped_model(),
        prompt,
        int(cfg.train.sample_tokens),
        int(cfg.model.seq_len),
        tokenizer.vocab_size,
        temperature=0.8,
        top_k=200,
        seed=int(cfg.train.seed),
    )
    print("--- sample ---\n" + tokenizer.decode(prompt + ids).strip() + "\n--------------", flush=True)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        summary = train(cfg)
    Topology.destroy()
    if "requeue_exit_code" in summary:
        exit_for_requeue(summary["requeue_exit_code"])


def main() -> None:
    set_rank_threads()
    check_group_choices(sys.argv[1:])
    quiet_third_party()
    torch.set_num_threads(torch.get_num_threads())
    _hydra_main()


if __name__ == "__main__":
    main()
