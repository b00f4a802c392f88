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

from conf.cli import check_group_choices, exit_on_user_error, quiet_third_party, set_rank_threads
from conf.errors import UserError
from data.output_dir import RUN_DIR_NAMES, check_run_dir
from data.shards import Manifest, check_files, load_manifest
from data.stream import Layout, TrainLoader, eval_batches
from data.tokenizer import TOKENIZER_FILE, load_tokenizer
from parallel import process_hygiene
from parallel.checkpoint import PREFIX, CheckpointDir, CheckpointException, one_line, read_common
from parallel.topology import Topology
from parallel.watchdog import Watchdog
from pretrain.config_checks import check_logging, check_train
from pretrain.flops import peak_flops
from pretrain.metrics import Metrics, truncate_after
from pretrain.model import flops_per_token
from pretrain.preemption import INTERRUPTED_EXIT_CODE, StopRequest, exit_for_requeue
from pretrain.resume import check_resume, config_changes, data_identity
from pretrain.skip_policy import SkipPolicy


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


RUN_FILES = ("metrics.jsonl", "config.yaml", "loss.png", "eval.png", "samples_rank*.jsonl")


def prepare_run_dir(cfg: DictConfig, ckpts: CheckpointDir, run_dir: Path, rank0: bool) -> None:
    """Clear what a killed save left (ours), and honour ``run.restart=true``: the earlier run's
    checkpoints and files move to ``restarted-<time>/`` (nothing is deleted). A relaunch with the
    flag still set (a requeue) resumes the restarted run instead of starting over again."""
    ckpts.remove_stale()
    steps = ckpts.steps()
    if not cfg.run.get("restart", False) or not steps:
        return
    try:
        restarted = bool(read_common(steps[0])["config"]["run"].get("restart", False))
    except (OSError, ValueError, KeyError):
        restarted = False
    if restarted:
        if rank0:
            print(f"run.restart=true: {steps[0].name} was written after a restart (a requeue?): resuming it; "
                  "move run.dir away to start over again", flush=True)
        return
    target = ckpts.archive(run_dir, RUN_FILES)
    if rank0:
        print(f"run.restart=true: moved the earlier run's checkpoints and metrics to {target}", flush=True)


def train(cfg: DictConfig) -> dict:
    check_train(cfg)
    check_logging(cfg)
    topo = Topology.from_config(cfg)
    cfg.data.dir = str(Path(cfg.data.dir).expanduser().resolve())  # config.yaml and checkpoints work from any cwd
    manifest = load_manifest(cfg.data.dir)
    check_files(manifest)
    identity = data_identity(manifest)
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
    check_run_dir(run_dir, (*RUN_DIR_NAMES, "metrics.tmp"), command="gpt-pretrain")
    ckpts = CheckpointDir(run_dir, int(cfg.train.keep_last))
    topo.init(int(cfg.train.seed), float(cfg.parallel.timeout_s))
    rank0 = topo.rank == 0
    prepare_run_dir(cfg, ckpts, run_dir, rank0)
    latest, events = ckpts.select()
    saved = read_common(latest) if latest is not None else None
    restore_data = check_resume(cfg, saved, latest, identity) if saved is not None else True
    # before the engine and loader start helpers (forked helpers ignore these: process_hygiene)
    stop = StopRequest([*cfg.train.preempt_signals, "SIGINT"]).install()
    watchdog = Watchdog(float(cfg.parallel.timeout_s), topo.rank, topo.world_size, enabled=topo.world_size > 1)
    engine = build_engine(cfg, topo, manifest.vocab_size, saved)
    layout = Layout(int(cfg.train.global_batch), int(cfg.train.micro_batch), topo.dp_rank, topo.dp)
    loader = TrainLoader(manifest, layout, int(cfg.train.seed), int(cfg.data.num_streams), int(cfg.data.num_workers))
    policy = SkipPolicy(cfg.train.get("spike_factor"), int(cfg.train.get("max_skipped", 10)))
    step = 0
    while latest is not None:
        with watchdog.watch("checkpoint load", 0):
            common, problem = load_agreed(ckpts, latest, engine)
        if problem is None:
            break
        events.append(ckpts.fallback(latest, problem))
        latest, more = ckpts.select(older_than=int(latest.name[len(PREFIX) :]))
        events += more
    if latest is not None:
        step = int(common["step"])
        if restore_data:
            loader.load_state_dict(common["data"])
        else:
            events.append({"event": "new_data", "data_dir": identity["data_dir"], "was": saved.get("data_identity")})
        policy.load_state_dict(common.get("skip_policy"))
        events += config_changes(cfg, common)
        if rank0:
            print(f"resumed from {latest} at step {step}", flush=True)
            for event in events:
                if event["event"] == "config_change":
                    print(f"resume: {event['key']} {event['old']} -> {event['new']} (the config in effect wins)")
                elif event["event"] == "new_data":
                    print(f"resume: data.allow_new=true: continuing on the new shard set {identity['data_dir']}")
    if step >= int(cfg.train.max_steps):
        if rank0:
            where = f"{latest} is at step {step}" if latest is not None else "train.max_steps=0"
            print(f"{where}: nothing to do (raise train.max_steps to continue training)", flush=True)
        return {"step": step, "val_loss": None}
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    metrics = Metrics(cfg, run_dir, step, enabled=rank0)
    for event in events:
        metrics.log({"step": step, **event}, console=False)
    max_steps, seq_len = int(cfg.train.max_steps), manifest.seq_len
    tokens_per_step = layout.global_batch * seq_len
    # MFU: model FLOPs per token (6N + attention) over all ranks' peak
    model_flops = flops_per_token(cfg.model, manifest.vocab_size, seq_len)
    world_peak = peak_flops(cfg.train.peak_tflops, bool(cfg.train.bf16)) * topo.world_size
    eval_every, save_every = int(cfg.train.eval_every), int(cfg.train.save_every)
    async_save = bool(cfg.train.async_save)
    val_loss, stopped = None, None
    sample_log = open_sample_log(run_dir, topo, step) if cfg.train.log_samples else None

    def save(step: int, asynchronous: bool) -> None:
        common = {
            "step": step,
            "data": loader.state_dict(),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "distributed_optimizer": engine.distributed_optimizer,
            "vocab_size": manifest.vocab_size,
            "data_identity": identity,
            "skip_policy": policy.state_dict(),
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
        policy.step = step + 1
        with watchdog.watch("train step (data, forward/backward, gradient reduction, optimizer)", step + 1):
            micro_batches = [next(loader) for _ in range(layout.micro_batches_per_step)]
            result = engine.train_step(micro_batches, accept=policy.accept)
        if sample_log is not None:
            ids = [i for batch in micro_batches for i in batch["ids"].tolist()]
            sample_log.write(json.dumps({"step": step + 1, "ids": ids}) + "\n")
        step += 1
        now = time.perf_counter()
        record = {
            "step": step,
            "loss": result.loss if math.isfinite(result.loss) else None,
            "lr": result.lr,
            "grad_norm": result.grad_norm if math.isfinite(result.grad_norm) else None,
            "tokens": step * tokens_per_step,
            "tokens_per_s": tokens_per_step / (now - tick),
            "mfu": model_flops * tokens_per_step / (now - tick) / world_peak,
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
        saved = (save_every > 0 and step % save_every == 0) or (last and save_every >= 0)
        if saved:  # before evaluation: a failing evaluation never costs the step's checkpoint
            save(step, asynchronous=async_save and not last)
        if (eval_every and step % eval_every == 0) or last:
            with watchdog.watch("evaluation", step):
                val_loss = evaluate(cfg, engine, manifest, topo, beat=watchdog.beat)
            if val_loss is not None:
                metrics.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, console=True)
        with watchdog.watch("preemption-signal agreement", step):
            stopped = stop.agreed() if not last else None
        if stopped is not None:
            if rank0:
                print(f"step {step}: {stopped}: saving a checkpoint and exiting", flush=True)
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
    if stopped is not None:
        code = INTERRUPTED_EXIT_CODE if stopped == "SIGINT" else int(cfg.train.requeue_exit_code)
        return {"step": step, "val_loss": val_loss, "exit_code": code}
    summary = {"step": step, "val_loss": val_loss}
    if rank0 and val_loss is not None:
        print(f"val_loss {val_loss:.4f} (whole validation split, step {step})", flush=True)
    if rank0 and int(cfg.train.sample_tokens) > 0:
        print_sample(cfg, engine, manifest, topo)
    return summary


def load_agreed(ckpts: CheckpointDir, path: Path, engine) -> tuple[dict | None, str | None]:  # noqa: ANN001
    """Load ``path``; a step that verified but cannot be read (any rank) is reported, not raised,
    so that every rank falls back to the same older step."""
    import torch.distributed as dist

    common, problem = None, None
    try:
        common = ckpts.load(path, engine, restore_rng=True)
    except (Exception, CheckpointException) as exc:  # DCP's exception is a BaseException
        problem = f"unreadable: {one_line(exc)}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, problem)
        problem = next((p for p in gathered if p), None)
    return common, problem


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
    if "exit_code" in summary:
        exit_for_requeue(summary["exit_code"])


def main() -> None:
    set_rank_threads()
    process_hygiene.install()  # helper processes (writers, loader workers, megatron's Manager) die with this one
    check_group_choices(sys.argv[1:])
    quiet_third_party()
    torch.set_num_threads(torch.get_num_threads())
    with exit_on_user_error():  # a Ctrl-C before the loop's handler exists: one line, exit 130
        _hydra_main()


if __name__ == "__main__":
    main()
