"""gpt-plan and gpt-pretrain's preflight (#20): every check is one line (exit 2), the search lists only
layouts that fit, fastest first, ``--json`` parses, ``train.preflight`` refuses or warns before any work."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from conf.cli import compose
from conf.errors import UserError
from tests.conftest import run_of

H100 = ["hardware=h100-sxm", "logging.wandb=disabled"]
ONE_NODE, TWO = "hardware.gpus_per_node=1", "hardware.gpus_per_node=2"


def plan_run(overrides: list[str], capsys: pytest.CaptureFixture, as_json: bool = False) -> tuple[int, str, str]:
    from pretrain.plan import run

    code = run(compose(overrides, "plan"), as_json=as_json, command_line=overrides)  # as gpt-plan's Hydra list
    out, err = capsys.readouterr()
    return code, out, err


def test_each_check_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from data.prepare import prepare
    from tests.conftest import prepare_cfg

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    shards = tmp_path / "shards"
    prepare(prepare_cfg(input=str(text), out=str(shards), tokenizer="char", seq_len=64))
    resumed = tmp_path / "run"
    step = resumed / "checkpoints" / "step_4"
    step.mkdir(parents=True)  # a DeepSpeed ZeRO-2 run's step (its train state is all the check reads)
    state = {"step": 4, "config": {"parallel": {"zero_stage": 2}}, "vocab_size": 67, "engine": "deepspeed"}
    (step / "train_state.json").write_text(json.dumps({**state, "version": 2}))
    cases = {
        "model.num_heads=4 is not divisible by parallel.tp=3": ["parallel.tp=3", "hardware.gpus_per_node=3"],
        "world size 6 is not divisible by parallel.tp*parallel.pp=4*1": ["parallel.tp=4", "hardware.gpus_per_node=6"],
        "parallel.pp=2 with parallel.engine=deepspeed": ["parallel.engine=deepspeed", "parallel.pp=2", TWO],
        "train.global_batch=12 is not divisible by train.micro_batch*dp=12*8": [],
        "has seq_len=64 > model.seq_len=32": [f"data.dir={shards}", "model.seq_len=32", ONE_NODE],
        "holds a parallel.engine=deepspeed checkpoint": [f"run.dir={resumed}", ONE_NODE],
        "train.preflight=maybe: expected warn, error or off": ["train.preflight=maybe", ONE_NODE],
    }
    for message, overrides in cases.items():
        code, out, err = plan_run([*H100, *overrides], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (message, err)
        assert f"FAIL  {lines[0][len('error: ') :]}" in out


def test_a_failing_layout_still_answers(capsys: pytest.CaptureFixture) -> None:
    """Issue 31: the first question (llama-1b on 8 H100s, the defaults) gets the header, the memory at
    the nearest layout that passes, and a fix that makes the plan pass."""
    args = [*H100, "model=llama-1b"]
    code, out, err = plan_run(args, capsys)
    assert code == 2 and err == "error: train.global_batch=12 is not divisible by train.micro_batch*dp=12*8\n", err
    lines = out.splitlines()
    assert lines[0].startswith("gpt-plan: model=llama-1b (1,076.2M parameters, vocab 50257 padded to 50304, sequence")
    assert lines[1].startswith("  hardware=h100-sxm: 8 = 8 x 1 node, 80.0 GiB each")
    assert lines[2] == "  precision: bf16 (the GPU default; train.bf16=false plans fp32)"
    assert lines[3].startswith(
        "  global batch: 12 sequences, 24,576 tokens per step (the default, sized for the CPU demo"
    )
    assert "  FAIL  train.global_batch=12 is not divisible by train.micro_batch*dp=12*8" in lines
    memory = "memory per rank, GiB (largest: pp0; device 80.0), estimated at train.global_batch=96 data.num_streams=16"
    assert any(line.startswith(memory) for line in lines), out
    assert any(re.fullmatch(r"\s*pp0(\s+[\d.]+){7}", line) for line in lines), out
    (tip,) = [line for line in lines if line.startswith("try: ")]
    assert tip.startswith("try: train.global_batch=96 data.num_streams=16 (multiples of train.micro_batch*dp=12*8 and")
    assert tip.endswith(", or search=true (every layout of 8 ranks)")
    code, out, err = plan_run(args, capsys, as_json=True)
    report = json.loads(out)
    assert code == 2 and report["errors"] == [err.strip()[len("error: ") :]] and report["suggestion"]["search"]
    assert report["precision"] == {"dtype": "bf16", "bf16": True, "why": "the GPU default; train.bf16=false plans fp32"}
    assert report["model"]["name"] == "llama-1b" and report["model"]["params"] > 1e9
    assert report["memory"]["estimated_at"] == "train.global_batch=96 data.num_streams=16"
    layout = report["layout"]
    assert (layout["global_batch"], layout["micro_batch"], layout["accumulation"], layout["dp"]) == (96, 12, 1, 8)
    assert report["global_batch"] == {
        "value": 12,
        "source": "the default",
        "tokens_per_step": 12 * 2048,
        "suggested": 288,  # >= 2**19 tokens of 2048, a multiple of micro-batch 12 x dp 8
        "note": "sized for the CPU demo; a GPU run takes ~0.5 M tokens per step: "
        "train.global_batch=288 is 589,824 tokens",
    }
    fixed = report["suggestion"]["overrides"]
    assert fixed == ["train.global_batch=96", "data.num_streams=16"]
    code, out, err = plan_run([*args, *fixed], capsys, as_json=True)  # the suggestion passes every check
    fixed_report = json.loads(out)
    assert code == 0 and not err and fixed_report["ok"] and "suggestion" not in fixed_report
    assert (
        fixed_report["memory"]["ranks"] == report["memory"]["ranks"] and fixed_report["memory"]["estimated_at"] is None
    )
    assert (
        fixed_report["global_batch"]["source"] == "set on the command line"
        and "note" not in fixed_report["global_batch"]
    )


def test_gpu_presets_plan_in_bf16_unless_told(capsys: pytest.CaptureFixture) -> None:
    """bf16 on a GPU preset unless train.bf16 is on the command line; gpt-pretrain's default stays fp32."""
    args = [*H100, "model=gpt2-small", "train.global_batch=96", "data.num_streams=8"]
    reports = {}
    for given in ([], ["train.bf16=false"], ["train.bf16=true"]):
        code, out, err = plan_run([*args, *given], capsys, as_json=True)
        assert code == 0 and not err, err
        reports[" ".join(given)] = json.loads(out)
    default, fp32, bf16 = reports.values()
    assert default["precision"]["dtype"] == "bf16" and default["hardware"]["peak_tflops"] == 989
    assert fp32["precision"] == {"dtype": "fp32", "bf16": False, "why": "train.bf16=false"}
    assert fp32["hardware"]["peak_tflops"] == 67 and bf16["precision"]["why"] == "train.bf16=true"
    weights = [r["memory"]["ranks"][0]["params_gib"] for r in (default, fp32, bf16)]
    assert weights[1] == pytest.approx(2 * weights[0]) and weights[2] == weights[0]  # 2 bytes a weight, not 4
    assert default["time"] == bf16["time"]
    code, text, _ = plan_run([*args, "train.bf16=false"], capsys)
    assert "\n  precision: fp32 (train.bf16=false)\n" in text
    assert not compose(args).train.bf16  # gpt-pretrain's own default is untouched


# GPT-2 small (Radford et al. 2019): 124,439,808 parameters; with its vocabulary padded to 50304, 124,475,904
GPT2_SMALL, H, LAYERS, VOCAB, SEQ = 124_475_904, 768, 12, 50304, 1024
KINDS = ("params", "grads", "optimizer", "activations", "comm_buffers", "logits")


def test_plan_itemises_memory_and_time(capsys: pytest.CaptureFixture) -> None:
    args = [*H100, "model=gpt2-small", "parallel.tp=2", "parallel.pp=2", "parallel.vpp=3", "train.micro_batch=2"]
    code, out, err = plan_run([*args, "train.global_batch=64", "train.bf16=true"], capsys, True)
    report = json.loads(out)
    assert code == 0 and not err and report["ok"] and report["layout"]["dp"] == 2
    assert report["model"]["params"] == GPT2_SMALL and report["model"]["padded_vocab"] == VOCAB
    ranks = report["memory"]["ranks"]
    assert [r["rank"] for r in ranks] == ["pp0", "pp1"] and report["memory"]["largest"] in ("pp0", "pp1")
    for r in ranks:  # mixed precision's bytes per parameter: bf16 weights 2, fp32 main grads 4, and Adam's two
        # fp32 moments + fp32 master copy (12) sharded over dp=2 by the distributed optimizer: 6
        assert r["grads_gib"] == pytest.approx(2 * r["params_gib"]) and r["params_gib"] > 0
        assert r["optimizer_gib"] == pytest.approx(3 * r["params_gib"], rel=1e-4)
    # the two stages' weights times tp=2 are the model once, plus the last stage's copy of the tied
    # embedding (the output layer); what is left is replicated across tp (position embeddings, norms, biases)
    held = sum(r["params_gib"] for r in ranks) * (1 << 30) / 2 * 2  # bytes / 2 (bf16) x tp
    assert GPT2_SMALL + VOCAB * H < held < 1.01 * (GPT2_SMALL + VOCAB * H)
    time = report["time"]
    assert time["terms_s"]["pp_bubble"] > 0 and time["terms_s"]["tp_comm"] > 0 and 0 < time["mfu"] < 1
    assert time["tokens_per_s"] == pytest.approx(64 * 1024 / time["step_s"])
    # MFU from the model's FLOPs per token, counted here: 6 x matmul weights (12 h^2 per layer, the output
    # layer) + 6 x layers x seq x h (attention), over 8 H100s at 989 TFLOP/s
    flops_per_token = 6 * (LAYERS * 12 * H * H + H * VOCAB) + 6 * LAYERS * SEQ * H
    assert time["mfu"] == pytest.approx(flops_per_token * time["tokens_per_s"] / (8 * 989e12), rel=1e-6)
    # the text report prints the numbers of the JSON report: each rank's row, each step-time term
    code, text, err = plan_run([*args, "train.global_batch=64", "train.bf16=true"], capsys)
    assert code == 0 and not err
    lines = text.splitlines()
    for r in ranks:
        (row,) = [line.split() for line in lines if re.fullmatch(rf"\s*{r['rank']}(\s+[\d.]+){{7}}", line)]
        want = [r[f"{k}_gib"] for k in KINDS] + [r["total_gib"]]
        assert [float(v) for v in row[1:]] == pytest.approx(want, abs=0.005), row
    (line,) = [line for line in lines if line.startswith("step time ")]
    step, shown = re.fullmatch(r"step time (\S+) s = (.+)", line).groups()
    printed = [term.rsplit(" ", 1) for term in shown.split(" + ")]
    assert float(step) == pytest.approx(time["step_s"], rel=5e-4)
    assert [float(v) for _, v in printed] == pytest.approx([v for v in time["terms_s"].values() if v > 0], rel=5e-3)
    assert {"TP comm", "PP bubble", "DP grad reduce"} <= {name for name, _ in printed}
    code, out, err = plan_run([*args, "train.global_batch=64", "hardware.memory_gb=0.5"], capsys)  # a 0.5 GiB device
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: preflight: rank pp")
    assert "> 0.5 GiB on h100-sxm; try" in err and "\nstep time " in out  # the time of a layout that does not fit


def test_search_lists_only_layouts_that_fit_fastest_first(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    args = [*H100, "model=gpt2-small", "hardware.gpus_per_node=2", "train.global_batch=8", "search=true"]
    code, out, _ = plan_run([*args, "train.bf16=true"], capsys, as_json=True)
    everything = json.loads(out)["search"]["layouts"]
    sizes = sorted(r["memory_gib"] for r in everything)
    limit = sizes[len(sizes) // 2]  # half of them fit
    plot = tmp_path / "plan.png"
    code, out, err = plan_run([*args, "train.bf16=true", f"hardware.memory_gb={limit}", f"plot={plot}"], capsys, True)
    found = json.loads(out)["search"]
    rows = found["layouts"]
    assert code == 0 and 0 < len(rows) < len(everything) and found["dropped"]["does not fit"] > 0
    assert all(r["memory_gib"] <= limit for r in rows)
    speeds = [r["tokens_per_s"] for r in rows]
    assert speeds == sorted(speeds, reverse=True)
    assert {r["engine"] for r in rows} == {"megatron", "deepspeed"}
    assert {r["recompute"] for r in rows} >= {"none", "full"}
    assert all(r["micro_batch"] * r["accumulation"] * r["dp"] == r["global_batch"] == 8 for r in rows)
    assert found["global_batch"] == 8 and rows[0]["overrides"].startswith("train.global_batch=8 parallel.tp=")
    assert plot.read_bytes()[:4] == b"\x89PNG"
    code, out, err = plan_run([*args, "hardware.memory_gb=0.01"], capsys)
    assert code == 2 and err.count("\n") == 1 and "error: search: no layout of 2 ranks" in err
    assert "best:" not in out
    foreign = tmp_path / "mine.png"
    foreign.write_bytes(b"not ours")
    with pytest.raises(UserError, match="not a plot gpt-plan wrote"):
        plan_run([*args, f"plot={foreign}"], capsys)


def test_search_names_its_batch_and_columns(capsys: pytest.CaptureFixture) -> None:
    """The search says which global batch it keeps and where it came from (the CPU demo's default on a GPU:
    a GPU-sized one suggested, not applied), which dp that rules out, every column, and the best batch split."""
    code, out, err = plan_run([*H100, "search=true", "top=3"], capsys)  # model=tiny, sequence 64, 8 ranks
    assert code == 0 and not err, err
    lines = out.splitlines()
    assert "  precision: bf16 (the GPU default; train.bf16=false plans fp32)" in lines
    assert (
        "search over 8 ranks at train.global_batch=12, 768 tokens per step (the default, sized for the CPU demo; "
        "a GPU run takes ~0.5 M tokens per step: train.global_batch=8192 is 524,288 tokens):"
    ) in lines
    assert "  not searched: dp 8 (train.global_batch=12, data.num_streams=12 not multiples of it)" in lines
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["#", "tp"])
    columns = lines[head].split()
    rows = [line.split() for line in lines[head + 1 : head + 4]]
    assert all(row[9] in ("megatron", "deepspeed") for row in rows), rows  # the engine in full, then its state
    legend = " ".join(lines[head + 4 : head + 7])
    named = {"#", "recompute", "optimizer", "tokens/s", "step", "s"}  # "step s" is two words
    assert all(column in named or f"{column}:" in legend or f"{column}," in legend for column in columns), legend
    best = next(line for line in lines if line.startswith("best: "))
    micro, accum, dp = map(
        int,
        re.match(r"best: global batch 12 = micro-batch (\d+) x (\d+) accumulation steps x dp (\d+);", best).groups(),
    )
    assert micro * accum * dp == 12 and [micro, accum, dp] == [int(rows[0][i]) for i in (6, 7, 4)]
    assert lines[lines.index(best) + 1].startswith(f"  overrides: train.global_batch=12 parallel.tp={rows[0][1]} ")


def test_json_flag_on_the_command_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from pretrain import plan

    argv = ["gpt-plan", *H100, "model=gpt2-small", "hardware.nodes=2", "--json", "parallel.tp=4"]
    argv += ["train.global_batch=48", "++train.bf16=false"]  # explicit, as Hydra hands it on
    monkeypatch.setattr(sys, "argv", argv)
    plan.main()
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["hardware"]["world_size"] == 16 and report["layout"]["dp"] == 4
    assert report["precision"]["dtype"] == "fp32" and report["global_batch"]["source"] == "set on the command line"


class _Task:
    """What the Trainer reads of a task before its preflight: nothing past it may run."""

    command, vocab_size, seq_len = "gpt-pretrain", 67, None

    def configure(self, groups: object) -> dict:
        return {}


def test_preflight_refuses_or_warns_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from parallel.topology import Topology
    from pretrain.trainer.loop import Trainer

    def no_work(*args: object) -> None:
        raise RuntimeError("process groups: past the preflight")

    monkeypatch.setattr(Topology, "init", no_work)
    run_dir = tmp_path / "run"
    base = ["data.dir=unused", f"run.dir={run_dir}", "hardware.memory_gb=0.0001"]
    with pytest.raises(UserError, match=r"^preflight: rank pp0 needs .* > 0.1 MiB on cpu; try .*preflight=warn"):
        Trainer(run_of(compose([*base, "train.preflight=error"]))).run(_Task())
    assert not run_dir.exists()
    with pytest.raises(RuntimeError, match="past the preflight"):
        Trainer(run_of(compose([*base, "train.preflight=warn"]))).run(_Task())
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("warning: preflight (train.preflight=warn): rank pp0 needs")
    with pytest.raises(RuntimeError, match="past the preflight"):
        Trainer(run_of(compose([*base, "train.preflight=off"]))).run(_Task())
    assert capsys.readouterr().out == ""


def test_cpu_is_calibrated_here(capsys: pytest.CaptureFixture) -> None:
    args = ["hardware=cpu", "hardware.gpus_per_node=2", "train.micro_batch=6", "parallel.tp=2", "vocab_size=67"]
    code, out, _ = plan_run([*args, "logging.wandb=disabled"], capsys, as_json=True)
    report = json.loads(out)
    measured = report["hardware"]["measured"]
    assert report["precision"] == {"dtype": "fp32", "bf16": False, "why": "the CPU default; train.bf16=true plans bf16"}
    assert code == 0 and measured["threads/rank"] == 1 and measured["all-reduce GB/s"] > 0 and measured["TFLOP/s"] > 0
    assert report["time"]["terms_s"]["tp_comm"] > 0 and report["time"]["terms_s"]["overhead"] > 0


def test_search_includes_expert_parallelism_for_a_moe_model(capsys: pytest.CaptureFixture) -> None:
    """OLMoE's shape on 8 GPUs: layouts at ep 1, 2, 4, 8 (every divisor of dp that divides 64 experts),
    each rank holding 1/ep of the experts; the dense engine (DeepSpeed) is not offered for MoE."""
    args = [*H100, "model=olmoe-1b-7b", "train.global_batch=64", "train.bf16=true", "data.num_streams=8"]
    code, out, _ = plan_run([*args, "search=true", "top=1000"], capsys, as_json=True)
    rows = json.loads(out)["search"]["layouts"]
    assert code == 0 and {r["ep"] for r in rows if r["dp"] == 8} == {1, 2, 4, 8}
    assert {r["engine"] for r in rows} == {"megatron"}
    code, out, _ = plan_run([*args, "parallel.ep=8", "train.micro_batch=1"], capsys, as_json=True)
    report = json.loads(out)
    assert code == 0 and report["layout"]["ep"] == 8 and report["time"]["terms_s"]["ep_comm"] > 0
