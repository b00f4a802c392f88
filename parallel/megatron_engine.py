"""The megatron-core engine: DDP (+ distributed optimizer), pipeline schedules, dist_checkpointing.

Gradient accumulation is the schedule's job: ``get_forward_backward_func`` runs the
micro-batches (1F1B / interleaved when pp > 1, a plain loop otherwise) and DDP
reduces gradients once per step. Checkpoints are megatron-core sharded state dicts,
so a checkpoint written at one (tp, pp, dp) loads at another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from conf.errors import UserError
from conf.groups import TrainConfig
from parallel import checksums, cpu_compat, inplace_grads, process_hygiene
from parallel.engine import ModelSpec, StepResult, layout_config, lr_scheduler
from parallel.run_config import Run
from parallel.topology import Topology, compute_device


def _fuse_torch_adamw(optimizer: Any) -> None:
    """Run torch's AdamW as one fused kernel per step instead of ``foreach`` loops.

    Without Apex or Transformer Engine megatron-core builds a plain ``torch.optim.AdamW``, whose
    default on CPU is the multi-tensor ``foreach`` path: ~12 ops per parameter group list
    against one fused kernel (torch has fused AdamW kernels for CPU and CUDA; the figures are
    in ``benchmarks/README.md``). The flag lives in the param groups, which a loaded
    optimizer state replaces, so it is set again after every load.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) is not torch.optim.AdamW:
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if any(p.device.type not in ("cpu", "cuda") or not p.is_floating_point() for p in params):
            continue
        for group in inner.param_groups:
            group["fused"], group["foreach"] = True, False


def _param_groups(optimizer: Any) -> list[dict[str, Any]]:
    return [g for opt in getattr(optimizer, "chained_optimizers", [optimizer]) for g in opt.param_groups]


def _group_schedules(optimizer: Any) -> list[dict[str, Any]]:
    """Each param group's schedule keys as this run configured them (restored after a load)."""
    keys = ("max_lr", "min_lr", "wd_mult")
    return [{k: g[k] for k in keys if k in g} for g in _param_groups(optimizer)]


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (checkpoint keys never see wrappers)."""
    while isinstance(module, DistributedDataParallel | Float16Module):
        module = module.module
    return module


def lr_overrides(opt_config: OptimizerConfig, train: TrainConfig) -> dict | None:
    """megatron's param-group overrides with ``train.lr_mult`` ({name glob: factor}) applied.

    A factor scales a group's peak and final learning rate (the schedule keeps its shape):
    fine-tuning gives its new head a larger rate than the pretrained body. The standard
    overrides (no weight decay on biases and norms) are kept.
    """
    mults = train.lr_mult or {}
    if not mults:
        return None
    overrides = get_standard_config_overrides(opt_config)
    for pattern, factor in mults.items():
        if float(factor) <= 0:
            raise UserError(f"train.lr_mult.{pattern}={factor}: must be > 0")
        lrs = {"max_lr": opt_config.lr * float(factor), "min_lr": opt_config.min_lr * float(factor)}
        overrides[ParamKey(name=str(pattern))] = lrs
    return overrides


class _AsyncSave:
    """The engine's :class:`~parallel.engine.SaveHandle`: megatron-core's ``AsyncRequest``."""

    def __init__(self, request: Any):
        self._request = request

    def on_done(self, fn: Callable[[], None]) -> None:
        self._request.add_finalize_fn(fn)

    def schedule(self, queue: Any) -> None:
        queue.schedule_async_request(self._request)


class MegatronEngine:
    """Model chunks, optimizer and LR schedule for this rank, built from the config."""

    def __init__(self, cfg: Run, topo: Topology, spec: ModelSpec):
        """``spec.build`` makes each model chunk (one per virtual pipeline stage) on the CPU;
        ``spec.forward_step`` is megatron-core's schedule step, whose loss function returns
        ``(loss, {name: tensor})``: the named values are summed over micro-batches and ranks
        into the step's totals; ``spec.batch_shape`` gives the (sequence length, sequences)
        of a micro-batch for the pipeline's messages. ``cfg.distributed_optimizer`` is the run's
        resolved bool (``auto`` and the resumed checkpoint's choice settled)."""
        self.cfg, self.topo = cfg, topo
        self._save_strategy: Any = None
        self.forward_step, self.batch_shape = spec.forward_step, spec.batch_shape
        self.step_metrics = spec.step_metrics
        distributed_optimizer = cfg.distributed_optimizer
        train = cfg.train
        bf16 = bool(train.bf16)
        self.config = layout_config(spec.config, topo, bf16)
        vpp = topo.vpp if topo.vpp > 1 else None
        with cpu_compat.tensors_pass_as_cuda():
            chunks = [spec.build(self.config, i if vpp else None) for i in range(vpp or 1)]
            # built on the CPU (same weights at every layout), trained where the compute is
            chunks = [chunk.to(compute_device()) for chunk in chunks]
        if train.compile:
            # in place (nn.Module.compile): same module type and checkpoint keys, compiled forward
            for chunk in chunks:
                chunk.compile()
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=distributed_optimizer,
        )
        if bf16:
            chunks = [Float16Module(self.config, chunk) for chunk in chunks]
        self.inplace_grads = inplace_grads.applies(self.config, ddp_config, bf16)
        ddp_class = inplace_grads.InPlaceGradDDP if self.inplace_grads else DistributedDataParallel
        self.model = [
            ddp_class(self.config, ddp_config, chunk, disable_bucketing=(i > 0)) for i, chunk in enumerate(chunks)
        ]
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=float(train.lr),
            min_lr=float(train.lr) * float(train.min_lr_ratio),
            weight_decay=float(train.weight_decay),
            adam_beta1=float(train.beta1),
            adam_beta2=float(train.beta2),
            adam_eps=1e-8,
            clip_grad=float(train.grad_clip),
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=ddp_config.use_distributed_optimizer,
        )
        with cpu_compat.tensors_pass_as_cuda():
            self.optimizer = get_megatron_optimizer(opt_config, self.model, lr_overrides(opt_config, train))
        _fuse_torch_adamw(self.optimizer)
        self.scheduler = lr_scheduler(self.optimizer, train)
        # the schedule calls this after the last micro-batch: DP grad all-reduce (or
        # reduce-scatter), SP layernorm grads over TP, tied-embedding grads over PP
        self.config.finalize_model_grads_func = finalize_model_grads
        self.forward_backward = get_forward_backward_func()

    def _total_names(self, outputs: list[dict[str, Any]] | None) -> list[str]:
        """The loss function's value names, known on every pipeline stage (learned once)."""
        if getattr(self, "_names", None) is None:
            names = sorted(outputs[0]) if outputs else []
            if self.topo.pp > 1:  # only the last stage has outputs
                gathered: list = [None] * self.topo.pp
                dist.all_gather_object(gathered, names, group=parallel_state.get_pipeline_model_parallel_group())
                names = next(n for n in gathered if n)
            self._names = names
        return self._names

    def run(self, micro_batches: list[dict[str, torch.Tensor]], forward_only: bool) -> dict[str, float]:
        """Run the schedule (forward and backward unless ``forward_only``; no optimizer step);
        returns the loss functions' named values summed over micro-batches, dp and pp ranks."""
        seq_length, rows = self.batch_shape(micro_batches[0])
        iterators: Any = iter(micro_batches)
        if len(self.model) > 1:
            # every virtual stage walks the same micro-batches
            iterators = [iter(micro_batches) for _ in self.model]
        outputs = self.forward_backward(
            forward_step_func=self.forward_step,
            data_iterator=iterators,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=rows,
            forward_only=forward_only,
        )
        names = self._total_names(outputs)
        totals = torch.zeros(len(names), dtype=torch.float64, device=compute_device())
        for item in outputs or []:
            totals += torch.stack([torch.as_tensor(item[n], device=totals.device).double() for n in names])
        if self.topo.world_size > 1:
            # the last pipeline stage holds the loss; tp ranks hold the same copy
            dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
            if self.topo.pp > 1:
                dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
        return dict(zip(names, totals.tolist(), strict=True))

    def train_step(
        self, micro_batches: list[dict[str, torch.Tensor]], accept: Callable[[float], bool] | None = None
    ) -> StepResult:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        if not self.inplace_grads:  # (at one rank zero_grad_buffer already dropped every .grad)
            self.optimizer.zero_grad()
        totals = self.run(micro_batches, forward_only=False)
        metrics = self.step_metrics(len(micro_batches)) if self.step_metrics is not None else {}
        loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
        lr = self.optimizer.param_groups[0]["lr"]
        if accept is not None and not accept(loss):  # skipped: the grads are zeroed by the next step
            return StepResult(loss, float("nan"), lr, True, totals, metrics)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return StepResult(loss, float(grad_norm or 0.0), lr, not ok, totals, metrics)

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """The loss functions' named values over these micro-batches, in eval mode."""
        for chunk in self.model:
            chunk.eval()
        try:
            return self.run(micro_batches, forward_only=True)
        finally:
            for chunk in self.model:
                chunk.train()

    def _sharded_state_dict(self, is_loading: bool) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if len(self.model) == 1:
            state["model"] = _unwrap(self.model[0]).sharded_state_dict()
        else:
            for i, chunk in enumerate(self.model):
                state[f"model{i}"] = _unwrap(chunk).sharded_state_dict()
        # model-space optimizer tensors: loadable at any tp / pp / dp
        metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
        state["optimizer"] = self.optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
        return state

    def save(self, directory: Path, state: dict[str, Any], async_save: bool = False) -> _AsyncSave | None:
        """Sharded save; with ``async_save`` the shard writing is returned as a handle over
        megatron-core's ``AsyncRequest``, which ``CheckpointDir`` hands to its writer process."""
        with cpu_compat.tensors_pass_as_cuda():
            train_state = state
            state = self._sharded_state_dict(is_loading=False)
            state["scheduler"] = self.scheduler.state_dict()
            state["common"] = train_state
            writers = self.cfg.train.checkpoint_writers
            if self._save_strategy is None:  # kept: caches the save plan across saves of the same layout
                self._save_strategy = TorchDistSaveShardedStrategy(
                    "torch_dist", 1, thread_count=writers, cached_metadata=True
                )
            strategy = self._save_strategy
            checksums.hash_megatron_writes()  # each .distcp file is hashed as it is written
            process_hygiene.patch_megatron_results_queue()  # its Manager process dies with this one
            here = contextlib.nullcontext() if async_save else process_hygiene.results_in_this_process()
            with here:
                request = dist_checkpointing.save(
                    state, str(directory), sharded_strategy=strategy, async_sharded_save=async_save
                )
        return _AsyncSave(request) if async_save else None

    def _materialize_optimizer_state(self) -> None:
        """Give a fresh distributed optimizer its Adam state before describing what to load.

        With torch's AdamW (no Apex/TE) megatron reads ``step`` from every parameter's
        state while building the sharded state dict, which a fresh optimizer lacks;
        megatron fills dummy values the same way for its FSDP format. The values are
        overwritten by the load (lr is 0 before the first step, so the params are not).
        """
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
                opt._init_optimizer_states_with_dummy_values()

    def load(self, directory: Path) -> dict[str, Any]:
        self._materialize_optimizer_state()
        with cpu_compat.tensors_pass_as_cuda():
            state = self._sharded_state_dict(is_loading=True)
            loaded = dist_checkpointing.load(state, str(directory))
        if len(self.model) == 1:
            _unwrap(self.model[0]).load_state_dict(loaded["model"])
        else:
            for i, chunk in enumerate(self.model):
                _unwrap(chunk).load_state_dict(loaded[f"model{i}"])
        configured = _group_schedules(self.optimizer)
        self.optimizer.load_state_dict(loaded["optimizer"])
        _fuse_torch_adamw(self.optimizer)  # the loaded param_groups carry the saving run's flags
        # ... and its per-group peak/final lr: the config in effect wins (train.lr, train.lr_mult)
        for group, values in zip(_param_groups(self.optimizer), configured, strict=True):
            group.update(values)
        self.scheduler.load_state_dict(loaded["scheduler"])
        return loaded["common"]

    def unwrapped_model(self) -> torch.nn.Module:
        return _unwrap(self.model[0])
