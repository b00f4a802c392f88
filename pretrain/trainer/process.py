"""What the training commands share around the Trainer: explicit process setup and exit codes.

Kept apart from the command modules so that their ``--help`` imports neither torch nor
megatron-core: everything here is imported once a run starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig


def start_training(cfg: DictConfig, make_task: Callable[[Any], Any]) -> dict:
    """Validate ``cfg``, set up this process (in this order), build the task, the run, and run it.
    ``make_task`` imports the task's module itself: a config error is refused before torch loads."""
    from conf.schema import validate

    validated = validate(cfg)  # every config error is one line, before any file, process group or torch
    import torch

    from conf.cli import quiet_third_party
    from parallel import cpu_compat, heap, process_hygiene
    from parallel.run_config import Groups, Run
    from pretrain.trainer.loop import Trainer

    groups = Groups(validated)
    process_hygiene.install()  # helper processes (writers, loader workers, megatron's Manager) die with this one
    quiet_third_party()
    cpu_compat.apply()  # megatron-core on a CPU-only machine (a no-op with CUDA; version fixes always)
    torch.set_num_threads(torch.get_num_threads())
    if groups.train.keep_freed_memory:  # before the model, the data and the checkpoint are allocated
        heap.keep_freed_memory()
    task = make_task(groups)
    run = Run.build({**groups.as_dict(), **task.configure(groups)})  # the layout checked: still before any work
    return Trainer(run).run(task)


def finish_command(summary: dict) -> None:
    """Tear the process groups down; a stopped run leaves with its requeue / interrupt code."""
    from parallel.topology import Topology
    from pretrain.trainer.preemption import exit_for_requeue

    Topology.destroy()
    if "exit_code" in summary:
        exit_for_requeue(summary["exit_code"])
