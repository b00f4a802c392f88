"""``gpt-finetune``: GPT-1 supervised fine-tuning (L3 = L2 + λ·L1) from a pretraining checkpoint.

The pretrained checkpoint may come from any layout of either engine: DeepSpeed steps are read
through their converted megatron view, and megatron-core's ``dist_checkpointing`` reshards the
weights into this run's (tp, pp, dp). The run then trains through the same Trainer as pretraining
(``pretrain/trainer/loop.py``): either engine, checkpoints in ``run.dir/checkpoints`` (resumed
automatically, async saves), preemption (SIGTERM → save → exit 75), the watchdog and the skip
policy; ``metrics.jsonl`` with ``val_acc``, and ``results.json`` at the end.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from conf.cli import check_group_choices, exit_on_user_error, set_rank_threads


def finetune(cfg: DictConfig) -> dict:
    """Fine-tune under ``cfg`` (as composed by Hydra); returns the results (``exit_code`` when stopped)."""
    from pretrain.trainer.process import start_training

    return start_training(cfg, _task)


def _task(groups: Any) -> Any:
    """The task, imported once the config is valid (its module loads torch and megatron-core)."""
    from pretrain.tasks.finetune import FinetuneTask

    return FinetuneTask(groups)


@hydra.main(version_base=None, config_path="../conf", config_name="finetune")
def _hydra_main(cfg: DictConfig) -> None:
    from pretrain.trainer.process import finish_command

    with exit_on_user_error():
        summary = finetune(cfg)
    finish_command(summary)


def main() -> None:
    set_rank_threads()
    check_group_choices(sys.argv[1:], config_name="finetune")
    with exit_on_user_error():  # a Ctrl-C before the loop's handler exists: one line, exit 130
        _hydra_main()


if __name__ == "__main__":
    main()
