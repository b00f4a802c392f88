"""gpt-finetune: GPT-1 input transformations, L3 = L2 + λ·L1, any-layout init, resume, bad inputs."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def synthetic(task_type: str, count: int, seed: int) -> list[dict]:
    """Tiny learnable tasks over the tinyshakespeare characters."""
    rng = random.Random(seed)

    def word(letters: str = ALPHABET, n: int = 6) -> str:
        return "".join(rng.choice(letters) for _ in range(n))

    rows = []
    for i in range(count):
        yes = i % 2 == 0
        if task_type == "classification":  # which half of the alphabet the text is made of
            text = word("abcdefghijklm" if yes else "nopqrstuvwxyz", 12)
            rows.append({"text": text, "label": "first" if yes else "second"})
        elif task_type == "entailment":
            premise = word()
            hypothesis = premise if yes else word()
            rows.append({"premise": premise, "hypothesis": hypothesis, "label": "same" if yes else "other"})
        elif task_type == "similarity":
            a = word()
            rows.append({"text_a": a, "text_b": a if yes else word(), "label": 1 if yes else 0})
        else:
            context = word()
            choices = [word(), word(), context]
            rng.shuffle(choices)
            rows.append({"context": context, "choices": choices, "label": choices.index(context)})
    return rows


def mislabelled(rows: list[dict]) -> list[dict]:
    """``rows`` with every label wrong: the other of the two, the next of the three choices."""
    labels = {"first": "second", "second": "first", "same": "other", "other": "same"}
    out = []
    for row in rows:
        label = row["label"]
        wrong = (label + 1) % 3 if "choices" in row else 1 - label if isinstance(label, int) else labels[label]
        out.append({**row, "label": wrong})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FAST = [
    "train.micro_batch=8",
    "train.global_batch=16",
    "train.lr=2e-3",
    "train.warmup_fraction=0.1",
    "train.eval_micro_batch=16",
    "logging.wandb=disabled",
    "logging.progress_bar=false",
]


def finetune(init: Path, task_type: str, train: Path, val: Path, run_dir: Path, *extra: str, nproc: int = 1):  # noqa: ANN201
    args = [
        f"init.checkpoint={init}",
        f"task.type={task_type}",
        f"task.train={train}",
        f"task.validation={val}",
        f"run.dir={run_dir}",
        *FAST,
        *extra,
    ]
    if nproc == 1:
        return run_cli("pretrain.finetune", *args)
    from tests.distributed import free_port

    return run_cli(
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "pretrain.finetune",
        *args,
    )


def train_losses(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


TEST_EXAMPLES = 25


@pytest.mark.slow
@pytest.mark.parametrize("task_type", ["classification", "entailment", "similarity", "multiple_choice"])
def test_each_input_transformation_trains_end_to_end(trained_runs, tmp_path: Path, task_type: str) -> None:  # noqa: ANN001
    train = write_jsonl(tmp_path / "train.jsonl", synthetic(task_type, 96, 0))
    val = write_jsonl(tmp_path / "val.jsonl", synthetic(task_type, 32, 1))
    # the test split: 25 other examples, every one labelled wrong
    test = write_jsonl(tmp_path / "test.jsonl", mislabelled(synthetic(task_type, TEST_EXAMPLES, 2)))
    run_dir = tmp_path / "run"
    result = finetune(trained_runs["tp1"], task_type, train, val, run_dir, "finetune.epochs=6", f"task.test={test}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == task_type and results["num_train_examples"] == 96
    assert results["num_validation_examples"] == 32
    # test_acc is a count of the test file's 25 examples (no k/25 but 0 and 1 is a count of the 32 validation
    # examples) ...
    correct = results["test_acc"] * TEST_EXAMPLES
    assert correct == pytest.approx(round(correct), abs=1e-6), results
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_acc" in m] == [6, 12, 18, 24, 30, 36]  # every epoch
    steps = train_losses(run_dir)
    assert steps[36]["cls_loss"] < steps[1]["cls_loss"]  # it learns
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_36"
    if task_type == "classification":
        assert results["val_acc"] >= 0.9  # a trivially separable task ...
        assert results["test_acc"] <= 0.1, results  # ... so the mislabelled test split is (nearly) all wrong


@pytest.mark.slow
def test_unseen_label_and_cli_errors_are_one_line(trained_runs, tmp_path: Path) -> None:  # noqa: ANN001
    train = write_jsonl(tmp_path / "train.jsonl", synthetic("classification", 32, 0))
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "abc", "label": "third"}])
    cases = [
        (val, [], "label 'third' does not occur in the train split"),
        (tmp_path / "missing.jsonl", [], "missing.jsonl: not found"),
        (train, ["task.type=regression"], "task.type=regression: expected one of"),
        (train, ["train.global_batch=64"], "fewer than train.global_batch=64"),
        (train, ["finetune.head_lr_mult=0"], "finetune.head_lr_mult=0.0: must be > 0"),
    ]
    for validation, extra, message in cases:
        result = finetune(trained_runs["tp1"], "classification", train, validation, tmp_path / "run", *extra)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert message in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing written for bad input


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sentiment")
    rows = synthetic("classification", 64, 3)
    return write_jsonl(root / "train.jsonl", rows), write_jsonl(root / "val.jsonl", rows[:16])


@pytest.mark.slow
def test_tp2_checkpoint_and_tp2_finetuning_give_tp1_first_step_loss(trained_runs, sentiment, tmp_path: Path) -> None:  # noqa: ANN001
    """Same pretrained model saved at tp=1 and tp=2; fine-tuned at tp=1 from both, at tp=2, and on DeepSpeed."""
    train, val = sentiment
    one = "train.max_steps=2"
    runs = {
        "tp1-ckpt": finetune(trained_runs["tp1"], "classification", train, val, tmp_path / "a", one),
        "tp2-ckpt": finetune(trained_runs["tp2"], "classification", train, val, tmp_path / "b", one),
        "tp2-finetune": finetune(
            trained_runs["tp1"], "classification", train, val, tmp_path / "c", one, "parallel.tp=2", nproc=2
        ),
        # the same Trainer and loss on the other engine (one process: the same dropout draws)
        "deepspeed": finetune(trained_runs["tp1"], "classification", train, val, tmp_path / "d", one, "parallel=zero1"),
    }
    for name, result in runs.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    first = {name: train_losses(tmp_path / d)[1]["loss"] for name, d in zip(runs, "abcd", strict=True)}
    assert first["tp2-ckpt"] == pytest.approx(first["tp1-ckpt"], abs=1e-4)
    assert first["tp2-finetune"] == pytest.approx(first["tp1-ckpt"], abs=1e-4)
    assert first["deepspeed"] == pytest.approx(first["tp1-ckpt"], abs=1e-4)
    # readers load fine-tuned checkpoints of either engine (DeepSpeed's through its converted view),
    # with the added tokens beyond the tokenizer masked out of sampling
    pretrained = next((trained_runs["tp1"] / "checkpoints").glob("step_*")) / "train_state.json"
    for run_dir in (tmp_path / "a", tmp_path / "d"):
        state = json.loads((run_dir / "checkpoints" / "step_2" / "train_state.json").read_text())
        assert state["task"]["added_tokens"] == 3  # and the tokenizer's vocabulary, as the pretrained run's:
        assert state["vocab_size"] == json.loads(pretrained.read_text())["vocab_size"]
        sample = run_cli("pretrain.generate", f"checkpoint={run_dir}", "prompt=ab", "max_new_tokens=20")
        assert sample.returncode == 0 and sample.stdout.strip().startswith("ab"), sample.stderr[-2000:]


@pytest.mark.slow
def test_lambda_zero_scratch_and_resume(trained_runs, sentiment, tmp_path: Path) -> None:  # noqa: ANN001
    train, val = sentiment
    base = ["train.max_steps=8", "train.save_every=4", "train.keep_last=2"]
    full = tmp_path / "full"
    assert finetune(trained_runs["tp1"], "classification", train, val, full, *base).returncode == 0
    no_aux = tmp_path / "no_aux"
    result = finetune(trained_runs["tp1"], "classification", train, val, no_aux, *base, "finetune.aux_lm_weight=0")
    assert result.returncode == 0, result.stderr[-2000:]
    step1 = train_losses(no_aux)[1]
    assert step1["loss"] == pytest.approx(step1["cls_loss"], rel=1e-6)  # L3 = L2 when λ = 0
    step1_aux = train_losses(full)[1]
    assert step1_aux["loss"] == pytest.approx(step1_aux["cls_loss"] + 0.5 * step1_aux["lm_loss"], rel=1e-5)
    scratch = tmp_path / "scratch"
    result = finetune(trained_runs["tp1"], "classification", train, val, scratch, *base, "finetune.from_scratch=true")
    assert result.returncode == 0, result.stderr[-2000:]
    # random weights predict (nearly) uniformly over the padded vocabulary (65 chars + 3 added -> 72);
    # the pretrained model does not (it is confidently Shakespearean on random letters)
    assert train_losses(scratch)[1]["lm_loss"] == pytest.approx(math.log(72), abs=0.05)
    assert abs(step1_aux["lm_loss"] - math.log(72)) > 0.5
    # resume: the run dir as a crash after the step-4 checkpoint leaves it
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_8")
    (resumed / "checkpoints" / "latest").write_text("step_4\n")
    assert finetune(trained_runs["tp1"], "classification", train, val, resumed, *base).returncode == 0
    for step in range(5, 9):
        assert train_losses(resumed)[step]["loss"] == train_losses(full)[step]["loss"], step


# finetune.transfer_layers (GPT-1 Figure 2, left) and finetune.head_only_epochs (LP-FT)

HEAD = "finetune_head."


def finetune_task(init: Path, train: Path, run_dir: Path, *extra: str):  # noqa: ANN201
    """(the run, FinetuneTask) as gpt-finetune makes them, in this process."""
    from conf.cli import compose
    from conf.schema import validate
    from parallel.run_config import Groups, Run
    from pretrain.tasks.finetune import FinetuneTask

    args = [f"init.checkpoint={init}", f"task.train={train}", f"task.validation={train}", f"run.dir={run_dir}"]
    groups = Groups(validate(compose([*args, *FAST, *extra], config_name="finetune")))
    task = FinetuneTask(groups)
    return Run.build({**groups.as_dict(), **task.configure(groups)}, world_size=1, rank=0), task


def built(init: Path, train: Path, run_dir: Path, *extra: str) -> dict:
    """The fine-tuning model's weights as gpt-finetune builds them, before an engine wraps the model
    (one process: the whole model), with the model itself under ``None``."""
    from parallel import cpu_compat
    from parallel.engine import layout_config

    cfg, task = finetune_task(init, train, run_dir, *extra)
    topo = cfg.layout
    topo.init(seed=1)
    spec = task.model_spec(cfg, resuming=False)
    with cpu_compat.tensors_pass_as_cuda():
        model = spec.build(layout_config(spec.config, topo, False), None)
    return {None: model, **weights(model.state_dict())}


def weights(state: dict) -> dict:
    """Tensors by name (copies), the GPT's without the wrapper's ``module.`` prefix."""
    import torch

    return {k.removeprefix("module."): v.detach().clone() for k, v in state.items() if torch.is_tensor(v)}


def megatron_weights(model, step_dir: Path) -> dict:  # noqa: ANN001
    """A megatron fine-tuning step's model weights (any layout), resharded into ``model``'s layout
    (the load writes into ``model``'s tensors)."""
    from megatron.core import dist_checkpointing

    return weights(dist_checkpointing.load({"model": model.sharded_state_dict()}, str(step_dir))["model"])


OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # DeepSpeed's, ZeRO-1 at dp=1


def deepspeed_weights(step_dir: Path) -> dict:
    import torch

    return weights(torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"])


def same(a: dict, b: dict, names: list[str]) -> list[str]:
    import torch

    return [n for n in names if torch.equal(a[n], b[n])]


@pytest.mark.slow
def test_transfer_layers_keeps_the_first_k_blocks_and_the_rest_as_from_scratch(trained_runs, tmp_path: Path) -> None:  # noqa: ANN001
    """In process: the built model against the pretrained load (k = null) and the from-scratch build."""
    from conf.errors import UserError

    init, train = trained_runs["tp1"], write_jsonl(tmp_path / "train.jsonl", synthetic("classification", 32, 0))
    full = built(init, train, tmp_path / "run")
    scratch = built(init, train, tmp_path / "run", "finetune.from_scratch=true")
    names = [n for n in full if n is not None]
    for k in (0, 1, 4):
        model = built(init, train, tmp_path / "run", f"finetune.transfer_layers={k}")
        kept = ("embedding.", *(f"decoder.layers.{i}." for i in range(k)), *(("decoder.",) if k == 4 else ()))
        bottom = [n for n in names if n.startswith(kept)]
        top = [n for n in names if n not in bottom and not n.startswith(HEAD)]
        assert "decoder.final_layernorm.weight" in (top if k < 4 else bottom)  # the top's, below all blocks
        assert same(model, full, bottom) == bottom, k  # the pretrained embeddings and blocks 0..k-1
        assert same(model, scratch, top) == top, k  # the rest: as finetune.from_scratch=true builds it
        assert not same(model, full, [n for n in top if n.endswith("linear_fc1.weight")]), k  # (which differs)
        assert same(model, full, [f"{HEAD}weight"]) == [f"{HEAD}weight"]  # the same head in every build
    for extra, message in (
        ("finetune.transfer_layers=5", "finetune.transfer_layers=5: the checkpoint has 4 layers (expected 0 ... 4)"),
        ("finetune.transfer_layers=-1", "finetune.transfer_layers=-1: must be >= 0"),
        ("finetune.head_only_epochs=-1", "finetune.head_only_epochs=-1: must be >= 0"),
    ):
        with pytest.raises(UserError, match=re.escape(message)):
            built(init, train, tmp_path / "run", extra)
    with pytest.raises(UserError, match="with finetune.from_scratch=true"):
        built(init, train, tmp_path / "run", "finetune.transfer_layers=2", "finetune.from_scratch=true")


LP_FT = ["finetune.head_only_epochs=1", "finetune.epochs=1"]  # 32 examples, batch 16: steps 1-2 head, 3-4 all


def body(names: dict) -> list[str]:
    return [n for n in names if n is not None and not n.startswith(HEAD)]


@pytest.mark.slow
def test_head_only_epochs_leave_the_body_unchanged_at_pp2_then_full_finetuning_moves_it(
    trained_runs,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    """Megatron at pp=2 with transfer_layers=3 (stage 1 holds a kept block and a fresh one): the
    checkpoint of the last head-only step has exactly the built body, a trained head; the full
    phase then moves the body."""
    train = write_jsonl(tmp_path / "train.jsonl", synthetic("classification", 32, 0))
    run_dir, extra = tmp_path / "run", [*LP_FT, "finetune.transfer_layers=3", "train.keep_last=2"]
    result = finetune(trained_runs["tp1"], "classification", train, train, run_dir, "parallel.pp=2", *extra, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = train_losses(run_dir)
    assert [steps[s]["phase"] for s in (1, 2, 3, 4)] == ["head", "head", "full", "full"]
    start = built(trained_runs["tp1"], train, tmp_path / "x", *extra)
    after_head, after_full = (megatron_weights(start[None], run_dir / "checkpoints" / f"step_{s}") for s in (2, 4))
    names = body(start)
    assert same(after_head, start, names) == names  # bit-identical: no gradient, no decay, no momentum
    assert not same(after_head, start, [f"{HEAD}weight", f"{HEAD}bias"])  # the head trained
    matrices = [n for n in names if n.endswith(".weight") and after_full[n].ndim == 2]
    assert not same(after_full, after_head, matrices)  # every matrix of the body moves in full fine-tuning


@pytest.mark.slow
def test_head_only_epochs_on_deepspeed_and_a_resume_inside_the_phase(trained_runs, tmp_path: Path) -> None:  # noqa: ANN001
    """DeepSpeed (ZeRO-1, dp=1): the body is unchanged through the head-only steps; a run resumed
    from a checkpoint inside the phase continues in it and then fine-tunes exactly as the
    uninterrupted run does (the fresh optimizer state at the first full step included)."""
    import torch

    train = write_jsonl(tmp_path / "train.jsonl", synthetic("classification", 32, 0))
    run_dir, extra = tmp_path / "run", [*LP_FT, "parallel=zero1", "train.save_every=1", "train.keep_last=4"]
    result = finetune(trained_runs["tp1"], "classification", train, train, run_dir, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    start = built(trained_runs["tp1"], train, tmp_path / "x", *LP_FT)
    saved = {s: deepspeed_weights(run_dir / "checkpoints" / f"step_{s}") for s in (1, 2, 4)}
    names = body(start)
    assert same(saved[1], start, names) == names and same(saved[2], start, names) == names
    assert not same(saved[2], saved[1], [f"{HEAD}weight"])
    assert not same(saved[4], saved[2], [n for n in names if n.endswith("linear_fc1.weight")])
    optimizer = torch.load(run_dir / "checkpoints" / "step_3" / OPTIM_STATES, weights_only=False)
    adam = optimizer["optimizer_state_dict"]["base_optimizer_state"]["state"].values()
    assert [int(s["step"]) for s in adam] == [1, 1]  # full fine-tuning started with a fresh AdamW

    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    for s in (2, 3, 4):
        shutil.rmtree(resumed / "checkpoints" / f"step_{s}")
    (resumed / "checkpoints" / "latest").write_text("step_1\n")
    result = finetune(trained_runs["tp1"], "classification", train, train, resumed, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    again, reference = train_losses(resumed), train_losses(run_dir)
    for step in (2, 3, 4):
        assert (again[step]["phase"], again[step]["loss"]) == (reference[step]["phase"], reference[step]["loss"])
    # another phase length (or transfer) on resume is refused (one line: a UserError)
    from conf.errors import UserError
    from parallel.train_state import TrainState

    step_dir = resumed / "checkpoints" / "step_4"
    for change in ("finetune.head_only_epochs=2", "finetune.transfer_layers=2"):
        cfg, task = finetune_task(trained_runs["tp1"], train, resumed, *extra, change)
        with pytest.raises(UserError, match=re.escape(f"{change}, but run.dir={resumed} holds a run with")):
            task.check_resume(cfg, TrainState.read(step_dir), step_dir)
