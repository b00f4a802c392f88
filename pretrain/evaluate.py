"""``gpt-eval``: in-context learning (k-shot, no gradient updates) and perplexity through lm-eval.

The bundled task templates (``conf/eval_tasks``) read local files only: gpt-eval fills in
the paths and, for ``sentiment``, the answer choices (the label set of the evaluation
file), writes the tasks into ``run.dir/tasks`` and runs lm-eval offline on them once per k.
``run.dir`` must be new, empty or an earlier gpt-eval's (``EVAL_DIR_NAMES``): gpt-eval rewrites
its own files there and refuses a directory holding anything else, before any work.
In-loop evaluation (``gpt-pretrain eval.every_steps=N``, ``pretrain/eval/in_loop.py``) fills in
the same task files through :data:`BUILDERS`, from the same ``eval.*`` keys.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig

from conf.cli import CONF_DIR
from conf.errors import UserError
from conf.groups import fewshot_counts
from data.jsonl import iter_jsonl
from data.output_dir import check_run_dir

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


def sentiment_task(cfg: DictConfig, task_dir: Path) -> None:
    spec = cfg.eval.sentiment
    if not spec.path:
        raise UserError("tasks=[sentiment] needs eval.sentiment.path=JSONL (text/label)")
    path = Path(spec.path).resolve()
    text, label = str(spec.text_field), str(spec.label_field)
    choices = sorted({str(row[label]) for row in _read_jsonl(path, (text, label))})
    fewshot = Path(spec.fewshot_path or path).resolve()
    _read_jsonl(fewshot, (text, label))
    target_map = json.dumps({c: i for i, c in enumerate(choices)})
    task = _template("sentiment")
    task["dataset_kwargs"]["data_files"] = {"validation": str(path), "train": str(fewshot)}
    task["doc_to_text"] = "Review: {{" + text + "}}\nSentiment:"  # lm-eval's Jinja over the JSONL fields
    task["doc_to_choice"] = choices
    task["doc_to_target"] = "{{ " + target_map + "[" + label + "] }}"
    _write_task(task, task_dir / "sentiment.yaml")


def _template(name: str) -> dict[str, Any]:
    """A bundled lm-eval task (``conf/eval_tasks/NAME.yaml``) as data, to be filled in by field."""
    import yaml

    return yaml.safe_load((TEMPLATES / f"{name}.yaml").read_text())


def _write_task(task: dict[str, Any], path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))


def perplexity_task(cfg: DictConfig, task_dir: Path) -> None:
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


BUILDERS = {"sentiment": sentiment_task, "perplexity": perplexity_task}


def run_lm_eval(cfg: DictConfig) -> dict[int, dict[str, Any]]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = list(cfg.tasks) if isinstance(cfg.tasks, ListConfig) else [str(cfg.tasks)]
    unknown = [t for t in tasks if t not in BUILDERS]
    if unknown:
        raise UserError(f"tasks={unknown[0]}: unknown (bundled: {', '.join(BUILDERS)})")
    shots = fewshot_counts(cfg.num_fewshot)
    run_dir = Path(cfg.run.dir).expanduser()
    check_run_dir(run_dir, EVAL_DIR_NAMES, command="gpt-eval")
    task_dir = run_dir / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        BUILDERS[task](cfg, task_dir)

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from pretrain.eval.lm_eval_model import GPTPretrainLM
    from pretrain.interop.load import load_model

    lm = GPTPretrainLM(load_model(str(cfg.checkpoint)), batch_size=int(cfg.batch_size))
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    by_k: dict[int, dict[str, Any]] = {}
    for k in shots:
        # perplexity does not depend on k: run it with the first k only
        names = [t for t in tasks if t != "perplexity" or k == shots[0]]
        out = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=k,
            task_manager=manager,
            limit=cfg.limit,
            log_samples=False,
            random_seed=int(cfg.seed),
            fewshot_random_seed=int(cfg.seed),
            bootstrap_iters=0,
        )
        result = {key: out[key] for key in ("results", "n-shot", "versions", "configs") if key in out}
        by_k[k] = result
        (run_dir / f"results_k{k}.json").write_text(json.dumps(result, indent=1, default=str))
    (run_dir / "results.json").write_text((run_dir / f"results_k{shots[0]}.json").read_text())
    write_report(run_dir, by_k)
    return by_k


def write_report(run_dir: Path, by_k: dict[int, dict[str, Any]]) -> None:
    """``results.md`` (one row per task and k) and ``accuracy_vs_k.png``."""
    lines = ["| task | k | metric | value |", "|---|---|---|---|"]
    accuracy: dict[int, float] = {}
    for k, result in sorted(by_k.items()):
        for task, metrics in result["results"].items():
            for name, value in metrics.items():
                if isinstance(value, float) and "stderr" not in name:
                    lines.append(f"| {task} | {k} | {name.split(',')[0]} | {value:.4f} |")
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
    from conf.cli import answer_help, quiet_third_party

    answer_help(sys.argv[1:], "eval", groups=())
    quiet_third_party()
    _hydra_main()


if __name__ == "__main__":
    main()
