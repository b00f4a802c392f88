"""The DeepSpeed engine: ZeRO stages 0-3 (and CPU offload) around the same megatron-core GPT.

DeepSpeed is the reference implementation of ZeRO; this module only translates the Hydra
config into a DeepSpeed config, hands it the model and param groups, and drives the step
the way the megatron engine does, so both engines train the same model on the same data
with the same numbers:

- the same ``build_gpt`` weights (seeded per layer), the same masked token loss;
- AdamW through ``torch_adam`` (torch's implementation; DeepSpeed's FusedAdam/CPUAdam would
  compile C++ for minutes on a CPU machine), weight decay on matrices only;
- megatron-core's ``OptimizerParamScheduler`` on DeepSpeed's param groups, stepped after
  each applied optimizer step, exactly as in the megatron engine.

Checkpoints are DeepSpeed's own (``save_checkpoint``) inside the run dir's ``step_<N>``
directory. Resuming at another data-parallel size converts the step to a DeepSpeed
*universal* checkpoint (``ds_to_universal``, once, into ``step_<N>/universal``) and loads
that. ``pretrain/interop/deepspeed_convert.py`` turns a step into the megatron format that
``gpt-finetune``, ``gpt-eval``, ``gpt-generate`` and ``gpt-export`` load.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from parallel import checksums, cpu_compat
from parallel.engine import ModelSpec, StepResult, layout_config, lr_scheduler
from parallel.run_config import Run
from parallel.topology import Topology, compute_device
from parallel.train_state import TrainState

UNIVERSAL = "universal"


def import_deepspeed():  # noqa: ANN201 - the deepspeed module
    """Import DeepSpeed without its op builds.

    ``init_distributed`` would compile the shared-memory comm op (minutes on a CPU machine, and a
    killed build leaves a lock that hangs later runs); gloo/NCCL through torch.distributed is
    what this engine uses anyway.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # a single process started without torchrun: DeepSpeed's sanity check wants the variables
    for key, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _mpu() -> Any:
    """DeepSpeed's ``mpu`` interface over megatron-core's groups (model parallel = tp here)."""
    ps = parallel_state
    return SimpleNamespace(
        get_model_parallel_rank=ps.get_tensor_model_parallel_rank,
        get_model_parallel_world_size=ps.get_tensor_model_parallel_world_size,
        get_model_parallel_group=ps.get_tensor_model_parallel_group,
        get_tensor_model_parallel_rank=ps.get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size=ps.get_tensor_model_parallel_world_size,
        get_tensor_model_parallel_group=ps.get_tensor_model_parallel_group,
        get_tensor_model_parallel_src_rank=ps.get_tensor_model_parallel_src_rank,
        get_data_parallel_rank=ps.get_data_parallel_rank,
        get_data_parallel_world_size=ps.get_data_parallel_world_size,
        get_data_parallel_group=ps.get_data_parallel_group,
        get_pipeline_model_parallel_rank=ps.get_pipeline_model_parallel_rank,
        get_pipeline_model_parallel_world_size=ps.get_pipeline_model_parallel_world_size,
        get_pipeline_model_parallel_group=ps.get_pipeline_model_parallel_group,
    )


def deepspeed_config(cfg: Run, topo: Topology, num_params: int) -> dict[str, Any]:
    """The DeepSpeed JSON config, derived from the Hydra config (nothing else to keep in sync).

    Bucket sizes follow the model (as the HF integration's "auto" does) instead of DeepSpeed's
    fixed 5e8 elements: ZeRO-3 preallocates its reduce bucket, 2 GB for any model otherwise.
    """
    train, par = cfg.train, cfg.parallel
    stage = int(par.zero_stage)
    hidden = int(cfg.model.hidden_size)
    bucket = int(min(5e8, max(num_params, hidden * hidden)))
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=False, round_robin_gradients=False)
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * bucket), stage3_param_persistence_threshold=10 * hidden)
    if str(par.offload) == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    accumulation = int(train.global_batch) // (int(train.micro_batch) * topo.dp)
    return {
        "train_batch_size": int(train.global_batch),
        "train_micro_batch_size_per_gpu": int(train.micro_batch),
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": float(train.grad_clip),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(train.lr),
                "betas": [float(train.beta1), float(train.beta2)],
                "eps": 1e-8,
                "weight_decay": float(train.weight_decay),
                "torch_adam": True,
            },
        },
        "bf16": {"enabled": bool(train.bf16)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW on offloaded state: no CPUAdam build
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices only, as megatron-core's optimizer does (biases, norms: 0)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
    return [
        {"params": decay, "wd_mult": 1.0, "lr_mult": 1.0},
        {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0},
    ]


class DeepSpeedEngine:
    """One ``deepspeed.DeepSpeedEngine`` over this rank's GPT, behind the trainer's interface."""

    def __init__(self, cfg: Run, topo: Topology, spec: ModelSpec):
        deepspeed = import_deepspeed()
        self.cfg, self.topo = cfg, topo
        self.forward_step = spec.forward_step
        train = cfg.train
        self.config = layout_config(spec.config, topo, bool(train.bf16))
        with cpu_compat.tensors_pass_as_cuda():
            model = spec.build(self.config, None).to(compute_device())
        groups = [group for group in param_groups(model) if group["params"]]
        self._multipliers = [{"wd_mult": g["wd_mult"], "lr_mult": g["lr_mult"]} for g in groups]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            config=deepspeed_config(cfg, topo, sum(p.numel() for p in model.parameters())),
            mpu=_mpu() if topo.tp > 1 else None,
            dist_init_required=False,
        )
        gpt = getattr(model, "module", model)  # a task model keeps its GPT as ``.module``
        if int(cfg.parallel.zero_stage) == 3 and gpt.share_embeddings_and_output_weights and gpt.post_process:
            # the output layer multiplies by the embedding's weight, which ZeRO-3 would
            # otherwise have released after the embedding's own forward
            deepspeed.zero.register_external_parameter(gpt.output_layer, gpt.shared_embedding_or_output_weight())
        self._save_extra_state_as_tensors()
        self.scheduler = lr_scheduler(self.optimizer, train)

    def _save_extra_state_as_tensors(self) -> None:
        """megatron-core layers save ``_extra_state = None`` (a Transformer Engine slot);
        ``ds_to_universal`` calls ``.float()`` on every saved module entry, so save an empty
        tensor instead (``set_extra_state`` ignores it on load)."""
        original = self.engine.module_state_dict

        def module_state_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
            state = original(*args, **kwargs)
            for key, value in state.items():
                if value is None and key.endswith("_extra_state"):
                    state[key] = torch.empty(0)
            return state

        self.engine.module_state_dict = module_state_dict

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(mean loss of one micro-batch, its named sums) through the task's forward step, the
        same function megatron's schedule calls."""
        output, loss_func = self.forward_step(iter([batch]), self.engine)
        return loss_func(output)

    def _sum(self, totals: dict[str, torch.Tensor] | None, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = {k: torch.as_tensor(v, device=compute_device()).detach().double() for k, v in sums.items()}
        return values if totals is None else {k: totals[k] + values[k] for k in totals}

    def _reduce(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(totals)
        flat = torch.stack([totals[n] for n in names])
        if self.topo.world_size > 1:
            dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
        return dict(zip(names, flat.tolist(), strict=True))

    def train_step(
        self, micro_batches: list[dict[str, torch.Tensor]], accept: Callable[[float], bool] | None = None
    ) -> StepResult:
        totals = None
        lr = self.optimizer.param_groups[0]["lr"]
        for i, batch in enumerate(micro_batches):
            loss, sums = self._forward(batch)
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps
            totals = self._sum(totals, sums)
            if i < len(micro_batches) - 1:
                self.engine.step()  # not a boundary: accumulates only
        reduced = self._reduce(totals)
        mean = reduced["loss_sum"] / max(reduced["tokens"], 1.0)
        skip = accept is not None and not accept(mean)
        with self._skipping() if skip else contextlib.nullcontext():
            self.engine.step()  # the accumulation boundary: applies the optimizer unless skipped
        applied = self.engine.was_step_applied() and not skip
        if applied:
            self.scheduler.step(increment=1)
        grad_norm = self.engine.get_global_grad_norm()
        return StepResult(mean, float(grad_norm or 0.0), lr, skipped=not applied, totals=reduced)

    @contextlib.contextmanager
    def _skipping(self) -> Iterator[None]:
        """Make DeepSpeed's boundary step discard this step's gradients without an update, through
        its own overflow path (ZeRO 1-3: it zeroes the partitioned gradients and counts the skip);
        without ZeRO the wrapped torch optimizer's step is a no-op and the engine zeroes the grads."""
        opt = self.engine.optimizer
        if hasattr(opt, "_overflow_check_and_loss_scale_update"):  # ZeRO-3
            name, original = "_overflow_check_and_loss_scale_update", opt._overflow_check_and_loss_scale_update
        elif hasattr(opt, "check_overflow") and hasattr(opt, "check_grad_overflow"):  # ZeRO-1/2
            name, original = "check_overflow", opt.check_overflow
            checks, opt.check_grad_overflow = opt.check_grad_overflow, True
        else:
            name, original = "step", None

        def overflow(*args: Any, **kwargs: Any) -> None:
            if original is not None:
                original(*args, **kwargs)  # keeps the ranks' collectives in step
                opt.overflow = True

        setattr(opt, name, overflow)
        try:
            yield
        finally:
            del opt.__dict__[name]
            if name == "check_overflow":
                opt.check_grad_overflow = checks

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        self.engine.eval()
        try:
            totals = None
            for batch in micro_batches:
                totals = self._sum(totals, self._forward(batch)[1])
        finally:
            self.engine.train()
        return self._reduce(totals)

    def save(self, directory: Path, state: dict[str, Any], async_save: bool = False) -> None:
        """DeepSpeed's checkpoint files directly in ``directory`` (tag = its name); always
        synchronous (``train.async_save`` is refused for this engine at config time)."""
        client = {"common": state, "scheduler": self.scheduler.state_dict()}
        ckpt_engine = self.engine.checkpoint_engine
        if not hasattr(ckpt_engine.save, "__wrapped__"):  # model / optimizer files hashed as they are written
            ckpt_engine.save = checksums.hashing_torch_save(ckpt_engine.save)
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, client_state=client, save_latest=False)

    def load(self, directory: Path) -> dict[str, Any]:
        # saved at another dp: through a universal checkpoint (step_<N>/universal), else step_<N> itself
        saved_dp = TrainState.read(directory).layout.get("dp")
        universal = saved_dp is not None and int(saved_dp) != self.topo.dp
        self.engine._config.load_universal_checkpoint = universal  # read by every load path of DeepSpeed
        load_dir, tag = (directory, UNIVERSAL) if universal else (directory.parent, directory.name)
        if universal:
            universal_checkpoint(directory)
        path, client = self.engine.load_checkpoint(str(load_dir), tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")
        # DeepSpeed 0.19's ZeRO-3 universal load copies param group 0's settings into every
        # group, which would decay biases and norms from then on: restore each group's own
        # multipliers; the scheduler's load then recomputes lr and weight decay from them
        for group, multipliers in zip(self.optimizer.param_groups, self._multipliers, strict=True):
            group.update(multipliers)
        self.scheduler.load_state_dict(client["scheduler"])
        return client["common"]

    def unwrapped_model(self) -> torch.nn.Module:
        return self.engine.module


def universal_checkpoint(step_dir: Path) -> Path:
    """``step_dir/universal``: the step as a DeepSpeed universal checkpoint (dp-independent).

    Converted once by rank 0 (``ds_to_universal`` with ``--inject_missing_state``, which
    checkpoints not written by Megatron-DeepSpeed need) into a temp dir that is renamed
    when complete, so an interrupted conversion is redone, never half-read.
    """
    out = step_dir / UNIVERSAL
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not out.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = step_dir / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        argv = ["ds_to_universal", "--input_folder", str(step_dir), "--output_folder", str(tmp)]
        argv += ["--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
        saved_argv, sys.argv = sys.argv, argv
        try:
            ds_to_universal.main(ds_to_universal.parse_arguments())
        finally:
            sys.argv = saved_argv
        os.replace(tmp, out)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return out
