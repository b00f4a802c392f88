"""3D parallelism on megatron-core, on CPU/gloo with torchrun: parity with one process, resharding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conf.cli import compose
from conf.errors import UserError
from parallel.run_config import Run
from tests.conftest import prepare_cfg, run_cli
from tests.distributed import layout_args, losses, torchrun

STEPS = 10
# tiny model, 8 sequences per step in micro-batches of 2: accumulation over 4 / dp micro-batches
COMMON = [
    "model=tiny",
    "train.micro_batch=2",
    "train.global_batch=8",
    "train.lr=1e-3",  # a stable rate for 8-sequence batches: parity, not convergence, is tested here
    "train.warmup_steps=2",
    f"train.max_steps={STEPS}",
    "train.save_every=5",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.eval_micro_batch=8",
    "train.sample_tokens=0",
    "logging.wandb=disabled",
    "logging.progress_bar=false",
]
LAYOUTS = {  # (tp, pp, vpp, dp)
    "tp2": (2, 1, 1, 1),
    "pp2": (1, 2, 1, 1),
    "pp2-vpp2": (1, 2, 2, 1),
    "dp2": (1, 1, 1, 2),
    "tp2-dp2": (2, 1, 1, 2),
    "pp2-dp2": (1, 2, 1, 2),
}
# the modern decoder (RoPE, RMSNorm, SwiGLU, GQA 4 heads / 2 groups, no bias, untied) in the layouts
# where its parts are split differently: tp2 + SP (GQA's key/value heads, RMSNorm grads over tp),
# pp (RoPE per stage, the untied output layer on the last), dp. A name is "[model:]layout". pp2-vpp2
# matches too (2e-7) but is left out for CI time (~15 s a layout on 2 cores).
MODERN = "llama-tiny"
MODERN_LAYOUTS = [f"{MODERN}:{name}" for name in ("tp2", "pp2", "dp2")]


def common(model: str = "tiny") -> list[str]:
    """COMMON with another ``model=`` preset (its own lr is overridden by COMMON's)."""
    return [arg if not arg.startswith("model=") else f"model={model}" for arg in COMMON]


def train_layout(char_shards: Path, run_dir: Path, name: str) -> Path:
    """One "[model:]layout" (``single``: one process) trained 10 steps, checkpoints at 5 and 10."""
    model, _, layout = name.rpartition(":")
    tp, pp, vpp, dp = LAYOUTS.get(layout, (1, 1, 1, 1))
    torchrun(
        tp * pp * dp,
        f"data.dir={char_shards}",
        f"run.dir={run_dir}",
        *common(model or "tiny"),
        *layout_args(tp, pp, vpp),
        "train.keep_last=2",
    )
    return run_dir


@pytest.fixture(scope="module")
def runs(
    char_shards: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict[str, Path]:
    """Each "[model:]layout" trained once on demand (10 steps, checkpoints at 5 and 10), plus the
    single-process references "single" and "llama-tiny:single" (that one once per session: the
    DeepSpeed tests share it)."""
    root = tmp_path_factory.mktemp("layouts")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            if name == f"{MODERN}:single":
                done[name] = request.getfixturevalue("llama_tiny_single")
            else:
                done[name] = train_layout(char_shards, root / name.replace(":", "-"), name)
        return done[name]

    return get  # type: ignore[return-value]


def reference_of(name: str) -> str:
    """The single-process run a "[model:]layout" is compared with."""
    model, _, _ = name.rpartition(":")
    return f"{model}:single" if model else "single"


@pytest.mark.slow
@pytest.mark.parametrize("name", [*LAYOUTS, *MODERN_LAYOUTS])
def test_layout_matches_single_process(runs, name: str) -> None:  # noqa: ANN001
    reference, parallel = losses(runs(reference_of(name))), losses(runs(name))
    assert sorted(parallel) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert parallel[step] == pytest.approx(reference[step], abs=1e-5), (name, step)
    assert reference[STEPS] < reference[1] - 0.5  # it trains


# The single-process references' losses at steps 1, 5 and 10, recorded before the Run-object refactor
# (issue 30): a refactor keeps them (torch 2.13.0+cpu, megatron-core 0.16.1, OMP_NUM_THREADS=1).
GOLDEN = {
    "single": {1: 4.286527037620544, 5: 3.730845093727112, 10: 3.5309921503067017},
    f"{MODERN}:single": {1: 4.314392566680908, 5: 3.737019181251526, 10: 3.516675651073456},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", GOLDEN)
def test_single_process_losses_are_the_recorded_golden_values(runs, name: str) -> None:  # noqa: ANN001
    got = losses(runs(name))
    for step, value in GOLDEN[name].items():
        assert got[step] == pytest.approx(value, abs=2e-6), (name, step, got[step])


def resume(source: Path, target: Path, step: int) -> Path:
    """A copy of ``source``'s run dir whose newest checkpoint is ``step_<step>``."""
    shutil.copytree(source, target)
    for path in (target / "checkpoints").glob("step_*"):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    (target / "checkpoints" / "latest").write_text(f"step_{step}\n")
    return target


@pytest.mark.slow
@pytest.mark.parametrize("saved_at", ["tp2", "pp2", "dp2", f"{MODERN}:tp2"])
def test_checkpoint_reshards_to_one_process(runs, char_shards: Path, tmp_path: Path, saved_at: str) -> None:  # noqa: ANN001
    model = saved_at.rpartition(":")[0] or "tiny"
    run_dir = resume(runs(saved_at), tmp_path / "run", 5)
    torchrun(1, f"data.dir={char_shards}", f"run.dir={run_dir}", *common(model), *layout_args(1, 1))
    reference, resumed = losses(runs(reference_of(saved_at))), losses(run_dir)
    assert resumed[6] == pytest.approx(reference[6], abs=1e-4)  # model restored
    assert resumed[10] == pytest.approx(reference[10], abs=1e-4)  # optimizer + schedule restored


@pytest.mark.slow
@pytest.mark.parametrize("resume_at", ["tp2", "pp2", "dp2"])
def test_one_process_checkpoint_reshards_to_layout(runs, char_shards: Path, tmp_path: Path, resume_at: str) -> None:  # noqa: ANN001
    tp, pp, vpp, dp = LAYOUTS[resume_at]
    run_dir = resume(runs("single"), tmp_path / "run", 5)
    torchrun(tp * pp * dp, f"data.dir={char_shards}", f"run.dir={run_dir}", *COMMON, *layout_args(tp, pp, vpp))
    reference, resumed = losses(runs("single")), losses(run_dir)
    assert resumed[6] == pytest.approx(reference[6], abs=1e-4)
    assert resumed[10] == pytest.approx(reference[10], abs=1e-4)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~300 windows in 10 shards: an epoch is 36 steps of 8."""
    from data.prepare import prepare
    from tests.conftest import TINYSHAKESPEARE

    root = tmp_path_factory.mktemp("small")
    text = root / "small.txt"
    text.write_text(TINYSHAKESPEARE.read_text()[:21000])
    out = root / "shards"
    prepare(prepare_cfg(input=str(text), out=str(out), seq_len=64, shard_size=32, val_fraction=0.05))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("first_dp", "then_dp"), [(2, 1)])  # dp 1 -> 2: in-process in tests/unit (CI time)
def test_epoch_is_consumed_exactly_once_across_a_dp_change(
    small_shards: Path, tmp_path: Path, first_dp: int, then_dp: int
) -> None:
    from data.shards import load_manifest
    from data.stream import GlobalOrder

    steps = GlobalOrder(load_manifest(small_shards), "train", 1337, 0, 12).length // 8
    run_dir = tmp_path / "run"
    args = [
        f"data.dir={small_shards}",
        f"run.dir={run_dir}",
        *COMMON,
        "train.log_samples=true",
        f"train.lr_decay_steps={steps}",
        "train.save_every=7",
    ]
    torchrun(first_dp, *args, "train.max_steps=14")
    torchrun(then_dp, *args, f"train.max_steps={steps}")
    seen: list[int] = []
    for path in run_dir.glob("samples_rank*.jsonl"):
        seen += [i for line in path.read_text().splitlines() for i in json.loads(line)["ids"]]
    assert len(seen) == steps * 8
    assert len(set(seen)) == len(seen)  # nothing repeated
    order = GlobalOrder(load_manifest(small_shards), "train", 1337, 0, 12)
    assert order.length - len(seen) < 8  # nothing lost but the epoch's last partial batch


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel.tp=3"], 3, "model.num_heads=4 is not divisible by parallel.tp=3"),
        (["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not divisible by parallel.tp*parallel.pp=2*2"),
        (["parallel.pp=3"], 3, "model.num_layers=4 is not divisible by parallel.pp*parallel.vpp=3*1"),
        (["parallel.pp=2", "parallel.vpp=4"], 2, "model.num_layers=4 is not divisible by parallel.pp*parallel.vpp=2*4"),
        (["train.global_batch=12", "train.micro_batch=4"], 2, "train.global_batch=12 is not divisible"),
        (["model.ffn_hidden_size=510", "parallel.tp=4", "model.num_heads=4"], 4, "ffn_hidden_size=510"),
        (["data.num_streams=12"], 5, "data.num_streams=12 is not divisible by dp=5"),
        (["parallel.vpp=2"], 1, "parallel.vpp=2 needs parallel.pp > 1"),
        (["parallel.engine=deepspeed", "train.async_save=true"], 1, "only the megatron engine saves asynchronously"),
        (["parallel.engine=deepspeed", "train.lr_mult={head:2}"], 1, "train.lr_mult: per-parameter learning rates"),
        (["parallel.engine=deepspeed", "parallel.pp=2"], 2, "DeepSpeed pipelines need its own PipelineModule"),
        (["parallel.zero_stage=2"], 2, "parallel.zero_stage=2 needs parallel.engine=deepspeed"),
    ],
)
def test_invalid_layouts_are_rejected_before_any_process_group(overrides: list[str], world: int, message: str) -> None:
    import torch.distributed as dist

    cfg = compose(["data.dir=unused", "train.global_batch=60", "train.micro_batch=1", *overrides])
    with pytest.raises(UserError, match=message.replace("*", r"\*")):
        Run.from_config(cfg, world_size=world, rank=0)  # validation, then the layout's checks
    assert not dist.is_initialized()


def test_invalid_layout_cli_exits_with_one_line(char_shards: Path, tmp_path: Path) -> None:
    result = run_cli(
        "pretrain.train",
        f"data.dir={char_shards}",
        f"run.dir={tmp_path}/r",
        "parallel.tp=3",
        env={"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"},
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "parallel.tp=3" in lines[0]
