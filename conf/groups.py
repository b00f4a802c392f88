"""The typed config groups, one dataclass per group: its keys, their types, defaults and checks.

``conf/schema.py`` assembles them into the commands' root schemas and validates a composed config.
"""

from __future__ import annotations

import netrc
import os
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, ListConfig

from conf.errors import UserError
from conf.moe import check_moe, check_moe_parallel

LR_SCHEDULES = ("cosine", "linear", "constant", "inverse-square-root")
TASK_TYPES = ("classification", "entailment", "similarity", "multiple_choice")  # data/tasks.py reads them


def _positive(key: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{key}={value:g}: must be > 0")


def _at_least(key: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise UserError(f"{key}={value:g}: must be >= {low:g}")


def _fraction(key: str, value: float, closed: bool = True) -> None:
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise UserError(f"{key}={value:g}: must be in [0, 1{']' if closed else ')'}")


@dataclass
class ModelConfig:
    """The GPT's shape (``conf/model/*.yaml`` presets name one) and how it is built."""

    name: str = MISSING  # the preset's name (run.dir defaults to runs/<name>)
    num_layers: int = MISSING  # transformer blocks
    num_heads: int = MISSING  # attention (query) heads
    hidden_size: int = MISSING  # model width d (divisible by num_heads)
    ffn_hidden_size: int = MISSING  # MLP width (swiglu: the gated width)
    seq_len: int = MISSING  # context length
    dropout: float = 0.0  # dropout probability of attention and hidden states (0: off)
    init_std: float = 0.02  # GPT-2 init; residual projections scaled by 1/sqrt(2*num_layers)
    tie_embeddings: bool = True  # output layer = input embedding
    layernorm_eps: float = 1.0e-5  # epsilon of every norm (LayerNorm or RMSNorm)
    # architecture options (megatron-core implements each); the defaults are GPT-2's shape
    position: str = "learned"  # learned (absolute, GPT-2) | rope (rotary, Llama)
    rope_theta: float = 10000.0  # rotary base
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu (GPT-2) | swiglu (gated SiLU, Llama)
    num_query_groups: int | None = None  # key/value heads: None = num_heads (MHA), 1 = MQA, else GQA
    qk_norm: bool = False  # normalise queries and keys per head (OLMo-2, Qwen3)
    bias: bool = True  # biases in the attention and MLP linear layers
    recompute: str = "none"  # activation recomputation: none | selective (core attention) | full (each layer)
    spec: str = "auto"  # auto (Transformer Engine on CUDA when installed, else local) | te | local
    attention: str = "sdpa"  # local spec's core attention: sdpa (fused) | megatron (unfused)
    vocab_multiple: int = 128  # vocab padded to a multiple of this (must be divisible by parallel.tp)
    # Mixture-of-Experts: megatron-core's MoE layer in place of the MLP (pretrain/model/moe.py); null: dense
    num_experts: int | None = None  # routed experts per MoE layer
    moe_topk: int = 2  # experts each token is routed to
    moe_ffn_hidden_size: int | None = None  # one expert's FFN width; null: ffn_hidden_size
    moe_layer_freq: Any = 1  # N: layers 0, N, 2N, ... are MoE, the rest dense; or a 0/1 list, one per layer
    moe_shared_expert_size: int | None = None  # FFN width of the always-on shared expert(s); null: none
    moe_score_function: str = "softmax"  # router scores: softmax | sigmoid (DeepSeek-V3)
    moe_norm_topk_prob: bool = True  # top-k weights renormalised to sum 1 (Mixtral, Qwen3); false: OLMoE's
    moe_load_balancing: str = "aux_loss"  # aux_loss (per micro-batch) | seq_aux_loss (per sequence) | none
    moe_aux_loss_coeff: float = 0.01  # weight of the load-balancing loss in the loss optimised
    moe_z_loss_coeff: float = 0.0  # router z-loss weight (ST-MoE); 0: off
    moe_expert_bias: bool = False  # aux-loss-free balancing: a per-expert routing bias (needs sigmoid)
    moe_expert_bias_rate: float = 1.0e-3  # the expert bias's update per step
    moe_capacity_factor: float | None = None  # null: dropless; else an expert takes <= factor x its fair share
    moe_drop_policy: str = "probs"  # over capacity, drop the lowest-probability (probs) or latest (position) tokens
    moe_router_dtype: str = "fp32"  # router logits and probabilities: fp32 | fp64 | model (the compute dtype)

    def check(self) -> None:
        for key in ("num_layers", "num_heads", "hidden_size", "ffn_hidden_size", "seq_len", "vocab_multiple"):
            _at_least(f"model.{key}", getattr(self, key), 1)
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        _fraction("model.dropout", self.dropout, closed=False)
        _positive("model.init_std", self.init_std)
        _positive("model.layernorm_eps", self.layernorm_eps)
        for key, value, choices in (
            ("position", self.position, ("learned", "rope")),
            ("norm", self.norm, ("layernorm", "rmsnorm")),
            ("mlp", self.mlp, ("gelu", "swiglu")),
            ("recompute", self.recompute, ("none", "selective", "full")),
        ):
            if value not in choices:
                raise UserError(f"model.{key}={value}: expected {' or '.join(choices)}")
        _positive("model.rope_theta", self.rope_theta)
        if self.num_query_groups is not None:
            _at_least("model.num_query_groups", self.num_query_groups, 1)
            if self.num_heads % self.num_query_groups:
                raise UserError(
                    f"model.num_heads={self.num_heads} is not divisible by "
                    f"model.num_query_groups={self.num_query_groups}"
                )
        if self.spec not in ("auto", "te", "local"):
            raise UserError(f"model.spec={self.spec}: expected auto, te or local")
        if self.attention not in ("sdpa", "megatron"):
            raise UserError(f"model.attention={self.attention}: expected sdpa or megatron")
        if self.num_experts is not None:
            check_moe(self)


@dataclass
class ParallelConfig:
    """Engine and layout. The data-parallel size is derived (world_size / (tp*pp)); the checks that
    need the world size live in ``parallel/topology.py``."""

    engine: str = "megatron"  # megatron | deepspeed
    tp: int = 1  # tensor-parallel size (divides heads, query groups, FFN width and vocab_multiple)
    pp: int = 1  # pipeline-parallel stages (pp * vpp divides num_layers)
    vpp: int = 1  # virtual pipeline chunks per stage (interleaved 1F1B)
    sequence_parallel: bool = True  # with tp > 1
    distributed_optimizer: Any = "auto"  # ZeRO-1 (megatron): auto = dp > 1, or what the checkpoint used
    zero_stage: int = 0  # deepspeed engine: 0-3
    offload: str = "none"  # deepspeed engine: none | cpu
    timeout_s: float = 600  # collective timeout, and the watchdog's limit for one step / eval / save
    ep: int = 1  # expert parallelism (megatron): each MoE layer's experts split over ep ranks; ep divides dp
    # how tokens reach their experts' ranks: alltoall | allgather | auto (alltoall at ep > 1, else allgather:
    # with the experts on every rank the all-to-all dispatcher only adds one-rank collectives and sorts)
    moe_dispatcher: str = "auto"
    straggler_every: int = 50  # steps per straggler window: ranks share their compute time per step (0: off)
    straggler_factor: float = 1.5  # a rank slower than this x the median of its pipeline stage's ranks is slow
    straggler_windows: int = 3  # windows in a row a rank must be slow before it is named (a line and an event)

    def check(self) -> None:
        if self.engine not in ("megatron", "deepspeed"):
            raise UserError(f"parallel.engine={self.engine}: expected megatron or deepspeed")
        for key in ("tp", "pp", "vpp"):
            if getattr(self, key) < 1:
                raise UserError(f"parallel.{key}={getattr(self, key)}: must be >= 1")
        value = str(self.distributed_optimizer).lower()
        if value not in ("auto", "true", "false"):
            raise UserError(f"parallel.distributed_optimizer={value}: expected true, false or auto")
        if self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"parallel.zero_stage={self.zero_stage}: expected 0, 1, 2 or 3")
        if self.offload not in ("none", "cpu"):
            raise UserError(f"parallel.offload={self.offload}: expected none or cpu")
        _positive("parallel.timeout_s", self.timeout_s)
        check_moe_parallel(self)


@dataclass
class TrainConfig:
    """Batch, optimizer (``optim/`` presets set these keys), schedule, cadence and fault policy:
    the one trainer's keys, for pretraining (these defaults) and fine-tuning (``train/finetune``)."""

    max_steps: int | None = 2000  # null (fine-tuning): epochs x (train examples // global_batch)
    micro_batch: int = 12  # sequences per forward/backward on one rank
    global_batch: int = 12  # sequences per optimizer step (accumulation = global / (micro * dp))
    lr: float = 6.0e-4  # peak learning rate (AdamW); each model preset sets its own
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from 0 to lr over this many steps
    warmup_fraction: float | None = None  # when set: warmup over this fraction of max_steps (not warmup_steps)
    lr_decay_steps: int | None = None  # null: max_steps
    lr_schedule: str = "cosine"  # cosine | linear | constant | inverse-square-root (megatron-core's scheduler)
    weight_decay: float = 0.1  # matrices only (biases and norms are not decayed)
    lr_mult: Any = None  # {parameter-name glob: factor} on those parameters' lr (megatron; typed in check())
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.99  # AdamW's second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this
    spike_factor: float | None = None  # skip a step whose loss > factor x the recent mean (non-finite: always)
    max_skipped: int = 10  # stop (exit 1, last checkpoint kept) after this many consecutive skipped steps
    bf16: bool = False  # bf16 autocast for the forward pass (fp32 master weights)
    compile: bool = False  # torch.compile the model
    seed: int = 1337  # model init, data order, dropout
    gc_every: int = 50  # Python's garbage collection every N steps, start-up objects frozen; 0: automatic
    keep_freed_memory: bool = True  # glibc: freed CPU memory is reused by the next step, not unmapped/trimmed
    eval_every: int = 250  # 0: only at the end (fine-tuning: every epoch)
    eval_micro_batch: int = 64  # sequences per forward pass on one rank in validation
    eval_batches: int | None = None  # null: the whole validation split
    save_every: int = 1000  # 0: only at the end (fine-tuning: every epoch); -1: never
    keep_last: int = 3  # checkpoints kept in run.dir/checkpoints
    async_save: bool = False  # megatron engine: write checkpoints from a background process
    checkpoint_writers: int = 2  # writer processes per rank (files per rank)
    # save at the next step boundary, exit requeue code (SIGHUP: a closed terminal or ssh session)
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGHUP"])
    requeue_exit_code: int = 75  # EX_TEMPFAIL; launch/slurm.sbatch requeues the job on it
    sample_tokens: int = 300  # printed at the end (single-process runs); 0 disables
    sample_prompt: str = ""  # the end-of-run sample's prompt ("": start from end-of-text)
    peak_tflops: float | None = None  # device peak for MFU (e.g. 989 for H100 bf16); null: a known GPU's, none on CPU
    log_samples: bool = False  # write run.dir/samples_rank<R>.jsonl: the sample ids of every step
    preflight: str = "warn"  # memory check at start (gpt-plan's estimate vs the device): warn | error | off

    def check(self) -> None:
        for key in ("lr", "micro_batch", "global_batch", "eval_micro_batch", "keep_last"):
            _positive(f"train.{key}", getattr(self, key))
        for key in (
            "max_steps",
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "eval_every",
            "sample_tokens",
            "gc_every",
        ):
            _at_least(f"train.{key}", getattr(self, key), 0)
        _fraction("train.min_lr_ratio", self.min_lr_ratio)
        if self.warmup_fraction is not None:
            _fraction("train.warmup_fraction", self.warmup_fraction)
        for key in ("beta1", "beta2"):
            _fraction(f"train.{key}", getattr(self, key), closed=False)
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"train.lr_schedule={self.lr_schedule}: expected cosine, linear or constant")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise UserError(f"train.lr_decay_steps={self.lr_decay_steps}: must be >= 1 (or null: max_steps)")
        if self.spike_factor is not None and self.spike_factor <= 1.0:
            raise UserError(f"train.spike_factor={self.spike_factor:g}: must be > 1 (or null: off)")
        for key in ("max_skipped", "checkpoint_writers", "eval_batches"):
            _at_least(f"train.{key}", getattr(self, key), 1)
        if self.save_every < -1:
            raise UserError(f"train.save_every={self.save_every}: must be >= 0 (or -1: never)")
        if not 0 <= self.requeue_exit_code <= 255:
            raise UserError(f"train.requeue_exit_code={self.requeue_exit_code}: must be in [0, 255]")
        for name in self.preempt_signals:
            if str(name).upper() not in signal.Signals.__members__:
                raise UserError(f"train.preempt_signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)")
        _positive("train.peak_tflops", self.peak_tflops)
        if self.preflight not in ("warn", "error", "off"):
            raise UserError(f"train.preflight={self.preflight}: expected warn, error or off")
        if self.lr_mult is not None:
            mults = self.lr_mult if isinstance(self.lr_mult, dict) else None
            if mults is None or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in mults.values()):
                raise UserError(f"train.lr_mult={self.lr_mult}: expected a mapping {{parameter-name glob: factor}}")
            for glob, factor in mults.items():
                _at_least(f"train.lr_mult.{glob}", factor, 0)


@dataclass
class SourceConfig:
    """One source of a mixture (``data.sources``, ``data/mixture.py``): a shard set and its weight."""

    dir: str = MISSING  # a gpt-prepare output, as data.dir
    weight: float = 1.0  # relative: the weights are normalised to sum 1 (0: the source pauses)
    name: str | None = None  # metric keys (tokens/<name>, val_loss/<name>) and resume match by it; null: dir's basename


def source_name(directory: str, name: str | None) -> str:
    """A source's name: as given, else the last component of its dir or URL."""
    return name or str(directory).rstrip("/").rsplit("/", 1)[-1]


@dataclass
class DataConfig:
    dir: str | None = None  # a gpt-prepare output directory (manifest.json + shards), http(s):// URL or pipe:COMMAND
    sources: list[SourceConfig] = field(default_factory=list)  # a weighted mixture (data/mixture.py); or data.dir
    num_streams: int = 12  # canonical streams of the global order; fixes the order for every dp dividing it
    num_workers: int = 0  # DataLoader worker processes per rank
    allow_new: bool = False  # resume on another shard set of the same tokenizer (continued pretraining)
    # remote shard sets (data/remote.py): on-disk cache of verified shards, retries, read-ahead
    cache_dir: str | None = None  # null: no disk cache
    cache_bytes: int = 10 * 2**30  # the cache's bound (least recently used shards evicted)
    retries: int = 3  # retries of a failed or corrupt download (exponential backoff), then stop naming the URL
    prefetch: int = 1  # shards read ahead per stream in background threads
    timeout_s: float = 120.0  # HTTP: seconds without progress; pipe: seconds for the whole command

    def check(self) -> None:
        if bool(self.dir) == bool(self.sources):
            if self.dir:
                raise UserError("data.dir and data.sources both set: pass one (data.dir=DIR is the one-source form)")
            raise UserError("data.dir=: required (pass data.dir=DIR, or data.sources=[{dir:DIR,weight:W,name:N},...])")
        seen: set[str] = set()
        for i, source in enumerate(self.sources):
            name = source_name(source.dir, source.name)
            if source.dir.startswith("pipe:") and not source.name:
                raise UserError(f"data.sources.{i}.name: required for a pipe: source")
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise UserError(f"data.sources.{i}.name={name}: use letters, digits, '_', '.' or '-'")
            if name in seen:
                raise UserError(f"data.sources: two sources are named {name} (set data.sources.{i}.name=...)")
            seen.add(name)
            _at_least(f"data.sources.{i}.weight", source.weight, 0)
        if self.sources and not any(s.weight > 0 for s in self.sources):
            raise UserError("data.sources: every weight is 0; at least one must be > 0")
        _at_least("data.num_streams", self.num_streams, 1)
        _at_least("data.num_workers", self.num_workers, 0)
        for key in ("retries", "prefetch"):
            _at_least(f"data.{key}", getattr(self, key), 0)
        _at_least("data.cache_bytes", self.cache_bytes, 1)
        _positive("data.timeout_s", self.timeout_s)


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # offline | online | disabled (offline never touches the network)
    project: str = "gpt-pretrain"  # the wandb project
    console_every: int = 100  # a metrics line on the console every N steps
    progress_bar: bool = True  # a tqdm bar (steps, ETA, loss) when stderr is a terminal

    def check(self) -> None:
        """``wandb``: a known mode, and credentials for ``online`` (else wandb would prompt or fail
        minutes later, after the model was built)."""
        if self.wandb not in ("offline", "online", "disabled"):
            raise UserError(f"logging.wandb={self.wandb}: expected offline, online or disabled")
        if self.wandb == "online" and not _wandb_credentials():
            raise UserError(
                "logging.wandb=online: no wandb credentials (set WANDB_API_KEY or run `wandb login`); "
                "logging.wandb=offline logs locally and syncs later with `wandb sync`"
            )
        _at_least("logging.console_every", self.console_every, 1)


EVAL_BUNDLED_TASKS = ("sentiment", "perplexity")  # conf/eval_tasks/, filled in by pretrain/evaluate.py


@dataclass
class SentimentEvalConfig:
    """gpt-eval's ``eval.sentiment`` keys: multiple choice over a text/label JSONL."""

    path: str | None = None  # JSONL with text/label (e.g. ../shared/data/rotten_tomatoes.validation.jsonl)
    fewshot_path: str | None = None  # where few-shot examples come from (default: path, minus the document)
    text_field: str = "text"  # the JSONL field holding the text
    label_field: str = "label"  # the JSONL field holding the label


@dataclass
class PerplexityEvalConfig:
    """gpt-eval's ``eval.perplexity`` keys: rolling log-likelihood of a text file."""

    path: str | None = None  # a text file; blank-line-separated paragraphs are its documents


def fewshot_counts(value: object, key: str = "num_fewshot") -> list[int]:
    """``num_fewshot`` (an int or a list) as a list of k >= 0, refused in one line otherwise."""
    shots = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    if not shots:
        raise UserError(f"{key}=[]: give at least one k (e.g. {key}=[0,1,5])")
    for k in shots:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise UserError(f"{key}={k}: each k must be an integer >= 0 (in-context examples)")
    return shots


@dataclass
class EvalConfig:
    """In-loop evaluation of gpt-pretrain (``pretrain/eval/in_loop.py``): lm-eval tasks on the weights
    being trained, every ``every_steps`` steps and at the last. The task keys are gpt-eval's, so one
    task file serves both; a task's missing path is refused here, before training, because a run
    that meant to evaluate and cannot should not find out hours later."""

    every_steps: int | None = 0  # 0 / null: off
    tasks: list[str] = field(default_factory=list)  # sentiment, perplexity, or paths of lm-eval task YAMLs
    # in-context examples (k) of every task; a list [0,5] evaluates each k (keys eval/<task>/<k>shot/<metric>)
    num_fewshot: Any = 0
    batch_size: int = 32  # sequences per scoring round (split over the data-parallel ranks)
    limit: int | None = None  # N documents of each bundled task drawn with eval.seed (a task file of yours: first N)
    seed: int = 1234  # few-shot sampling (gpt-eval's seed)
    sentiment: SentimentEvalConfig = field(default_factory=SentimentEvalConfig)
    perplexity: PerplexityEvalConfig = field(default_factory=PerplexityEvalConfig)

    def check(self) -> None:
        _at_least("eval.every_steps", self.every_steps, 0)
        fewshot_counts(self.num_fewshot, "eval.num_fewshot")
        _at_least("eval.batch_size", self.batch_size, 1)
        _at_least("eval.limit", self.limit, 1)
        if not self.every_steps:
            return  # off: the tasks are not read
        if not self.tasks:
            raise UserError(
                f"eval.every_steps={self.every_steps}: eval.tasks is empty "
                f"(bundled: {', '.join(EVAL_BUNDLED_TASKS)}; or the path of an lm-eval task YAML)"
            )
        for task in self.tasks:
            if task in EVAL_BUNDLED_TASKS:
                if not getattr(self, task).path:
                    what = "JSONL (text/label)" if task == "sentiment" else "TEXT_FILE"
                    raise UserError(f"eval.tasks=[{task}] needs eval.{task}.path={what}")
            elif not str(task).endswith((".yaml", ".yml")):
                raise UserError(
                    f"eval.tasks: unknown task {task!r} (bundled: {', '.join(EVAL_BUNDLED_TASKS)}; "
                    "or the path of an lm-eval task YAML)"
                )
            elif not Path(task).expanduser().is_file():
                raise UserError(f"eval.tasks: {task}: no such file")


@dataclass
class RunConfig:
    dir: str = "runs/${model.name}"  # resumes automatically when it holds a checkpoint
    restart: bool = False  # start over at step 0 in a run dir with checkpoints (they move to restarted-<time>/)
    takeover: bool = False  # take run.dir's lease from a holder that is gone (parallel/run_lease.py)
    lease_expiry_s: float = 300.0  # a lease whose heartbeat is older than this is stale (exceed the clock skew)

    def check(self) -> None:
        if not self.dir:
            raise UserError("run.dir=: must name a directory")
        _positive("run.lease_expiry_s", self.lease_expiry_s)


@dataclass
class InitConfig:
    checkpoint: str = MISSING  # a pretraining run dir or checkpoints/step_<N> dir (either engine, any layout)

    def check(self) -> None:
        pass


@dataclass
class TaskConfig:
    """A labelled fine-tuning task: JSONL files whose fields depend on ``type`` (see the README)."""

    type: str = "classification"  # classification | entailment | similarity | multiple_choice
    train: str = MISSING  # the labelled training JSONL
    validation: str = MISSING  # the labelled validation JSONL (val_acc, val_loss every epoch)
    test: str | None = None  # optional: results.json then also has test_acc
    max_train_examples: int | None = None  # use this many train examples (a seeded sample); null: all
    max_len: int | None = None  # tokens per framed sequence; null: the pretrained context (model.seq_len)

    def check(self) -> None:
        if self.type not in TASK_TYPES:
            raise UserError(f"task.type={self.type}: expected one of {', '.join(TASK_TYPES)}")
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise UserError(f"task.max_train_examples={self.max_train_examples}: must be >= 1")
        _at_least("task.max_len", self.max_len, 1)


@dataclass
class FinetuneConfig:
    aux_lm_weight: float = 0.5  # λ in L3 = L2 + λ·L1 (GPT-1: 0.5); 0 disables the auxiliary LM loss
    from_scratch: bool = False  # true: same architecture and tokenizer, random weights (the baseline)
    epochs: int = 3  # GPT-1: 3
    classifier_dropout: float = 0.1  # dropout before the task head (GPT-1: 0.1)
    head_lr_mult: float = 1.0  # the new head's learning rate = train.lr x this (the body keeps train.lr)
    # keep the embeddings + the first K blocks of the checkpoint, the rest as from_scratch (GPT-1 Fig. 2);
    # null: all. The range (0 ... model.num_layers) is checked against the checkpoint (pretrain/tasks/finetune.py)
    transfer_layers: int | None = None
    head_only_epochs: int = 0  # LP-FT: epochs training only the head (body frozen) before `epochs` of full fine-tuning

    def check(self) -> None:
        _at_least("finetune.aux_lm_weight", self.aux_lm_weight, 0)
        _at_least("finetune.epochs", self.epochs, 1)
        _fraction("finetune.classifier_dropout", self.classifier_dropout, closed=False)
        if self.head_lr_mult <= 0:
            raise UserError(f"finetune.head_lr_mult={self.head_lr_mult}: must be > 0")
        if self.transfer_layers is not None and self.transfer_layers < 0:
            raise UserError(f"finetune.transfer_layers={self.transfer_layers}: must be >= 0 (or null: all layers)")
        if self.transfer_layers is not None and self.from_scratch:
            raise UserError(
                f"finetune.transfer_layers={self.transfer_layers} with finetune.from_scratch=true: "
                "nothing is transferred from scratch; drop one of them"
            )
        _at_least("finetune.head_only_epochs", self.head_only_epochs, 0)


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


@dataclass
class HardwareConfig:
    """The machine a plan is for (gpt-plan, and gpt-pretrain's preflight): ``conf/hardware/*.yaml``.

    Rates are per device. ``matmul_efficiency`` is the fraction of the peak the model's matrix
    products reach, calibrated against measured runs (benchmarks/README.md); ``calibrate`` measures
    peak, memory bandwidth and collectives on this machine instead (the ``cpu`` preset does).
    Memory is in GiB (2**30 bytes, as torch and nvidia-smi count it)."""

    name: str = "auto"  # auto: this machine (its GPU's preset, or cpu)
    memory_gb: float | None = None  # per device; null: detected (GPU memory; host RAM / processes on a CPU)
    peak_tflops_bf16: float | None = None  # dense datasheet peak
    peak_tflops_fp32: float | None = None  # dense datasheet peak in fp32 (train.bf16=false)
    matmul_efficiency: float = 0.5  # fraction of the peak the model's matrix products reach
    memory_bandwidth_gbps: float | None = None  # device memory (HBM) GB/s: element-wise ops, optimizer step
    intra_node_gbps: float | None = None  # collective bus bandwidth per device inside a node (NVLink)
    inter_node_gbps: float | None = None  # per device between nodes (InfiniBand / RoCE)
    pcie_gbps: float | None = None  # host <-> device (CPU offload)
    host_gbps: float = 20.0  # host memory bandwidth the offloaded optimizer step reaches
    latency_us: float = 10.0  # per collective / point-to-point message
    layer_overhead_us: float = 0.0  # per layer and micro-batch (forward + backward): op dispatch, small kernels
    gpus_per_node: int = 8  # devices (ranks) per node; on a CPU, processes
    nodes: int = 1  # world size = gpus_per_node x nodes
    calibrate: bool | None = None  # null: measure on this machine for cpu (and auto without a GPU)

    def check(self) -> None:
        for key in ("gpus_per_node", "nodes"):
            _at_least(f"hardware.{key}", getattr(self, key), 1)
        for key in ("memory_gb", "peak_tflops_bf16", "peak_tflops_fp32", "memory_bandwidth_gbps", "host_gbps"):
            _positive(f"hardware.{key}", getattr(self, key))
        for key in ("intra_node_gbps", "inter_node_gbps", "pcie_gbps"):
            _positive(f"hardware.{key}", getattr(self, key))
        _at_least("hardware.latency_us", self.latency_us, 0)
        _at_least("hardware.layer_overhead_us", self.layer_overhead_us, 0)
        if not 0 < self.matmul_efficiency <= 1:
            raise UserError(f"hardware.matmul_efficiency={self.matmul_efficiency:g}: must be in (0, 1]")
