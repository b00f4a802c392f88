"""Every third-party attribute this project patches, wraps, overrides or mimics, in one table.

Scope is the row's ``how``: ``global`` and ``replace`` are process-wide (for the life of the
process once set), ``scoped`` is restored when its ``with`` block or call ends, ``override``
is a subclass of ours (swapped in where megatron builds the object itself), ``call`` / ``read``
rely on an upstream name without changing it.

A patch of upstream code is only right for the upstream code it was written against.
Each row names the attribute (``"module:qualname"``), what of its signature the patch
relies on, and which module of ours patches it; :func:`problems` checks the rows against
what is installed (``tests/unit/test_cpu_compat.py`` walks the whole table; :func:`apply`
of this package checks its own rows before patching), so a megatron-core, DeepSpeed or
torch upgrade fails with the target's name instead of silently running half-patched code.

This module imports nothing of megatron or DeepSpeed until a row is checked.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """One patched (or relied-on) third-party attribute.

    ``params``: parameter names the patch relies on, in signature order (a subsequence of
    the installed signature; all of it with ``exact``, for a stand-in that must accept
    exactly what callers pass); ``None`` for a non-callable (a module global, an instance
    attribute). ``uses``: global / attribute names the upstream code must still reference
    (the patch changes or mirrors what they do). ``how``: replace (ours stands in), wrap
    (ours calls the original), scoped (replaced within a ``with`` block or one call),
    global (a module global rebound), override (a subclass method), call / read (relied on).
    """

    target: str
    params: tuple[str, ...] | None
    patched_by: str
    how: str
    exact: bool = False
    uses: tuple[str, ...] = ()


# Modules whose global ``torch`` the CPU facade replaces: they only use CUDA to place small
# buffers/flags or to synchronise.
FACADE_MODULES = (
    "megatron.core.utils",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.transformer.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    # MoE: the router places its weight and expert-bias buffers on the current device; the all-to-all
    # dispatcher copies token counts to the host on a side stream
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.token_dispatcher",
)

SHIMS = "parallel.cpu_compat.shims"
VERSION_FIXES = "parallel.cpu_compat.version_fixes"
_CHECKSUMS = "parallel.checksums"
_WRITER = "parallel.async_writer"
_DISTOPT = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer"
_FS_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_ASYNC_UTILS = "megatron.core.dist_checkpointing.strategies.async_utils"
_CLIP_PARAMS = ("parameters", "max_norm", "total_norm", "use_decoupled_grad")
_ZERO3 = "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3"
_ZERO12 = "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer"
_DS_ENGINE = "parallel.deepspeed_engine"
_ATTENTION = "megatron.core.transformer.attention"
_EMBEDDINGS = "megatron.core.models.common.embeddings"
_ROTARY = ("t", "freqs", "config", "cu_seqlens", "mscale", "cp_group")
_GPT = "pretrain.model.gpt"
_DDP = "megatron.core.distributed.distributed_data_parallel:DistributedDataParallel"

TARGETS: tuple[Target, ...] = (
    # version fixes (cpu_compat/version_fixes.py)
    Target(
        f"{_DISTOPT}._set_main_param_and_optimizer_states",
        ("self", "model_param", "tensors"),
        VERSION_FIXES,
        "replace",
        exact=True,
        uses=("model_param_group_index_map", "use_precision_aware_optimizer_no_fp8_or_ds_fp8"),
    ),
    Target(f"{_DISTOPT}.load_state_dict", ("self", "state_dict"), VERSION_FIXES, "wrap", exact=True),
    Target("megatron.core.optimizer.distrib_optimizer:HAVE_APEX_OR_TE", None, VERSION_FIXES, "read"),
    Target("megatron.core.optimizer.clip_grads:l2_norm_impl", None, VERSION_FIXES, "global"),
    Target(  # a scale of another shape (a backward outside the schedule made it) is replaced, not copied into
        "megatron.core.transformer.moe.moe_utils:MoEAuxLossAutoScaler.set_loss_scale",
        ("scale",),
        VERSION_FIXES,
        "wrap",
        exact=True,
        uses=("main_loss_backward_scale", "copy_"),
    ),
    Target(  # skipped unless the config keeps the router state it resets
        "megatron.core.distributed.finalize_model_grads:reset_model_temporary_tensors",
        ("config", "model"),
        VERSION_FIXES,
        "wrap",
        exact=True,
        uses=("moe_router_enable_expert_bias", "moe_router_load_balancing_type"),
    ),
    Target(
        "megatron.core.utils:local_multi_tensor_l2_norm",
        ("chunk_size", "noop_flag", "tensor_lists", "per_tensor"),
        VERSION_FIXES,
        "replace",
    ),
    Target(  # its module global te_general_gemm, left undefined without Transformer Engine
        "megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction.forward",
        ("ctx", "inp", "weight", "bias", "router_dtype"),
        VERSION_FIXES,
        "global",
        uses=("te_general_gemm",),
    ),
    # CPU-only shims (cpu_compat/shims.py)
    *(Target(f"{name}:torch", None, SHIMS, "global") for name in FACADE_MODULES),
    Target("megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32", _CLIP_PARAMS, SHIMS, "replace", True),
    Target("megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32", _CLIP_PARAMS, SHIMS, "replace", True),
    Target(
        "megatron.core.tensor_parallel.random:CudaRNGStatesTracker",
        ("use_cudagraphable_rng", "is_inference_rng_tracker"),
        SHIMS,
        "replace",
    ),
    Target("megatron.core.tensor_parallel.random:initialize_rng_tracker", ("force_reset",), SHIMS, "call"),
    Target(
        "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
        ("device", "clone", "graph_safe"),
        SHIMS,
        "replace",
        exact=True,
    ),
    Target(
        "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
        ("new_state", "device", "graph_safe"),
        SHIMS,
        "replace",
        exact=True,
    ),
    Target(
        "megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu",
        ("tensor", "as_numpy", "record_stream"),
        SHIMS,
        "replace",
        exact=True,
    ),
    Target(  # gathers uneven tensors through the facade's torch.distributed.all_gather
        "megatron.core.tensor_parallel.mappings:_gather_along_first_dim",
        ("input_", "group", "output_split_sizes"),
        SHIMS,
        "read",
        uses=("distributed", "all_gather"),
    ),
    # the facade's all_reduce stands in for it (returns at once over a group of one rank)
    Target("torch.distributed:all_reduce", ("tensor", "op", "group", "async_op"), SHIMS, "call", exact=True),
    Target("torch:Tensor.type", None, SHIMS, "scoped"),
    Target("torch:Tensor.cuda", None, SHIMS, "scoped"),
    # checkpoint checksums (checksums.py; the DeepSpeed wrapper is installed by deepspeed_engine.py)
    Target(f"{_FS_ASYNC}:FileSystemWriterAsync.write_preloaded_data", (), _CHECKSUMS, "global", uses=("open",)),
    Target(
        "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine:TorchCheckpointEngine.save",
        ("self", "state_dict", "path"),
        _CHECKSUMS,
        "wrap",
        exact=True,
    ),
    # the results-queue Manager dies with the trainer (process_hygiene.py)
    Target(
        f"{_FS_ASYNC}:_get_write_results_queue",
        (),
        "parallel.process_hygiene",
        "replace",
        exact=True,
        uses=("_results_queue", "mp", "Manager"),
    ),
    Target(f"{_FS_ASYNC}:_results_queue", None, "parallel.process_hygiene", "read"),
    # a synchronous save's results stay in-process: megatron reads them back with get_nowait()
    Target(
        f"{_FS_ASYNC}:FileSystemWriterAsync.retrieve_write_results",
        ("self",),
        "parallel.process_hygiene",
        "call",
        uses=("results_queue", "get_nowait"),
    ),
    # megatron's fusions compiled at their first call (lazy_fusions.py): jit_fuser rebound after
    # megatron.core.jit sets it to torch.compile
    Target("megatron.core.jit:jit_fuser", None, "parallel.lazy_fusions", "global"),
    Target("megatron.core.jit:enable_jit_fuser", (), "parallel.lazy_fusions", "read", exact=True, uses=("compile",)),
    # one data-parallel rank: gradients stay autograd's own; megatron's buffer, copy and reduction off
    *(
        Target(f"{_DDP}.{name}", params, "parallel.inplace_grads", "override", exact=True, uses=uses)
        for name, params, uses in (
            ("_make_backward_post_hook", ("self", "param"), ()),
            ("zero_grad_buffer", ("self",), ("buffers", "expert_parallel_buffers", "reset")),
            ("finish_grad_sync", ("self", "force_all_reduce"), ("bucket_groups", "expert_parallel_bucket_groups")),
            ("scale_gradients", ("self", "scaling_factor"), ("buffers", "expert_parallel_buffers")),
        )
    ),
    Target(  # ... the skip relies on what the buckets do with gradients
        "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup.start_grad_sync",
        ("self", "force_all_reduce"),
        "parallel.inplace_grads",
        "read",
        uses=("gradient_scaling_factor", "check_for_nan_in_grad", "check_for_large_grads", "all_reduce"),
    ),
    Target(  # ... and megatron falling back to .grad where a parameter has no main_grad
        "megatron.core.distributed.finalize_model_grads:_get_main_grad_attr",
        ("param",),
        "parallel.inplace_grads",
        "read",
        exact=True,
    ),
    Target(f"{_FS_ASYNC}:mp", None, "parallel.process_hygiene", "read"),
    # the persistent checkpoint writer (async_writer.py)
    Target(f"{_ASYNC_UTILS}:AsyncCallsQueue._get_async_caller", ("self",), _WRITER, "replace", True),
    Target(f"{_ASYNC_UTILS}:AsyncCaller.schedule_async_call", ("self", "async_req"), _WRITER, "override", True),
    Target(
        f"{_ASYNC_UTILS}:AsyncCaller.is_current_async_call_done",
        ("self", "blocking", "no_dist"),
        _WRITER,
        "override",
        exact=True,
    ),
    Target(f"{_ASYNC_UTILS}:AsyncCaller.close", ("self", "abort"), _WRITER, "override", exact=True),
    Target(f"{_ASYNC_UTILS}:AsyncCaller.sync_all_async_calls", ("self", "is_alive"), _WRITER, "call"),
    Target(f"{_ASYNC_UTILS}:AsyncRequest", ("async_fn", "async_fn_args", "preload_fn"), _WRITER, "read"),
    Target(  # called positionally, once per bucket
        f"{_FS_ASYNC}:FileSystemWriterAsync.write_preloaded_data",
        ("transform_list", "local_proc_idx", "write_bucket", "results_queue", "count_queue", "use_fsync", "kwargs"),
        _WRITER,
        "call",
        exact=True,
    ),
    Target(  # mimicked by async_writer._write, which reads the request's partial of it
        f"{_FS_ASYNC}:FileSystemWriterAsync.write_preloaded_data_multiproc",
        ("transform_list", "use_msc", "rank", "write_buckets", "global_results_queue"),
        _WRITER,
        "call",
        exact=True,
    ),
    # DeepSpeed engine: instance-level wraps and the scoped skipped-step override (deepspeed_engine.py)
    Target("deepspeed.runtime.engine:DeepSpeedEngine.module_state_dict", (), "parallel.deepspeed_engine", "wrap"),
    Target(f"{_ZERO3}._overflow_check_and_loss_scale_update", (), "parallel.deepspeed_engine", "scoped"),
    Target(f"{_ZERO3}.overflow", None, "parallel.deepspeed_engine", "scoped"),
    Target(f"{_ZERO12}.check_overflow", (), "parallel.deepspeed_engine", "scoped"),
    Target(f"{_ZERO12}.check_grad_overflow", None, "parallel.deepspeed_engine", "scoped"),
    Target(f"{_ZERO12}.overflow", None, "parallel.deepspeed_engine", "scoped"),
    Target("torch.optim:Optimizer.step", (), "parallel.deepspeed_engine", "scoped"),
    # DeepSpeed engine: a resume at another dp loads through a universal checkpoint, converted in-process
    # (an instance attribute of the engine's DeepSpeedConfig, set per load; the engine's accessor reads it)
    Target("deepspeed.runtime.engine:DeepSpeedEngine.load_universal_checkpoint", ("self",), _DS_ENGINE, "read", True),
    Target("deepspeed.checkpoint.ds_to_universal:parse_arguments", (), _DS_ENGINE, "scoped", exact=True),  # sys.argv
    Target("deepspeed.checkpoint.ds_to_universal:main", ("args",), _DS_ENGINE, "call", exact=True),
    # the CPU model (pretrain/model/): process-wide, set when a local-spec model is built
    Target(f"{_ATTENTION}:apply_rotary_pos_emb", _ROTARY, "pretrain.model.layers", "global", exact=True),
    Target(  # swapped in after construction (__class__): megatron builds the embedding itself
        f"{_EMBEDDINGS}.language_model_embedding:LanguageModelEmbedding.forward",
        ("self", "input_ids", "position_ids", "tokentype_ids"),
        "pretrain.model.gpt",
        "override",
        exact=True,
    ),
    Target(
        f"{_EMBEDDINGS}.rotary_pos_embedding:RotaryEmbedding.forward",
        ("self", "max_seq_len", "offset", "packed_seq", "cp_group"),
        "pretrain.model.gpt",
        "override",
        exact=True,
    ),
    Target(
        f"{_EMBEDDINGS}.rotary_pos_embedding:RotaryEmbedding.get_rotary_seq_len",
        ("self", "inference_context", "transformer", "transformer_input", "transformer_config", "packed_seq_params"),
        "pretrain.model.gpt",
        "override",
    ),
    Target("megatron.core.transformer.mlp:MLP.forward", ("self", "hidden_states", "per_token_scale"), _GPT, "override"),
    Target("megatron.core.tensor_parallel:ColumnParallelLinear.forward", ("self", "input_"), _GPT, "override"),
    # in-loop evaluation: lm-eval's per-task progress bar, silenced within one evaluation and restored
    Target("lm_eval.api.task:tqdm", None, "pretrain.eval.in_loop", "scoped"),
    # fine-tuning's two-phase lr (finetune.head_only_epochs): a global optimizer pre-hook, removed at the end
    Target("torch.optim.optimizer:register_optimizer_step_pre_hook", ("hook",), "pretrain.tasks.finetune", "call"),
)

_DISTRIBUTIONS = {"megatron": "megatron-core", "deepspeed": "deepspeed", "torch": "torch", "lm_eval": "lm-eval"}


class InstanceAttribute:
    """What :func:`resolve` returns for an attribute a class's ``__init__`` assigns."""

    def __init__(self, owner: type, name: str):
        self.owner, self.name = owner, name


def _assigned_in_init(cls: type, name: str) -> bool:
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        code = getattr(inspect.unwrap(init), "__code__", None) if init is not None else None
        if code is not None and name in code.co_names:
            return True
    return False


def resolve(target: str) -> Any:
    """The object ``"module:qualname"`` names now (ours, where a patch is in place)."""
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    parts = qualname.split(".")
    for i, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif i == len(parts) - 1 and isinstance(obj, type) and _assigned_in_init(obj, part):
            return InstanceAttribute(obj, part)
        else:
            raise AttributeError(f"{module_name} has no {'.'.join(parts[: i + 1])!r}")
    return obj


def is_ours(obj: Any) -> bool:
    return str(getattr(obj, "__module__", "") or "").startswith(("parallel.", "pretrain."))


def upstream(obj: Any) -> Any:
    """Through our replacements (they keep the original as ``__wrapped__``) to upstream's object."""
    while is_ours(obj) and hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    return obj


def _names(obj: Any, follow_wrapped: bool = True) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(obj, follow_wrapped=follow_wrapped).parameters)
    except (TypeError, ValueError):
        return None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in _DISTRIBUTIONS.values():
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _problem(row: Target) -> str | None:
    try:
        live = resolve(row.target)
    except (ImportError, AttributeError) as exc:
        return f"is gone ({exc})"
    obj = upstream(live)
    if row.params is not None:
        names = _names(obj)
        if names is None:
            return "has no signature to check"
        remaining = iter(names)
        if (names != row.params) if row.exact else not all(p in remaining for p in row.params):
            relation = "exactly" if row.exact else "in this order"
            return f"has parameters {names}; the patch relies on {row.params} ({relation})"
        if row.exact and is_ours(live) and live is not obj and _names(live, follow_wrapped=False) != row.params:
            return f"our replacement takes {_names(live, follow_wrapped=False)}, not {row.params}"
    if row.uses and not is_ours(obj):  # upstream code unreachable when replaced without __wrapped__
        code = getattr(inspect.unwrap(obj), "__code__", None)
        missing = [name for name in row.uses if code is None or name not in code.co_names]
        if missing:
            return f"no longer references {missing} (the patch changes or mirrors what it does with them)"
    return None


def problems(rows: tuple[Target, ...] = TARGETS) -> list[str]:
    """One line per row that no longer matches the installed packages (empty: all match)."""
    found = []
    for row in rows:
        problem = _problem(row)
        if problem is not None:
            dist = _DISTRIBUTIONS.get(row.target.partition(":")[0].split(".")[0], "")
            installed = versions()
            where = f"megatron-core {installed['megatron-core']}"
            if dist and dist != "megatron-core":
                where += f", {dist} {installed[dist]}"
            found.append(
                f"{row.target} (patched by {row.patched_by}) {problem} with {where}: re-check the patch "
                "against upstream and update parallel/cpu_compat/targets.py"
            )
    return found


def verify(patched_by: tuple[str, ...]) -> None:
    """Raise, naming every mismatch, unless the rows of the given modules of ours all match."""
    found = problems(tuple(row for row in TARGETS if row.patched_by in patched_by))
    if found:
        raise RuntimeError("cpu_compat: patch targets changed upstream:\n  " + "\n  ".join(found))
