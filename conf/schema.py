"""The commands' config schemas (the groups of ``conf/groups.py``) and the validation of a composed config.

``conf/config.yaml`` (gpt-pretrain) and ``conf/finetune.yaml`` (gpt-finetune) are composed on top
of :class:`PretrainRoot` / :class:`FinetuneRoot` (Hydra's ConfigStore: ``pretrain_schema`` and
``finetune_schema``), so the presets in ``conf/<group>/*.yaml`` hold only what differs from the
dataclass defaults, and Hydra refuses a misspelt key or a value of the wrong type while composing
(:func:`conf.cli.check_group_choices` turns that into one line). :func:`validate` runs first in a
trainer: the same type check for a config built any other way, then every group's ``check()``,
so a bad value is one line naming the key before any process group or file exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from conf.errors import UserError
from conf.groups import (
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    HardwareConfig,
    InitConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
)
from conf.prepare_schema import PrepareConfig


@dataclass
class PretrainRoot:
    """gpt-pretrain's config (``conf/config.yaml`` selects the presets)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # in-loop lm-eval (off unless eval.every_steps)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)  # the preflight's device (train.preflight)


@dataclass
class PlanRoot(PretrainRoot):
    """gpt-plan's config (``conf/plan.yaml``): gpt-pretrain's, plus what the planner is asked."""

    search: bool = False  # rank every layout of the world size (hardware.gpus_per_node x hardware.nodes)
    top: int = 20  # rows of the search table
    plot: str | None = None  # write the search's memory vs tokens/s scatter here (a .png)
    vocab_size: int | None = None  # the tokenizer's size when neither data.dir nor run.dir tells (null: 50257)


@dataclass
class FinetuneRoot:
    """gpt-finetune's config (``conf/finetune.yaml``); the model comes from ``init.checkpoint``."""

    init: InitConfig = field(default_factory=InitConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "logging": LoggingConfig,
    "run": RunConfig,
    "init": InitConfig,
    "task": TaskConfig,
    "finetune": FinetuneConfig,
    "eval": EvalConfig,
    "hardware": HardwareConfig,
}
# config file -> its schema
ROOTS: dict[str, type] = {"config": PretrainRoot, "finetune": FinetuneRoot, "plan": PlanRoot}
ROOTS["prepare"] = PrepareConfig  # gpt-prepare's (conf/prepare_schema.py)


def register() -> None:
    """Put the schemas into Hydra's ConfigStore (done on import; config.yaml / finetune.yaml name them)."""
    store = ConfigStore.instance()
    store.store(name="pretrain_schema", node=PretrainRoot)
    store.store(name="finetune_schema", node=FinetuneRoot)
    store.store(name="prepare_schema", node=PrepareConfig)
    store.store(name="plan_schema", node=PlanRoot)
    for name, schema in GROUPS.items():  # for users' own configs: `- /schema/train@train`
        store.store(group="schema", name=name, node=schema)


register()


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check a composed config before anything runs: every required key is set, every group present
    has only its schema's keys with values of their types, every group's ``check()`` passes.
    Returns the groups as their dataclasses (interpolations resolved): what the run reads from here on
    (``parallel/run_config.py`` freezes them into the Run).

    Raises :class:`UserError` with one line naming the key (``train.max_steps=abc: expected an
    integer``). Top-level keys without a schema (another command's) are left alone.
    """
    missing = sorted(re.sub(r"\[(\d+)\]", r".\1", key) for key in OmegaConf.missing_keys(cfg))  # Hydra's list.0.key
    if missing:
        raise UserError(f"{missing[0]}=: required (pass {missing[0]}=...)")
    groups = {name: _typed(cfg, name) for name in GROUPS if name in cfg}
    for group in groups.values():
        group.check()
    return groups


def typed_group(name: str, values: dict[str, Any]) -> Any:
    """A group as recorded in a checkpoint (``TrainState.config[name]``) as its dataclass: keys an older
    version did not have take today's defaults, keys it had and this version dropped are ignored."""
    schema = GROUPS[name]
    known = {f.name for f in dataclasses.fields(schema)}
    return _typed(OmegaConf.create({name: {k: v for k, v in values.items() if k in known}}), name)


def check_plan(cfg: DictConfig) -> None:
    """gpt-plan's own keys (:class:`PlanRoot`'s beyond gpt-pretrain's), which no group's ``check()``
    sees: ``vocab_size=0`` or ``-3`` would plan a model of GPT-2's or a negative vocabulary and exit 0.
    Null is the "unset" spelling (the data's vocabulary, else GPT-2's)."""
    for key in ("vocab_size", "top"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            unset = " (or null: data.dir's, else GPT-2's 50257)" if key == "vocab_size" else ""
            raise UserError(f"{key}={value}: must be an integer >= 1{unset}")


def check_train(cfg: DictConfig) -> None:
    """The ``train`` group alone: types and :meth:`TrainConfig.check`."""
    _typed(cfg, "train").check()


def check_logging(cfg: DictConfig) -> None:
    """The ``logging`` group alone: types and :meth:`LoggingConfig.check` (wandb mode, credentials)."""
    _typed(cfg, "logging").check()


def _typed(cfg: DictConfig, name: str) -> Any:
    """``cfg[name]`` as its schema's dataclass (interpolations resolved), or a one-line UserError."""
    schema = GROUPS[name]
    try:
        values = OmegaConf.to_container(cfg[name], resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except MissingMandatoryValue as exc:
        key = _full_key(name, exc)
        raise UserError(f"{key}=: required (pass {key}=...)") from None
    except OmegaConfBaseException as exc:
        raise UserError(one_line(exc, prefix=name)) from None


def _full_key(prefix: str, exc: OmegaConfBaseException) -> str:
    key = str(getattr(exc, "full_key", None) or getattr(exc, "key", None) or "")
    return f"{prefix}.{key}" if prefix and key else key or prefix


def one_line(exc: BaseException, prefix: str = "", value: Any = None, config_name: str = "config") -> str:
    """One line for an OmegaConf / Hydra error about a key: what is wrong with which key.

    ``prefix`` is the group the error's key is relative to (``validate``), ``value`` the value the
    user wrote when known (a command-line override), ``config_name`` which root schema to name the
    keys of."""
    cause = exc
    while cause is not None and not (isinstance(cause, OmegaConfBaseException) and getattr(cause, "key", None)):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    key = _full_key(prefix, cause)
    if isinstance(cause, ConfigKeyError | AttributeError) and _field_type(key, config_name) is None:
        return unknown_key(key, config_name)
    field_type = _field_type(key, config_name)
    shown = value if value is not None else getattr(cause, "value", None)
    if field_type is not None and shown is not None:
        return f"{key}={shown}: expected {describe(field_type)}"
    message = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
    return f"{key}: {message}"


def unknown_added_key(cfg: DictConfig, config_name: str = "config") -> str | None:
    """The one-line error for a key of ``cfg`` its schema does not have (``+train.nope=1`` gets past
    Hydra's typed merge), or None."""
    root = ROOTS.get(config_name)
    if root is None:
        return None
    fields = {f.name for f in dataclasses.fields(root)}
    for name in cfg:
        if name not in fields:
            return unknown_key(str(name), config_name)
        schema = GROUPS.get(str(name))
        if schema is not None and isinstance(cfg[name], DictConfig):
            extra = sorted(set(cfg[name]) - {f.name for f in dataclasses.fields(schema)})
            if extra:
                return unknown_key(f"{name}.{extra[0]}", config_name)
    return None


def unknown_key(key: str, config_name: str = "config") -> str:
    """``train.nope: unknown key (did you mean train.seed?)``, or the keys its group has."""
    parent, _, name = key.rpartition(".")
    fields = _fields(parent, config_name)
    if fields is None:
        return f"{key}: unknown key"
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.75)
    where = f"{parent}." if parent else ""
    if close:
        return f"{key}: unknown key (did you mean {where}{close[0]}?)"
    return f"{key}: unknown key ({parent or 'the config'} has: {', '.join(sorted(fields))})"


def describe(field_type: Any) -> str:
    """``int | None`` -> 'an integer (or null)'."""
    args = typing.get_args(field_type)
    if type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{describe(inner[0])} (or null)" if len(inner) == 1 else "a value"
    origin = typing.get_origin(field_type) or field_type
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    names.update({list: "a list ([a,b])", dict: "a mapping ({key: value})"})
    return names.get(origin, "a value")


def _schema_of(path: str, config_name: str) -> type | None:
    """The dataclass of the node at ``path`` ('' is the root of ``config_name``)."""
    parts = [p for p in path.split(".") if p]
    schema: Any = GROUPS.get(parts.pop(0)) if parts else ROOTS.get(config_name, PretrainRoot)
    for part in parts:
        hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
        schema = hints.get(part)
        if schema is None:
            return None
    return schema if dataclasses.is_dataclass(schema) else None


def _fields(path: str, config_name: str) -> list[str] | None:
    schema = _schema_of(path, config_name)
    return None if schema is None else [f.name for f in dataclasses.fields(schema)]


def _field_type(key: str, config_name: str) -> Any:
    parent, _, name = key.rpartition(".")
    schema = _schema_of(parent, config_name)
    return None if schema is None else typing.get_type_hints(schema).get(name)
