"""gpt-eval on a gpt-finetune checkpoint: its classifier head on a labelled task file.

Why not through lm-eval: a fine-tuned model answers with its head (a linear layer on the final
state of GPT-1's extract token, ``pretrain/tasks/finetune_head.py``), and lm-eval can only score the
language model's log-likelihoods, so it would evaluate the body and ignore what was fine-tuned.
This builds the same :class:`~pretrain.tasks.finetune_head.FinetuneGPT` the run trained, loads its
weights (any saved layout, resharded), frames the task file with the run's own input
transformation, label vocabulary and length (``data/tasks.py``) and counts the head's right
answers. The majority-class rate of the same examples is reported beside the accuracy: on a
skewed file, or a sample of a file sorted by label, accuracy alone says little.

Everything that can be wrong with the task file (missing, a field missing, a label the run never
saw) is one line before the model is loaded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conf.errors import UserError
from conf.groups import TaskConfig
from conf.schema import typed_group
from data.tasks import Example, SpecialTokens, encode_examples, read_jsonl
from data.tokenizer import load_tokenizer
from parallel.checkpoint import CheckpointDir
from parallel.train_state import TRAIN_STATE, TrainState
from pretrain.eval.samples import sample_documents

if TYPE_CHECKING:
    import torch

    from pretrain.interop.load import LoadedModel


def peek_state(spec: str) -> tuple[Path, TrainState]:
    """The newest step of ``checkpoint=spec`` and its train state, read without verifying the step
    (the load verifies it): enough to tell a fine-tuned run and its task before any work. A spec that
    is no checkpoint is the loader's one-line error, here."""
    path = Path(spec).expanduser()
    if (path / "checkpoints").is_dir():
        steps = CheckpointDir(path).steps()
        path = steps[0] if steps else path
    if (path / TRAIN_STATE).is_file():
        try:
            return path, TrainState.read(path)
        except (OSError, ValueError, TypeError, KeyError, UserError):
            pass  # unreadable: the verification below says why
    path = CheckpointDir.resolve(spec)
    return path, TrainState.read(path)


def is_finetuned(state: TrainState) -> bool:
    """A gpt-finetune checkpoint: it records its label vocabulary (and has a classifier head)."""
    return "labels" in state.task


@dataclass
class ClassifierTask:
    """A task file framed for the checkpoint's head, with its labels' majority-class rate."""

    path: Path
    task_type: str
    examples: list[Example]
    length: int  # tokens of the longest framed sequence
    majority_label: str
    majority_rate: float


def finetuned_task(state: TrainState) -> TaskConfig:
    """The ``task`` group the fine-tuning run recorded, as its dataclass (today's defaults for what an
    older version did not record)."""
    return typed_group("task", state.config["task"])


def task_file(given: str | None, state: TrainState) -> Path:
    """``eval.classifier.path``, else the run's own ``task.test``, else its ``task.validation``."""
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise UserError(f"eval.classifier.path={path}: no such file")
        return path
    task = finetuned_task(state)
    for key in ("test", "validation"):
        if getattr(task, key):
            path = Path(getattr(task, key)).expanduser()
            if not path.is_file():
                raise UserError(f"eval.classifier.path=: the run's task.{key}={path} is not there; pass the task file")
            print(f"classifier: the run's task.{key} ({path})", flush=True)
            return path
    raise UserError("eval.classifier.path=: required (the run recorded no task.test or task.validation)")


def prepare_task(given: str | None, step: Path, state: TrainState, limit: int | None, seed: int) -> ClassifierTask:
    """Read and frame the task file as the fine-tuning run framed its examples (``limit``: that many
    rows, gpt-eval's seeded sample of the whole file)."""
    path = task_file(given, state)
    task = finetuned_task(state)
    rows = read_jsonl(path, task.type)
    sample = sample_documents(len(rows), limit, seed)
    if sample is not None:
        rows = [rows[i] for i in sample]
    tokenizer = load_tokenizer(step)  # gpt-finetune saves it in every step
    seq_len = int(state.model["seq_len"])
    max_len = min(task.max_len or seq_len, seq_len)  # gpt-finetune's framing (null: the context)
    labels = [str(label) for label in state.task["labels"]]
    special = SpecialTokens.after(state.vocab_size)
    examples = encode_examples(rows, task.type, labels, tokenizer, special, max_len, str(path))
    counts = Counter(str(row["label"]) for row in rows)
    label, count = max(counts.items(), key=lambda item: (item[1], item[0]))
    length = max(len(s) for e in examples for s in e.sequences)
    return ClassifierTask(path, task.type, examples, length, label, count / len(rows))


def with_head(gpt: torch.nn.Module, state: TrainState) -> torch.nn.Module:
    """The fine-tuning model around ``gpt``: what :func:`~pretrain.interop.load.load_model` loads a
    gpt-finetune checkpoint into (its head's weights are in the checkpoint beside the GPT's)."""
    from pretrain.tasks.finetune_head import FinetuneGPT

    if state.converted_from == "deepspeed":  # pretrain/interop/deepspeed_convert.py keeps the GPT's weights only
        raise UserError(
            "checkpoint=: a DeepSpeed fine-tuning run, whose megatron view holds the GPT without its classifier "
            "head; its run.dir/results.json has the head's val_acc (fine-tune with parallel.engine=megatron to "
            "evaluate the head on other files)"
        )
    return FinetuneGPT(gpt, finetuned_task(state).type, len(state.task["labels"]), dropout=0.0, seed=0)


def evaluate(loaded: LoadedModel, task: ClassifierTask, batch_size: int) -> dict[str, Any]:
    """Accuracy of the head on ``task`` and, beside it, the majority-class rate (lm-eval's
    ``results[task][metric]`` layout, metric names with their filter, ``acc,none``)."""
    import torch

    from data.tasks import batch_arrays

    arrays = {k: torch.from_numpy(v) for k, v in batch_arrays(task.examples, task.length, pad_id=0).items()}
    correct = 0
    with torch.no_grad():
        for start in range(0, len(task.examples), batch_size):
            part = {k: v[start : start + batch_size] for k, v in arrays.items()}
            n, k, _ = part["tokens"].shape
            width = int(part["extract"].max()) + 1  # causal: the padding after the extract token changes nothing
            tokens = part["tokens"][..., :width].reshape(n * k, width)
            positions = torch.arange(width).unsqueeze(0).expand(n * k, -1)
            targets = torch.roll(tokens, -1, dims=1)  # the body's LM loss is computed on the way, and unused
            _, scores = loaded.model(tokens, positions, targets, part["extract"].reshape(n * k), k)
            if task.task_type == "multiple_choice":  # fewer answers than the widest example: never chosen
                scores = scores.masked_fill(part["choice_mask"] == 0, -1e9)
            correct += int((scores.argmax(-1) == part["labels"]).sum())
    accuracy = correct / len(task.examples)
    print(
        f"classifier ({task.task_type}, {len(task.examples)} examples of {task.path}): accuracy {accuracy:.4f}, "
        f"majority-class rate {task.majority_rate:.4f} (label {task.majority_label!r})",
        flush=True,
    )
    return {
        "acc,none": accuracy,
        "majority_rate,none": task.majority_rate,
        "majority_label": task.majority_label,
        "examples": len(task.examples),
        "path": str(task.path),
    }
