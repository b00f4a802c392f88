"""Batches of task examples for ``gpt-finetune``: seeded epochs, dp-independent order, exact state.

Examples are few (thousands) and held in memory as fixed-shape arrays (``data.tasks.batch_arrays``).
An epoch is a permutation drawn from ``(seed, epoch)``; global batch ``b`` is its slice
``[bG, (b+1)G)``, cut into contiguous equal shares for the data-parallel ranks and those into
micro-batches. The state is ``(epoch, position)``, so a resumed run (at any dp dividing G)
continues with the same global batches. The epoch's last partial batch is dropped.

The arrays are padded to the longest example of the task; each step's (or evaluation group's)
micro-batches are cut to their own longest example, rounded up to ``quantum`` tokens (8, times tp
under sequence parallelism). Padding is causal-invisible and masked, so only the cost changes: most
examples of a task are far shorter than its longest. The width is computed from what this rank
holds, which is the same on every stage and tp rank of one pipeline (they hold the same examples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parallel.run_config import Run


def trim(batches: list[dict[str, torch.Tensor]], quantum: int) -> list[dict[str, torch.Tensor]]:
    """The micro-batches' tokens cut to their longest example (last extract position + 1), rounded up."""
    length = batches[0]["tokens"].shape[-1]
    longest = max(int(batch["extract"].max()) for batch in batches) + 1
    width = min(length, -(-longest // quantum) * quantum)
    if width < length:
        for batch in batches:
            batch["tokens"] = batch["tokens"][..., :width].contiguous()
    return batches


def _micro_batch(arrays: dict[str, np.ndarray], index: np.ndarray, weight: np.ndarray) -> dict[str, torch.Tensor]:
    batch = {name: torch.from_numpy(np.ascontiguousarray(array[index])) for name, array in arrays.items()}
    batch["weight"] = torch.from_numpy(weight.astype(np.float32))
    return batch


class TaskBatches:
    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        global_batch: int,
        micro: int,
        rank: int,
        dp: int,
        seed: int,
        quantum: int = 8,
    ):
        self.arrays, self.global_batch, self.micro, self.quantum = arrays, global_batch, micro, quantum
        self.rank, self.dp, self.seed = rank, dp, seed
        self.size = len(arrays["labels"])
        self.epoch, self.position = 0, 0

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        share = self.global_batch // self.dp
        mine = order[self.position + self.rank * share : self.position + (self.rank + 1) * share]
        self.position += self.global_batch
        if self.position + self.global_batch > self.size:
            self.epoch, self.position = self.epoch + 1, 0
        ones = np.ones(self.micro)
        batches = [_micro_batch(self.arrays, mine[i : i + self.micro], ones) for i in range(0, share, self.micro)]
        return trim(batches, self.quantum)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_micro_batches(
    arrays: dict[str, np.ndarray], micro: int, rank: int, dp: int, pp: int, quantum: int = 8
) -> list[list[dict[str, torch.Tensor]]]:
    """This rank's contiguous share of a split in groups of micro-batches (a multiple of pp per
    group, as the interleaved schedule needs), padded with weight-0 examples so that every rank
    runs the same number of equally shaped micro-batches."""
    size = len(arrays["labels"])
    per_rank = -(-size // dp)
    per_group = micro * pp * max(1, 4 // pp)
    padded = -(-per_rank // per_group) * per_group
    start = rank * per_rank
    index = np.arange(start, start + padded)
    weight = ((index < min(start + per_rank, size)) & (index < size)).astype(np.float64)
    index = np.where(weight > 0, index, 0)
    batches = [_micro_batch(arrays, index[i : i + micro], weight[i : i + micro]) for i in range(0, padded, micro)]
    step = per_group // micro
    return [trim(batches[i : i + step], quantum) for i in range(0, len(batches), step)]


def write_results(run_dir: Path, cfg: Run, results: dict[str, Any], task: dict[str, Any], init: Path) -> None:
    """``run.dir/results.json``: accuracies plus what produced them."""
    payload = {
        **results,
        "task": str(cfg.task.type),
        "labels": task["labels"],
        "num_train_examples": len(task["examples"]["train"]),
        "num_validation_examples": len(task["examples"]["validation"]),
        "aux_lm_weight": float(cfg.finetune.aux_lm_weight),
        "from_scratch": bool(cfg.finetune.from_scratch),
        "init_checkpoint": str(init),
        "seed": int(cfg.train.seed),
    }
    tmp = run_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(run_dir / "results.json")
