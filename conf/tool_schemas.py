"""The schemas of the commands that read a checkpoint: gpt-eval, gpt-generate, gpt-export, gpt-import.

Why typed, as gpt-pretrain's groups (``conf/groups.py``) are: their YAML files (``conf/eval.yaml``, ...)
are composed on these dataclasses (Hydra's ConfigStore: ``eval_schema``, ``generate_schema``,
``export_schema``, ``import_schema``), so a misspelt key or a value of the wrong type is refused while
composing, and :func:`typed` turns a composed config into the dataclass (``OmegaConf.to_object``) and
runs its ``check()`` before any checkpoint is read. The commands read that object, never the
``DictConfig``: the defaults live here once. Every refusal is one ``UserError`` line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from conf.errors import UserError
from conf.groups import PerplexityEvalConfig, SentimentEvalConfig, fewshot_counts
from conf.schema import ROOTS, one_line

# gpt-eval's tasks: lm-eval's bundled ones (conf/eval_tasks, filled in by pretrain/evaluate.py) and the
# classifier head of a gpt-finetune checkpoint (pretrain/eval/classifier.py)
LM_TASKS = ("sentiment", "perplexity")
CLASSIFIER = "classifier"
EVAL_TASKS = (*LM_TASKS, CLASSIFIER)


def _at_least(key: str, value: float | None, low: float) -> None:
    if value is not None and (isinstance(value, bool) or value < low):
        raise UserError(f"{key}={value}: must be >= {low:g}")


def _given(key: str, value: str) -> None:
    if not str(value).strip():
        raise UserError(f"{key}=: empty; pass {key}=...")


@dataclass
class EvalRunConfig:
    """Where gpt-eval writes (``run.dir``)."""

    dir: str = MISSING  # results.json, results_k<K>.json, results.md, accuracy_vs_k.png; new, empty or gpt-eval's


@dataclass
class ClassifierEvalConfig:
    """gpt-eval's ``eval.classifier`` keys: a fine-tuned checkpoint's head on a labelled task file."""

    path: str | None = None  # JSONL in the fine-tuning task's format; null: the run's task.test, else task.validation


@dataclass
class EvalTaskFiles:
    """The local files gpt-eval's tasks read (``eval.*``); the in-loop evaluation has the same
    sentiment and perplexity keys, so one task file serves both."""

    sentiment: SentimentEvalConfig = field(default_factory=SentimentEvalConfig)  # tasks=[sentiment]'s JSONL
    perplexity: PerplexityEvalConfig = field(default_factory=PerplexityEvalConfig)  # tasks=[perplexity]'s text
    classifier: ClassifierEvalConfig = field(default_factory=ClassifierEvalConfig)  # tasks=[classifier]'s JSONL


@dataclass
class EvalRoot:
    """gpt-eval: zero/one/few-shot evaluation through lm-eval, perplexity, and a fine-tuned classifier."""

    checkpoint: str = MISSING  # a run dir (its newest intact step) or a checkpoints/step_<N> dir, any layout
    # null: the checkpoint's own: [classifier] for a gpt-finetune run, else [sentiment, perplexity]
    tasks: Any = None
    num_fewshot: Any = field(default_factory=lambda: [0, 1, 5])  # an int >= 0 or a list; accuracy vs k is plotted
    run: EvalRunConfig = field(default_factory=EvalRunConfig)  # where the results go
    batch_size: int = 32  # sequences per scoring round
    limit: int | None = None  # evaluate N documents of each task, a seeded sample spread over the split; null: all
    seed: int = 1234  # few-shot examples and the limit's sample
    eval: EvalTaskFiles = field(default_factory=EvalTaskFiles)  # the tasks' local files

    def task_names(self) -> list[str] | None:
        """``tasks`` as a list (``tasks=sentiment`` is one task); None: the checkpoint decides."""
        if self.tasks is None:
            return None
        return [str(t) for t in self.tasks] if isinstance(self.tasks, list | tuple) else [str(self.tasks)]

    def check(self) -> None:
        _given("checkpoint", self.checkpoint)
        _given("run.dir", self.run.dir)
        names = self.task_names()
        if names is not None and not names:
            raise UserError(f"tasks=[]: give at least one ({', '.join(EVAL_TASKS)}) or null (the checkpoint's own)")
        for name in names or ():
            if name not in EVAL_TASKS:
                raise UserError(f"tasks={name}: unknown (bundled: {', '.join(EVAL_TASKS)})")
        fewshot_counts(self.num_fewshot)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("limit", self.limit, 1)


@dataclass
class GenerateRoot:
    """gpt-generate: sample from a checkpoint (temperature, top-k, seeded)."""

    checkpoint: str = MISSING  # a run dir (its newest intact step) or a checkpoints/step_<N> dir, any layout
    prompt: str = ""  # the text to continue; empty: start from end-of-text
    max_new_tokens: int = 200  # tokens to sample (>= 1)
    temperature: float = 0.8  # >= 0; 0: greedy
    top_k: int | None = 200  # sample among the k likeliest tokens; 0 or null: all of them
    seed: int = 0  # the same seed gives the same text

    def check(self) -> None:
        _given("checkpoint", self.checkpoint)
        _at_least("max_new_tokens", self.max_new_tokens, 1)
        if self.temperature < 0:
            raise UserError(f"temperature={self.temperature:g}: must be a number >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k={self.top_k}: must be >= 0 (0 or null: no top-k)")


@dataclass
class ExportRoot:
    """gpt-export: a checkpoint of any layout -> a transformers directory (GPT-2, Llama or Qwen3)."""

    checkpoint: str = MISSING  # a run dir (its newest intact step) or a checkpoints/step_<N> dir, any layout
    out: str = MISSING  # the transformers directory to write: new, empty or an earlier gpt-export output
    overwrite: bool = False  # replace an earlier gpt-export output in out (only its own files)

    def check(self) -> None:
        _given("checkpoint", self.checkpoint)
        _given("out", self.out)


@dataclass
class ImportRoot:
    """gpt-import: a local transformers GPT-2 / Llama / Qwen3 directory -> a run dir of this project."""

    source: str = MISSING  # config.json + model.safetensors (or shards and their index) + tokenizer.json
    out: str = MISSING  # the run dir to write: new or empty (an earlier gpt-import output with overwrite=true)
    overwrite: bool = False  # replace an earlier gpt-import output in out (only its own files)
    seq_len: int | None = None  # model.seq_len; null: GPT-2's n_positions, a rotary model's context (at most 4096)
    name: str | None = None  # the model preset out/conf/model/<name>.yaml; null: imported-<gpt2|llama|qwen3>
    approximate_gelu: bool = False  # GPT-2 with tanh-approximated GELU (gelu_new): import it as exact GELU

    def check(self) -> None:
        _given("source", self.source)
        _given("out", self.out)
        _at_least("seq_len", self.seq_len, 1)
        if self.name is not None and (not self.name or Path(self.name).name != self.name or self.name[0] == "."):
            raise UserError(f"name={self.name}: must be a plain preset name (a file name without a directory)")


# config file (conf/<name>.yaml) -> its schema
TOOL_ROOTS: dict[str, type] = {"eval": EvalRoot, "generate": GenerateRoot, "export": ExportRoot, "import": ImportRoot}


def register() -> None:
    """Put the schemas into Hydra's ConfigStore (the YAML files name them in their defaults) and beside
    the other commands' in ``conf.schema.ROOTS`` (one-line errors and the config reference read it)."""
    store = ConfigStore.instance()
    for name, root in TOOL_ROOTS.items():
        store.store(name=f"{name}_schema", node=root)
    ROOTS.update(TOOL_ROOTS)


register()

T = TypeVar("T")


def typed(cfg: DictConfig | T, root: type[T], config_name: str | None = None) -> T:
    """``cfg`` as ``root``'s dataclass, checked: the object a command reads from here on. A config
    built in Python (a test's, a notebook's) gets the same type checks as a composed one."""
    if isinstance(cfg, root):
        config = cfg
    else:
        try:
            config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(root), cfg))
        except MissingMandatoryValue as exc:
            key = str(getattr(exc, "full_key", "") or getattr(exc, "key", "") or "?")
            raise UserError(f"{key}=: required (pass {key}=...)") from None
        except OmegaConfBaseException as exc:
            raise UserError(one_line(exc, config_name=config_name or _config_name(root))) from None
    config.check()  # type: ignore[attr-defined]
    return config  # type: ignore[return-value]


def _config_name(root: type) -> str:
    return next(name for name, schema in TOOL_ROOTS.items() if schema is root)


def unknown_override(argv: list[str], root: type) -> str | None:
    """The one-line error for the first ``key=value`` of ``argv`` whose key ``root`` does not have
    (``eval.sentiment.pth=``: ``did you mean eval.sentiment.path?``), or None. Checked against this
    schema's own tree, nested keys included: the generic lookup knows gpt-pretrain's groups, whose
    ``eval`` and ``run`` have other keys than gpt-eval's."""
    for arg in argv:
        key = arg.partition("=")[0].lstrip("+~")
        if "=" not in arg or arg.startswith("-") or key.startswith("hydra"):
            continue
        schema, parts = root, key.split(".")
        for depth, part in enumerate(parts):
            parent = ".".join(parts[:depth])
            if not dataclasses.is_dataclass(schema):
                return f"{key}: unknown key ({parent} is a value, not a group of keys)"
            names = [f.name for f in dataclasses.fields(schema)]
            if part not in names:
                close = difflib.get_close_matches(part, names, n=1, cutoff=0.75)
                if close:
                    return f"{key}: unknown key (did you mean {parent + '.' if parent else ''}{close[0]}?)"
                return f"{key}: unknown key ({parent or 'this command'} has: {', '.join(sorted(names))})"
            schema = typing.get_type_hints(schema)[part]
    return None
