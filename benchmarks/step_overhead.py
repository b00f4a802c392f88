"""The Trainer's own work per step, in microseconds: everything ``gpt-pretrain`` does in a step besides
the data (``task.next_batches``) and the engine's step (forward, backward, gradient reduction, optimizer).

Runs ``gpt-pretrain`` in this process with wall-clock spans around the parts of a step (the product code
is wrapped from outside, nothing in it is switched on), then prints a table: µs per step of each part,
and the Trainer's share of the step. The goal (issue #32) is a share <= 2% at ``model=tiny``.

    python benchmarks/step_overhead.py [--model tiny] [--steps 300] [--skip 50] [--data DIR]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import prepared_shards  # noqa: E402

SPANS: dict[str, list[float]] = collections.defaultdict(list)
STEPS: list[tuple[float, float]] = []  # (start, end) of each Trainer.train_step: the gaps are the loop's own work


def timed(owner: Any, name: str, label: str) -> None:
    """Wrap ``owner.name`` so that each call's wall time goes to ``SPANS[label]``."""
    inner: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            end = time.perf_counter()
            SPANS[label].append(end - start)
            if label == "step (all of it)":
                STEPS.append((start, end))

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip", type=int, default=50, help="warm-up steps left out")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    data = prepared_shards(args.data)

    import torch

    from conf.cli import compose, quiet_third_party
    from parallel import cpu_compat
    from parallel.megatron_engine import MegatronEngine
    from parallel.topology import Topology
    from pretrain.tasks.lm import PretrainTask

    try:  # this tree's layout
        from pretrain.trainer import metrics, skip_policy
        from pretrain.trainer.loop import Trainer
        from pretrain.trainer.preemption import StopRequest
    except ImportError:  # a revision before the rooms (to measure "before" in its own worktree)
        from pretrain.preemption import StopRequest  # type: ignore[no-redef]

        from pretrain import metrics, skip_policy  # type: ignore[no-redef]
        from pretrain.trainer import Trainer  # type: ignore[no-redef]

    timed(Trainer, "train_step", "step (all of it)")
    timed(PretrainTask, "next_batches", "data: next_batches")
    timed(MegatronEngine, "train_step", "engine.train_step")
    timed(PretrainTask, "step_record", "task.step_record")
    timed(metrics.Metrics, "log", "metrics.log")
    timed(skip_policy.SkipPolicy, "accept", "skip policy")
    timed(StopRequest, "agreed", "stop-signal agreement")

    torch.set_num_threads(torch.get_num_threads())
    quiet_third_party()
    cpu_compat.apply()
    with tempfile.TemporaryDirectory(prefix="overhead-") as run_dir:
        overrides = [
            f"data.dir={data}",
            f"model={args.model}",
            f"run.dir={run_dir}",
            f"train.max_steps={args.steps}",
            "train.eval_every=0",
            "train.save_every=-1",
            "train.sample_tokens=0",
            "logging.wandb=disabled",
            "logging.progress_bar=false",
        ]

        cfg = compose(overrides)
        import parallel

        if (Path(parallel.__file__).parent / "run_config.py").is_file():
            from conf.schema import validate
            from parallel.run_config import Groups, Run

            groups = Groups(validate(cfg))
            task = PretrainTask(groups)
            Trainer(Run.build({**groups.as_dict(), **task.configure(groups)})).run(task)
        else:  # a revision before the Run object: the trainer took the DictConfig
            Trainer(cfg).run(PretrainTask(cfg))
        Topology.destroy()

    skip = args.skip
    per = {k: statistics.median(v[skip:] if len(v) > skip else v) * 1e6 for k, v in SPANS.items()}
    step = per["step (all of it)"]
    gaps = [b[0] - a[1] for a, b in zip(STEPS[skip:], STEPS[skip + 1 :], strict=False)]
    around = statistics.median(gaps) * 1e6  # the loop's checks between steps (lease, saves due, stop agreement)
    loop_step = step + around
    engine, batches = per["engine.train_step"], per["data: next_batches"]
    own_in_step = step - engine - batches
    print(f"model={args.model}, {args.steps} steps, medians after {skip} warm-up steps (µs per step)")
    print(f"{'part':38s} {'µs':>10s} {'% of step':>10s}")
    for name in ("engine.train_step", "data: next_batches", "task.step_record", "metrics.log", "skip policy"):
        print(f"{name:38s} {per.get(name, 0.0):10.1f} {100 * per.get(name, 0.0) / loop_step:9.2f}%")
    print(f"{'stop-signal agreement':38s} {per.get('stop-signal agreement', 0.0):10.1f}")
    print(f"{'Trainer work inside train_step':38s} {own_in_step:10.1f} {100 * own_in_step / loop_step:9.2f}%")
    print(f"{'Trainer work between steps':38s} {around:10.1f} {100 * around / loop_step:9.2f}%")
    total = own_in_step + around
    print(f"{'Trainer own work (both)':38s} {total:10.1f} {100 * total / loop_step:9.2f}%  (goal <= 2%)")
    print(f"{'whole step (loop)':38s} {loop_step:10.1f}")


if __name__ == "__main__":
    main()
