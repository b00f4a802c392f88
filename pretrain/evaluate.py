"""``gpt-eval``: in-context learning (k-shot, no gradient updates) and perplexity through lm-eval, and
the classifier head of a gpt-finetune checkpoint.

The bundled task templates (``conf/eval_tasks``) read local files only: gpt-eval fills in
the paths and, for ``sentiment``, the answer choices (the label set of the evaluation
file), writes the tasks into ``run.dir/tasks`` and runs lm-eval offline on them once per k.
A fine-tuned checkpoint is evaluated by its head (``tasks=[classifier]``, its default:
``pretrain/eval/classifier.py``), since lm-eval would score only its language model.
``limit=N`` evaluates N documents of each task drawn (seeded) from the whole split, through
lm-eval's own ``samples=`` (not its ``limit``, which takes the first N: in a file sorted by
label, mostly one class).
``run.dir`` must be new, empty or an earlier gpt-eval's (``EVAL_DIR_NAMES``): gpt-eval rewrites
its own files there and refuses a directory holding anything else, before any work.
In-loop evaluation (``gpt-pretrain eval.every_steps=N``, ``pretrain/eval/in_loop.py``) fills in
the same task files through :data:`BUILDERS`, from the same ``eval.*`` keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from conf.cli import CONF_DIR
from conf.errors import UserError
from conf.groups import fewshot_counts
from conf.tool_schemas import CLASSIFIER, LM_TASKS, EvalRoot, typed
from data.jsonl import iter_jsonl
from data.output_dir import check_run_dir
from pretrain.eval.samples import sample_documents

TEMPLATES = CONF_DIR / "eval_tasks"
# What gpt-eval writes into run.dir (names or glob patterns): a rerun may replace these, nothing else.
EVAL_DIR_NAMES = ("results.json", "results_k*.json", "results.md", "accuracy_vs_k.png", "tasks", ".hydra")


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"eval.sentiment.path={path}: no such file")
    rows = []
    for lineno, row in iter_jsonl(path):
        missing = [f for f in fields if f not in row]
        if missing:
            raise UserError(f"{path}:{lineno}: missing field {missing[0]!r}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: empty")
    return rows


def sentiment_task(cfg: Any, task_dir: Path) -> int:  # noqa: ANN401 - gpt-eval's EvalRoot or gpt-pretrain's groups
    """Fill in ``sentiment.yaml`` from ``cfg.eval.sentiment``; returns the number of documents."""
    spec = cfg.eval.sentiment
    if not spec.path:
        raise UserError("tasks=[sentiment] needs eval.sentiment.path=JSONL (text/label)")
    path = Path(spec.path).resolve()
    text, label = str(spec.text_field), str(spec.label_field)
    rows = _read_jsonl(path, (text, label))
    choices = sorted({str(row[label]) for row in rows})
    fewshot = Path(spec.fewshot_path or path).resolve()
    _read_jsonl(fewshot, (text, label))
    target_map = json.dumps({c: i for i, c in enumerate(choices)})
    task = _template("sentiment")
    task["dataset_kwargs"]["data_files"] = {"validation": str(path), "train": str(fewshot)}
    task["doc_to_text"] = "Review: {{" + text + "}}\nSentiment:"  # lm-eval's Jinja over the JSONL fields
    task["doc_to_choice"] = choices
    task["doc_to_target"] = "{{ " + target_map + "[" + label + "] }}"
    _write_task(task, task_dir / "sentiment.yaml")
    return len(rows)


def _template(name: str) -> dict[str, Any]:
    """A bundled lm-eval task (``conf/eval_tasks/NAME.yaml``) as data, to be filled in by field."""
    import yaml

    return yaml.safe_load((TEMPLATES / f"{name}.yaml").read_text())


def _write_task(task: dict[str, Any], path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))


def perplexity_task(cfg: Any, task_dir: Path) -> int:  # noqa: ANN401 - as sentiment_task
    """Fill in ``perplexity.yaml`` (its documents: the paragraphs of ``cfg.eval.perplexity.path``)."""
    if not cfg.eval.perplexity.path:
        raise UserError("tasks=[perplexity] needs eval.perplexity.path=TEXT_FILE")
    path = Path(cfg.eval.perplexity.path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UserError(f"eval.perplexity.path={path}: no such file") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"eval.perplexity.path={path}: not UTF-8 text") from exc
    except OSError as exc:  # a directory, no permission
        raise UserError(f"eval.perplexity.path={path}: cannot be read ({exc.strerror or exc})") from exc
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise UserError(f"eval.perplexity.path={path}: empty")
    docs_path = task_dir / "perplexity_docs.jsonl"
    docs_path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    task = _template("perplexity")
    task["dataset_kwargs"]["data_files"] = {"test": str(docs_path.resolve())}
    _write_task(task, task_dir / "perplexity.yaml")
    return len(docs)


BUILDERS = {"sentiment": sentiment_task, "perplexity": perplexity_task}


def chosen_tasks(config: EvalRoot, finetuned: bool) -> list[str]:
    """``tasks``, or the checkpoint's own; asking a pretrained model for a classifier is one line with
    the command that makes one, and a fine-tuned model's LM-only evaluation says so."""
    names = config.task_names()
    if names is None:
        return [CLASSIFIER] if finetuned else list(LM_TASKS)
    if CLASSIFIER in names and not finetuned:
        raise UserError(
            f"tasks=[{CLASSIFIER}]: checkpoint={config.checkpoint} has no classifier head (not a gpt-finetune "
            f"run); train one: gpt-finetune init.checkpoint={config.checkpoint} task.train=TRAIN.jsonl "
            "task.validation=VAL.jsonl run.dir=RUN, then gpt-eval checkpoint=RUN"
        )
    if finetuned and CLASSIFIER not in names:
        print(
            f"note: checkpoint={config.checkpoint} is a gpt-finetune run: tasks=[{','.join(names)}] score its "
            f"language model only; its classifier head: tasks=[{CLASSIFIER}]",
            flush=True,
        )
    return names


def run_lm_eval(cfg: DictConfig | EvalRoot) -> dict[int, dict[str, Any]]:
    """gpt-eval: every check (config, run.dir, task files) before the model is loaded, then lm-eval
    once per k and the classifier; returns lm-eval's results per k (the classifier's are in each)."""
    from pretrain.eval import classifier

    config = typed(cfg, EvalRoot)
    shots = fewshot_counts(config.num_fewshot)
    run_dir = Path(config.run.dir).expanduser()
    check_run_dir(run_dir, EVAL_DIR_NAMES, command="gpt-eval")
    step, state = classifier.peek_state(config.checkpoint)
    tasks = chosen_tasks(config, classifier.is_finetuned(state))
    head = None
    if CLASSIFIER in tasks:
        head = classifier.prepare_task(config.eval.classifier.path, step, state, config.limit, config.seed)
    lm_tasks = [t for t in tasks if t in LM_TASKS]
    task_dir = run_dir / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    counts = {task: BUILDERS[task](config, task_dir) for task in lm_tasks}

    from pretrain.interop.load import load_model  # megatron and torch: once everything above is fine

    loaded = load_model(config.checkpoint, classifier.with_head if head is not None else None)
    extra = {CLASSIFIER: classifier.evaluate(loaded, head, config.batch_size)} if head is not None else {}
    if head is not None:  # lm-eval scores the GPT inside the head's wrapper
        loaded = dataclasses.replace(loaded, model=loaded.model.module)
    by_k = _lm_eval(config, loaded, lm_tasks, counts, shots, run_dir) if lm_tasks else {shots[0]: {"results": {}}}
    for result in by_k.values():
        result["results"].update(extra)
    (run_dir / "results.json").write_text(json.dumps(by_k[shots[0]], indent=1, default=str))
    write_report(run_dir, by_k)
    return by_k


def _lm_eval(
    config: EvalRoot, loaded: Any, tasks: list[str], counts: dict[str, int], shots: list[int], run_dir: Path
) -> dict[int, dict[str, Any]]:
    """lm-eval on the bundled tasks once per k; ``results_k<K>.json`` each."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from pretrain.eval.lm_eval_model import GPTPretrainLM

    logging.getLogger("lm_eval.evaluator").addFilter(_set_fewshot_on_purpose)
    lm = GPTPretrainLM(loaded, batch_size=config.batch_size)
    manager = TaskManager(include_path=str(run_dir / "tasks"), include_defaults=False)
    samples = {task: sample_documents(count, config.limit, config.seed) for task, count in counts.items()}
    samples = {task: indices for task, indices in samples.items() if indices is not None}
    by_k: dict[int, dict[str, Any]] = {}
    for k in shots:
        # perplexity does not depend on k: run it with the first k only
        names = [t for t in tasks if t != "perplexity" or k == shots[0]]
        out = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=k,
            task_manager=manager,
            samples={t: samples[t] for t in names if t in samples} or None,
            log_samples=False,
            random_seed=config.seed,
            fewshot_random_seed=config.seed,
            bootstrap_iters=0,
        )
        result = {key: out[key] for key in ("results", "n-shot", "n-samples", "versions", "configs") if key in out}
        by_k[k] = result
        (run_dir / f"results_k{k}.json").write_text(json.dumps(result, indent=1, default=str))
    return by_k


def _set_fewshot_on_purpose(record: logging.LogRecord) -> bool:
    """lm-eval warns on every run that k overrides the task's default: gpt-eval sets k on purpose."""
    return not str(record.msg).startswith("Overwriting default num_fewshot")


def write_report(run_dir: Path, by_k: dict[int, dict[str, Any]]) -> None:
    """``results.md`` (one row per task and k) and ``accuracy_vs_k.png``."""
    lines = ["| task | k | metric | value |", "|---|---|---|---|"]
    accuracy: dict[int, float] = {}
    for k, result in sorted(by_k.items()):
        for task, metrics in result["results"].items():
            if task == CLASSIFIER and k != next(iter(by_k)):
                continue  # no k: one row
            shown = "-" if task == CLASSIFIER else k
            for name, value in metrics.items():
                if isinstance(value, float) and "stderr" not in name:
                    lines.append(f"| {task} | {shown} | {name.split(',')[0]} | {value:.4f} |")
                    if task == "sentiment" and name.startswith("acc,"):
                        accuracy[k] = value
    table = "\n".join(lines) + "\n"
    (run_dir / "results.md").write_text(table)
    print(table, flush=True)
    if accuracy:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ks = sorted(accuracy)
        ax.plot(ks, [accuracy[k] for k in ks], "o-")
        ax.set_xlabel("k (in-context examples)")
        ax.set_ylabel("sentiment accuracy")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
        fig.savefig(run_dir / "accuracy_vs_k.png", dpi=100, bbox_inches="tight")
        plt.close(fig)


@hydra.main(version_base=None, config_path="../conf", config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    from conf.cli import exit_on_user_error

    with exit_on_user_error():
        run_lm_eval(cfg)


def main() -> None:
    from conf.cli import check_command_line, quiet_third_party

    check_command_line(sys.argv[1:], "eval")
    quiet_third_party()
    _hydra_main()


if __name__ == "__main__":
    main()
