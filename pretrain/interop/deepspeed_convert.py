"""DeepSpeed step → megatron ``dist_checkpointing`` step, so every reader loads either engine's runs.

``gpt-finetune``, ``gpt-eval``, ``gpt-generate`` and ``gpt-export`` read model weights through
megatron-core's reshardable format. A DeepSpeed step (any ZeRO stage, any dp, tp=1) is
consolidated into fp32 weights with DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``,
loaded into the same ``GPTModel`` and saved as ``step_<N>/megatron`` (weights, common state and
the tokenizer; no optimizer state), once, atomically. :func:`model_checkpoint` is what readers
call: it returns the step dir itself for megatron runs and the converted view for DeepSpeed
ones, converting in a child process (its own single-process group, whatever the caller's).

    python -m pretrain.interop.deepspeed_convert RUN_OR_STEP_DIR   # prints the converted directory
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

from conf.errors import UserError
from parallel.checkpoint import CheckpointDir
from parallel.train_state import TRAIN_STATE, TrainState

MEGATRON_VIEW = "megatron"


def model_checkpoint(spec: str | Path) -> Path:
    """``checkpoint=spec`` (run dir or step dir) as a megatron-format step dir, converting if needed."""
    path = CheckpointDir.resolve(spec)
    if TrainState.read(path).engine != "deepspeed":
        return path
    out = path / MEGATRON_VIEW
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if rank == 0 and not out.is_dir():
        repo = Path(__file__).resolve().parent.parent
        env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
        result = subprocess.run(
            [sys.executable, "-m", "pretrain.interop.deepspeed_convert", str(path)],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"checkpoint={spec}: converting the DeepSpeed checkpoint {path} failed: {last}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    elif rank > 0:  # before the process groups exist: wait for rank 0's conversion (renamed when complete)
        deadline = time.monotonic() + 600
        while not out.is_dir():
            if time.monotonic() > deadline:
                raise UserError(f"checkpoint={spec}: rank 0 did not finish converting {path} within 600 s")
            time.sleep(0.5)
    return out


def convert(step_dir: Path) -> Path:
    """Write ``step_dir/megatron`` (single process)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from megatron.core import dist_checkpointing

    from parallel import cpu_compat
    from parallel.deepspeed_engine import import_deepspeed
    from parallel.run_config import Run
    from pretrain.model import build_gpt, transformer_config

    state = TrainState.read(step_dir)
    layout = state.layout
    if int(layout.get("tp", 1)) > 1:
        raise UserError(f"{step_dir}: DeepSpeed checkpoints saved at tp={layout['tp']} cannot be converted (tp=1 only)")
    cfg = Run.from_saved(state.config, tp=1, pp=1, vpp=1, engine="megatron", zero_stage=0, offload="none")
    import_deepspeed()
    cpu_compat.apply()
    cfg.layout.init(cfg.train.seed)
    added = int(state.task.get("added_tokens", 0))  # a fine-tuned model's start/delimiter/extract rows
    model = build_gpt(cfg.model, state.vocab_size + added, transformer_config(cfg.model), seed=0)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    if "labels" in state.task:  # a fine-tuning model: its GPT is ``module``; the task head is not a GPT weight
        weights = {k.removeprefix("module."): v for k, v in weights.items() if not k.startswith("finetune_head.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # megatron's TE-compatibility "_extra_state" entries are not parameters DeepSpeed saves
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise UserError(f"{step_dir}: DeepSpeed weights do not fit the model (missing {missing}, extra {unexpected})")
    out, tmp = step_dir / MEGATRON_VIEW, step_dir / f".{MEGATRON_VIEW}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    converted = dataclasses.replace(
        state,
        engine="megatron",
        config=cfg.to_dict(),
        converted_from="deepspeed",
        distributed_optimizer=False,
    )
    dist_checkpointing.save({"model": model.sharded_state_dict(), "common": converted.to_dict()}, str(tmp))
    converted.write(tmp)
    for name in os.listdir(step_dir):
        if name.endswith(".json") and name != TRAIN_STATE:  # tokenizer.json
            shutil.copy2(step_dir / name, tmp / name)
    os.replace(tmp, out)
    return out


def main() -> None:
    from conf.cli import exit_on_user_error, quiet_third_party

    if len(sys.argv) != 2:
        sys.exit("usage: python -m pretrain.interop.deepspeed_convert RUN_OR_STEP_DIR")
    quiet_third_party()
    with exit_on_user_error():
        path = CheckpointDir.resolve(sys.argv[1])
        if TrainState.read(path).engine != "deepspeed":
            raise UserError(f"{path}: not a DeepSpeed checkpoint (megatron checkpoints load as they are)")
        print(path / MEGATRON_VIEW if (path / MEGATRON_VIEW).is_dir() else convert(path))


if __name__ == "__main__":
    main()
