"""gpt-eval: lm-eval on bundled local tasks, offline; log-likelihoods equal the training loss."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import SHARED_DATA, TINYSHAKESPEARE, one_line_error, run_cli

VALIDATION = SHARED_DATA / "rotten_tomatoes.validation.jsonl"


@pytest.mark.slow
def test_loglikelihood_is_minus_the_summed_training_loss(trained_runs, char_shards: Path) -> None:  # noqa: ANN001
    from data.shards import load_manifest, read_shard
    from pretrain.eval.lm_eval_model import GPTPretrainLM
    from pretrain.interop.load import load_model
    from pretrain.model import position_ids

    loaded = load_model(trained_runs["tp1"])
    manifest = load_manifest(char_shards)
    window = torch.from_numpy(
        read_shard(manifest.shards("val")[0], manifest.dtype, manifest.seq_len)[:3].astype("int64")
    )
    with torch.no_grad():
        loss = loaded.model(window[:, :-1], position_ids(3, 64), None, labels=window[:, 1:])  # [3, 64] token losses
    lm = GPTPretrainLM(loaded)
    for row in range(3):
        ids = window[row].tolist()
        context, continuation = loaded.tokenizer.decode(ids[:1]), loaded.tokenizer.decode(ids[1:])
        ((logprob, _),) = lm.loglikelihood([SimpleNamespace(args=(context, continuation))])
        assert logprob == pytest.approx(-float(loss[row].sum()), abs=1e-4)
        # the same continuation after a context longer than the window: truncated from the left to the
        # window's 64 + 1 tokens, which are the row's own (the 500 x's all fall off): the same log-prob
        ((truncated, _),) = lm.loglikelihood([SimpleNamespace(args=("x" * 500 + context, continuation))])
        assert len(ids) == loaded.context + 1 and truncated == pytest.approx(logprob, abs=1e-5)


@pytest.mark.slow
def test_gpt_eval_few_shot_and_perplexity_offline(trained_runs, tmp_path: Path) -> None:  # noqa: ANN001
    results = {}
    for name in ("tp1", "tp2"):
        run_dir = tmp_path / name
        result = run_cli(
            "pretrain.evaluate",
            f"checkpoint={trained_runs[name]}",
            f"run.dir={run_dir}",
            "limit=60",
            f"eval.sentiment.path={VALIDATION}",
            f"eval.perplexity.path={TINYSHAKESPEARE}",
            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "aggregation is not" not in result.stdout + result.stderr  # the bundled tasks define theirs
        assert "higher_is_better is not" not in result.stdout + result.stderr
        for file in (
            "results.json",
            "results_k0.json",
            "results_k1.json",
            "results_k5.json",
            "results.md",
            "accuracy_vs_k.png",
        ):
            assert (run_dir / file).is_file(), file
        results[name] = {k: json.loads((run_dir / f"results_k{k}.json").read_text())["results"] for k in (0, 1, 5)}
        counts = json.loads((run_dir / "results.json").read_text())["n-samples"]
        assert {task: count["effective"] for task, count in counts.items()} == {"sentiment": 60, "perplexity": 60}
        assert json.loads((run_dir / "results.json").read_text())["results"]["sentiment"]["acc,none"] >= 0
        assert set(results[name][0]) == {"sentiment", "perplexity"} and set(results[name][5]) == {"sentiment"}
        assert results[name][0]["perplexity"]["byte_perplexity,none"] > 1.0
    # a checkpoint saved at tp=2 (same seed and data) evaluates to the same numbers as at tp=1
    for k in (0, 1, 5):
        assert results["tp2"][k]["sentiment"]["acc,none"] == results["tp1"][k]["sentiment"]["acc,none"]
    ppl = [results[n][0]["perplexity"]["bits_per_byte,none"] for n in ("tp1", "tp2")]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-4)


@pytest.mark.slow
def test_gpt_eval_bad_inputs(trained_runs, tmp_path: Path) -> None:  # noqa: ANN001
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "great"}\n')
    cases = [
        (["tasks=[sentiment]", f"eval.sentiment.path={tmp_path}/none.jsonl"], "none.jsonl"),
        (["tasks=[sentiment]", f"eval.sentiment.path={bad_jsonl}"], "missing field 'label'"),
        (["tasks=[perplexity]"], "eval.perplexity.path"),
        (["tasks=[hellaswag]"], "tasks=hellaswag"),
    ]
    for args, culprit in cases:
        result = run_cli("pretrain.evaluate", f"checkpoint={trained_runs['tp1']}", f"run.dir={tmp_path}/r", *args)
        assert culprit in one_line_error(result, 2), result.stderr[-2000:]  # the whole of stderr, not its last line


@pytest.mark.slow
def test_lm_eval_cli_knows_gpt_pretrain_by_name(trained_runs, tmp_path: Path) -> None:  # noqa: ANN001
    """``lm_eval --model gpt-pretrain`` from the venv's console script scores what gpt-eval does."""
    from conf.errors import UserError
    from pretrain.eval.lm_eval_model import GPTPretrainLM

    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(TINYSHAKESPEARE.read_text().split("\n\n")[:4]) + "\n")
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    checkpoint, ours = trained_runs["tp1"], tmp_path / "gpt-eval"
    result = run_cli(
        "pretrain.evaluate",
        f"checkpoint={checkpoint}",
        f"run.dir={ours}",
        "tasks=[perplexity]",
        "num_fewshot=0",
        "batch_size=8",
        f"eval.perplexity.path={text}",
        env=offline,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    want = json.loads((ours / "results_k0.json").read_text())["results"]["perplexity"]

    # the task file gpt-eval wrote, run by lm-eval's CLI from another directory
    command = [str(Path(sys.executable).parent / "lm_eval"), "--model", "gpt-pretrain", "--model_args"]
    command += [f"checkpoint={checkpoint}", "--tasks", "perplexity", "--include_path", str(ours / "tasks")]
    command += ["--batch_size", "8", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **offline}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "out").rglob("results_*.json")
    out = json.loads(path.read_text())
    assert out["config"]["model"] == "gpt-pretrain"
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert out["results"]["perplexity"][metric] == pytest.approx(want[metric], rel=1e-6, abs=1e-6), metric

    # lm-eval's constructors: a missing checkpoint or a window past seq_len is our one-line UserError
    with pytest.raises(UserError, match="not a run dir"):
        GPTPretrainLM.create_from_arg_string(f"checkpoint={tmp_path / 'none'}")
    with pytest.raises(UserError, match="seq_len"):
        GPTPretrainLM.create_from_arg_obj({"checkpoint": str(checkpoint), "max_length": 65}, {"batch_size": "8"})


# In-loop evaluation (gpt-pretrain eval.every_steps): lm-eval on the weights being trained, at any layout.
IN_LOOP_TRAIN = [
    "model=tiny",
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.max_steps=4",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "train.peak_tflops=1",  # no peak measurement at start (MFU is not looked at here)
    "logging.wandb=disabled",
    "logging.progress_bar=false",
    "eval.every_steps=2",  # at steps 2 and 4
    "eval.num_fewshot=0",
]
# a task file that lm-eval accepts but cannot evaluate: its documents have no field "nope"
BROKEN_TASK = """task: broken
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{ nope.field }}}}"
doc_to_target: " x"
metric_list:
  - metric: acc
"""


def in_loop_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A short text, 16 labelled reviews of both labels, and a task YAML that raises."""
    import random

    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(TINYSHAKESPEARE.read_text().split("\n\n")[:4]) + "\n")
    lines = VALIDATION.read_text().splitlines()
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("\n".join(random.Random(0).sample(lines, 16)) + "\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN_TASK.format(data=reviews))
    return text, reviews, broken


@pytest.mark.slow
def test_in_loop_eval_equals_gpt_eval_and_survives_a_failing_task(char_shards: Path, tmp_path: Path) -> None:
    """At tp=2 x pp=2 (one 4-rank run: cheaper than a tp=2 and a pp=2 run) the in-loop metrics of the
    last step are gpt-eval's on that step's checkpoint; a task that raises is one warning per
    evaluation and training goes on."""
    from conf.groups import PerplexityEvalConfig, SentimentEvalConfig
    from conf.tool_schemas import EvalRoot, EvalRunConfig, EvalTaskFiles
    from pretrain.evaluate import run_lm_eval
    from tests.distributed import torchrun

    text, reviews, broken = in_loop_inputs(tmp_path)
    run_dir = tmp_path / "run"
    tasks = f"eval.tasks=[perplexity,sentiment,{broken}]"
    paths = [f"eval.perplexity.path={text}", f"eval.sentiment.path={reviews}"]
    layout = ("parallel.tp=2", "parallel.pp=2")
    result = torchrun(4, f"data.dir={char_shards}", f"run.dir={run_dir}", *IN_LOOP_TRAIN, tasks, *paths, *layout)

    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: in-loop evaluation")]
    assert len(warnings) == 2 and all(str(broken) in w for w in warnings), result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "loss" in r) == 4  # trained past the failure at step 2
    evals = {r["step"]: r for r in rows if "eval_time_s" in r}
    assert sorted(evals) == [2, 4] and all(r["eval_failures"] == 1 and r["eval_time_s"] > 0 for r in evals.values())
    assert (run_dir / "eval.png").is_file() and (run_dir / "loss.png").is_file()

    files = EvalTaskFiles(sentiment=SentimentEvalConfig(path=str(reviews)), perplexity=PerplexityEvalConfig(str(text)))
    cfg = EvalRoot(
        checkpoint=str(run_dir / "checkpoints" / "step_4"),
        run=EvalRunConfig(str(tmp_path / "gpt-eval")),
        tasks=["perplexity", "sentiment"],
        num_fewshot=0,
        eval=files,
    )
    want = run_lm_eval(cfg)[0]["results"]
    compared = 0
    for task, metrics in want.items():
        for name, value in metrics.items():
            if isinstance(value, float) and "stderr" not in name:
                got = evals[4][f"eval/{task}/{name.split(',')[0]}"]
                assert got == pytest.approx(value, rel=1e-4, abs=1e-4), (task, name)
                compared += 1
    assert compared == 4  # word/byte perplexity, bits per byte, accuracy


def test_in_loop_eval_config_errors_before_training(char_shards: Path, tmp_path: Path) -> None:
    """What gpt-pretrain checks before any work (validate, then the task's InLoopEval): one line each."""
    from conf.cli import compose
    from conf.errors import UserError
    from conf.schema import validate
    from pretrain.eval.in_loop import InLoopEval, metric_record

    base = [f"data.dir={char_shards}", "eval.every_steps=2"]
    cases = [
        (["eval.tasks=[sentiment]"], "eval.tasks=[sentiment] needs eval.sentiment.path=JSONL (text/label)"),
        (["eval.tasks=[perplexity]"], "eval.tasks=[perplexity] needs eval.perplexity.path=TEXT_FILE"),
        ([], "eval.every_steps=2: eval.tasks is empty"),
        (["eval.tasks=[hellaswag]"], "eval.tasks: unknown task 'hellaswag'"),
        ([f"eval.tasks=[{tmp_path}/none.yaml]"], "none.yaml: no such file"),
        (["eval.every_steps=-1"], "eval.every_steps=-1: must be >= 0"),
        (["eval.tasks=[sentiment]", "eval.num_fewshot=[0,-1]"], "eval.num_fewshot=-1: each k must be an integer >= 0"),
    ]
    for args, line in cases:
        with pytest.raises(UserError, match=re.escape(line)):
            validate(compose([*base, *args]))
    validate(compose([f"data.dir={char_shards}", "eval.tasks=[sentiment]"]))  # off: the tasks are not read
    # several k: one key per k (a single k keeps eval/<task>/<metric>)
    results = {"sentiment": {"acc,none": 0.5, "acc_stderr,none": 0.1}}
    assert metric_record(results, 5) == {"eval/sentiment/5shot/acc": 0.5}
    assert metric_record(results) == {"eval/sentiment/acc": 0.5}
    cfg = compose([*base, "eval.tasks=[sentiment]", f"eval.sentiment.path={tmp_path}/none.jsonl"])
    validate(cfg)
    with pytest.raises(UserError, match="none.jsonl: no such file"):  # the task files, read at the task's start
        InLoopEval.from_config(cfg, char_shards)


def test_limit_samples_documents_across_the_split_seeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``limit=N``: N documents drawn (seeded) from the whole split and handed to lm-eval as its
    ``samples=``, which evaluates exactly those; lm-eval's own ``limit`` takes the first N, which in a
    file sorted by label are all one class."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager, get_task_dict

    from conf.tool_schemas import EvalRoot, EvalRunConfig
    from pretrain.eval.samples import sample_documents
    from pretrain.evaluate import sentiment_task

    rows = sorted((json.loads(line) for line in VALIDATION.read_text().splitlines()[:200]), key=lambda r: r["label"])
    sorted_file = tmp_path / "sorted.jsonl"
    sorted_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = EvalRoot(checkpoint="unused", run=EvalRunConfig(str(tmp_path)))
    cfg.eval.sentiment.path = str(sorted_file)
    count = sentiment_task(cfg, tmp_path)
    indices = sample_documents(count, 20, seed=1234)
    assert indices == sample_documents(count, 20, seed=1234) and indices != sample_documents(count, 20, seed=7)
    assert len(set(indices)) == 20 and indices == sorted(indices)
    assert min(indices) < count // 4 and max(indices) >= 3 * count // 4  # spread over the split
    assert sample_documents(count, count, seed=1234) is None and sample_documents(count, None, seed=1) is None

    task = get_task_dict(["sentiment"], TaskManager(include_path=str(tmp_path), include_defaults=False))["sentiment"]
    sampled = [doc for _, doc in task.doc_iterator(samples=indices)]
    assert [doc["text"] for doc in sampled] == [rows[i]["text"] for i in indices]
    assert {doc["label"] for doc in sampled} == {row["label"] for row in rows}  # both classes
    assert {doc["label"] for _, doc in task.doc_iterator(limit=20)} == {rows[0]["label"]}  # lm-eval's limit


def test_gpt_eval_refuses_a_misspelt_key_or_a_wrong_type_in_one_line(tmp_path: Path) -> None:
    """Refused while composing, against gpt-eval's own schema (its ``eval`` and ``run`` are not
    gpt-pretrain's), before any checkpoint is read."""
    base = [f"checkpoint={tmp_path}/none", f"run.dir={tmp_path}/run"]
    for arg, line in (
        ("eval.sentiment.pth=x.jsonl", "eval.sentiment.pth: unknown key (did you mean eval.sentiment.path?)"),
        ("eval.limit=3", "eval.limit: unknown key (eval has: classifier, perplexity, sentiment)"),
        ("limt=3", "limt: unknown key (did you mean limit?)"),
        ("limit=abc", "limit=abc: expected an integer (or null)"),
        ("limit=0", "limit=0: must be >= 1"),
    ):
        assert one_line_error(run_cli("pretrain.evaluate", *base, arg), 2) == f"error: {line}"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_gpt_eval_on_a_finetuned_run_evaluates_its_classifier_head(trained_runs, tmp_path: Path) -> None:  # noqa: ANN001
    """A gpt-finetune run is evaluated by its head (by default on the run's task.test): the accuracy
    gpt-finetune reported, and the majority-class rate beside it; with LM tasks, its body is scored
    too. A pretrained checkpoint asked for a classifier: one line naming the command that makes one."""
    from tests.integration.test_finetune import finetune, mislabelled, synthetic, write_jsonl

    rows = synthetic("classification", 64, 3)
    train, val = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "val.jsonl", rows[:16])
    test = write_jsonl(tmp_path / "test.jsonl", rows[16:20] + mislabelled(rows[20:28]))  # a third labelled right
    run = tmp_path / "ft"
    tuned = finetune(trained_runs["tp1"], "classification", train, val, run, "train.max_steps=4", f"task.test={test}")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    reported = json.loads((run / "results.json").read_text())

    result = run_cli("pretrain.evaluate", f"checkpoint={run}", f"run.dir={tmp_path / 'ev'}")
    assert result.returncode == 0, result.stderr[-3000:]
    head = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]["classifier"]
    assert head["path"] == str(test) and head["examples"] == 12
    assert head["acc,none"] == pytest.approx(reported["test_acc"], abs=1e-9)
    labels = [row["label"] for row in json.loads(f"[{','.join(test.read_text().splitlines())}]")]
    assert head["majority_rate,none"] == pytest.approx(max(labels.count(x) for x in set(labels)) / 12)

    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(TINYSHAKESPEARE.read_text().split("\n\n")[:3]) + "\n")
    args = ["tasks=[classifier,perplexity]", f"eval.classifier.path={val}", f"eval.perplexity.path={text}"]
    result = run_cli("pretrain.evaluate", f"checkpoint={run}", f"run.dir={tmp_path / 'ev2'}", "num_fewshot=0", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    both = json.loads((tmp_path / "ev2" / "results.json").read_text())["results"]
    assert both["classifier"]["acc,none"] == pytest.approx(reported["val_acc"], abs=1e-9)
    assert both["classifier"]["majority_rate,none"] == 0.5 and both["perplexity"]["bits_per_byte,none"] > 0

    pretrained = [f"checkpoint={trained_runs['tp1']}", f"run.dir={tmp_path / 'ev3'}"]
    refused = run_cli("pretrain.evaluate", *pretrained, "tasks=[classifier]")
    assert "has no classifier head" in one_line_error(refused, 2) and "gpt-finetune init.checkpoint=" in refused.stderr
