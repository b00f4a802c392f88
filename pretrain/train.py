"""``gpt-pretrain``: next-token (L1) pretraining, single process or under torchrun / srun.

The command only: validate the config, then ``Trainer(cfg).run(PretrainTask(cfg))``. Heavy
imports (torch, megatron-core) wait until a run starts, so ``--help`` and config errors are quick.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from conf.cli import check_group_choices, exit_on_user_error, set_rank_threads


def train(cfg: DictConfig) -> dict:
    """Pretrain under ``cfg`` (as composed by Hydra); returns the run's summary."""
    from pretrain.trainer.process import start_training

    return start_training(cfg, _task)


def _task(groups: Any) -> Any:
    """The task, imported once the config is valid (its module loads torch and megatron-core)."""
    from pretrain.tasks.lm import PretrainTask

    return PretrainTask(groups)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from pretrain.trainer.process import finish_command

    with exit_on_user_error():
        summary = train(cfg)
    finish_command(summary)


def main() -> None:
    set_rank_threads()
    check_group_choices(sys.argv[1:], config_name="config")
    with exit_on_user_error():  # a Ctrl-C before the loop's handler exists: one line, exit 130
        _hydra_main()


if __name__ == "__main__":
    main()
