"""The run: the validated config as one frozen tree of the group dataclasses, with every value derived
from it computed once.

A command validates its composed config (``conf.schema.validate`` → the typed groups), its task fills
in what it owns (fine-tuning: the pretrained model's shape, max_steps from the epochs), and
:meth:`Run.build` derives the rest in one place: the layout (tp, pp, vpp, dp, micro-batches per step)
checked against the world size, warmup steps from ``train.warmup_fraction``, the distributed optimizer
on or off, the engine's capabilities. Nothing after that reads a raw ``DictConfig`` or repeats a
default, and nothing changes the run: a value a resume decides (the distributed optimizer a
checkpoint was written with) makes a new Run (:meth:`Run.with_distributed_optimizer`), recorded in the
checkpoints as before. Every group is frozen: assigning to ``run.train.lr`` raises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache
from typing import Any

from conf import groups as g
from parallel.capabilities import EngineCapabilities, capabilities, distributed_optimizer_in_effect
from parallel.topology import Topology

# the order of the groups in config.yaml and a checkpoint's train state
GROUP_ORDER = ("model", "parallel", "train", "data", "logging", "run", "eval", "hardware", "init", "task", "finetune")


def _refuse(self: Any, name: str, value: Any = None) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot assign {type(self).__name__}.{name}: the run is frozen")


@cache
def _frozen_class(cls: type) -> type:
    """``cls`` whose instances refuse assignment: still a ``cls`` (isinstance, fields, asdict)."""
    return type(cls.__name__, (cls,), {"__setattr__": _refuse, "__delattr__": _refuse, "__module__": cls.__module__})


def freeze(value: Any) -> Any:
    """A frozen copy of a group dataclass (nested dataclasses and lists of them too)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        base = thawed_class(value)
        frozen = object.__new__(_frozen_class(base))
        for f in dataclasses.fields(base):
            object.__setattr__(frozen, f.name, freeze(getattr(value, f.name)))
        return frozen
    if isinstance(value, list):
        return [freeze(v) for v in value]
    return value


def thawed_class(value: Any) -> type:
    cls = type(value)
    return cls.__mro__[1] if cls.__setattr__ is _refuse else cls


def replaced(group: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` for a frozen group: a new (unfrozen) instance with ``changes``."""
    values = {f.name: getattr(group, f.name) for f in dataclasses.fields(group) if f.init}
    return thawed_class(group)(**{**values, **changes})


def as_plain(value: Any) -> Any:
    """Dicts, lists and scalars (``dataclasses.asdict`` that also unwraps OmegaConf containers)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_plain(v) for v in value]
    if hasattr(value, "items"):  # an OmegaConf mapping left in an Any field
        return {str(k): as_plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Run:
    """One training command's run: its groups (frozen) and what is derived from them."""

    model: g.ModelConfig
    parallel: g.ParallelConfig
    train: g.TrainConfig
    logging: g.LoggingConfig
    run: g.RunConfig
    layout: Topology  # tp, pp, vpp, dp for this world size and rank (checked)
    micro_batches: int  # per optimizer step and rank: global_batch / (micro_batch * dp)
    distributed_optimizer: bool  # megatron's ZeRO-1 in effect (auto resolved; a resume may fix it)
    caps: EngineCapabilities  # what parallel.engine supports
    data: g.DataConfig | None = None  # gpt-pretrain's
    eval: g.EvalConfig | None = None  # gpt-pretrain's in-loop lm-eval
    hardware: g.HardwareConfig | None = None  # the preflight's device
    init: g.InitConfig | None = None  # gpt-finetune's
    task: g.TaskConfig | None = None
    finetune: g.FinetuneConfig | None = None

    @classmethod
    def build(cls, groups: dict[str, Any] | Groups, world_size: int | None = None, rank: int | None = None) -> Run:
        """The run of validated ``groups`` (``conf.schema.validate``'s) for ``world_size`` processes
        (torchrun's WORLD_SIZE by default); the layout checks raise one-line UserErrors."""
        groups = groups.as_dict() if isinstance(groups, Groups) else groups
        train = groups["train"]
        if train.warmup_fraction is not None:  # of the run's max_steps (either task)
            warmup = int(round(float(train.warmup_fraction) * int(train.max_steps)))
            train = replaced(train, warmup_steps=warmup)
        groups = {name: freeze(value) for name, value in {**groups, "train": train}.items() if name in GROUP_ORDER}
        topo = Topology.from_config(Groups(groups), world_size=world_size, rank=rank)
        dist = distributed_optimizer_in_effect(Groups(groups), topo.dp)
        micro = train.global_batch // (train.micro_batch * topo.dp)
        caps = capabilities(groups["parallel"].engine)
        return cls(**groups, layout=topo, micro_batches=micro, distributed_optimizer=dist, caps=caps)

    @classmethod
    def from_config(cls, cfg: Any, world_size: int | None = None, rank: int | None = None) -> Run:
        """The run of a composed ``DictConfig`` (validated here): for benchmarks and tests that build an
        engine without a command."""
        from conf.schema import validate

        return cls.build(validate(cfg), world_size, rank)

    @classmethod
    def from_saved(cls, config: dict[str, Any], **parallel: Any) -> Run:
        """The run a checkpoint recorded (``TrainState.config``) in this one process, with ``parallel``'s
        keys changed (readers load any layout at tp = pp = 1); keys an older version did not record
        take today's defaults."""
        from conf.schema import typed_group

        groups = {name: typed_group(name, values) for name, values in config.items() if name in GROUP_ORDER}
        groups["parallel"] = replaced(groups["parallel"], **parallel)
        return cls.build(groups, world_size=1, rank=0)

    def with_distributed_optimizer(self, value: bool) -> Run:
        """This run with the distributed optimizer a resumed checkpoint decides (recorded as ``parallel.
        distributed_optimizer`` in the new checkpoints, as the config in effect)."""
        return dataclasses.replace(self, distributed_optimizer=bool(value))

    @property
    def optimizer_sharded(self) -> bool:
        """Whether the optimizer state is sharded over dp: the distributed optimizer, or ZeRO >= 1."""
        return self.distributed_optimizer or (self.caps.zero and self.parallel.zero_stage >= 1)

    def groups(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in GROUP_ORDER if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """The config in effect as plain data: ``config.yaml``, a checkpoint's train state, wandb's config.
        ``parallel.distributed_optimizer`` is the resolved bool, as the run uses it."""
        plain = {name: as_plain(group) for name, group in self.groups().items()}
        plain["parallel"]["distributed_optimizer"] = self.distributed_optimizer
        return plain


class Groups:
    """The validated groups before the run is built (a task reads them to open its data or checkpoint),
    by attribute: ``groups.train.lr``; a group the command does not have is None."""

    def __init__(self, groups: dict[str, Any]):
        self.__dict__.update({name: groups.get(name) for name in GROUP_ORDER})

    def as_dict(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if value is not None}
