"""``TrainState``: the one schema of a checkpoint's metadata (``step_<N>/train_state.json``).

Everything a reader needs without building an engine — the step, the config the run was
trained with, the layout and engine that wrote it, the loader's position, the data identity
the resume guards compare — lives in this versioned dataclass. The Trainer writes it; resume,
``gpt-finetune`` / ``gpt-eval`` / ``gpt-generate`` / ``gpt-export`` and the DeepSpeed
conversion read it. Older checkpoints (version 1: the same keys as a plain dict, or megatron's
``common.pt`` before ``train_state.json`` existed) load with defaults for what they lack.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conf.errors import UserError

TRAIN_STATE = "train_state.json"
VERSION = 2


@dataclass
class TrainState:
    step: int
    config: dict[str, Any]  # the resolved config the run was trained with
    vocab_size: int  # the tokenizer's (the model pads it)
    engine: str = "megatron"
    layout: dict[str, int] = field(default_factory=dict)  # tp, pp, dp, vpp of the run that wrote it
    distributed_optimizer: bool = False
    data: dict[str, Any] | None = None  # the task's loader state (position in the global order)
    data_identity: dict[str, Any] | None = None  # tokenizer / shard-set hashes (pretraining)
    skip_policy: dict[str, Any] | None = None
    task: dict[str, Any] = field(default_factory=dict)  # what the task needs back (e.g. fine-tuning's labels)
    converted_from: str | None = None  # "deepspeed" for the megatron view of a DeepSpeed step; "transformers:<arch>"
    weights_only: bool = False  # model weights only (gpt-import): a run continues from them with a fresh optimizer
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainState:
        version = int(raw.get("version", 1))
        if version > VERSION:
            raise UserError(
                f"a checkpoint of train-state version {version} needs a newer gpt-pretrain (this: {VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        if version == 1 and "labels" in raw:  # fine-tuning kept its labels at the top level
            values["task"] = {"labels": raw["labels"]}
        values["version"] = VERSION
        return cls(**values)

    @classmethod
    def read(cls, step_dir: Path) -> TrainState:
        """A step's state without building an engine: ``train_state.json``, or the megatron
        ``common.pt`` of checkpoints written before that file existed."""
        path = step_dir / TRAIN_STATE
        if path.is_file():
            return cls.from_dict(json.loads(path.read_text()))
        from megatron.core import dist_checkpointing

        return cls.from_dict(dist_checkpointing.load_common_state_dict(str(step_dir))["common"])

    def write(self, step_dir: Path) -> None:
        (step_dir / TRAIN_STATE).write_text(json.dumps(self.to_dict(), indent=1))

    @property
    def model(self) -> dict[str, Any]:
        """The ``model`` group the run was trained with."""
        return self.config["model"]
