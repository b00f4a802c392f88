"""The typed config groups (conf/groups.py, conf/schema.py): presets compose, hold only their differences, and every
mistake is one line naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conf.cli import CONF_DIR, check_group_choices, compose
from conf.errors import UserError
from conf.schema import GROUPS, TrainConfig, validate

FINETUNE = ["init.checkpoint=x", "task.train=a", "task.validation=b"]
SHARED = ("parallel", "optim", "train", "logging")  # the groups gpt-finetune shares with gpt-pretrain


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,name", [(g, n) for g in ("model", "parallel", "optim", "train", "data", "logging") for n in presets(g)]
)
def test_every_preset_composes_and_validates(group: str, name: str) -> None:
    validate(compose(["data.dir=x", f"{group}={name}"]))
    if group in SHARED:
        validate(compose([*FINETUNE, f"{group}={name}"], "finetune"))


def test_layout_presets() -> None:
    par = compose(["data.dir=x", "parallel=pp2-interleaved"]).parallel
    assert (par.pp, par.vpp, par.tp, par.engine) == (2, 2, 1, "megatron")
    par = compose(["data.dir=x", "parallel=zero3-offload"]).parallel
    assert (par.engine, par.zero_stage, par.offload) == ("deepspeed", 3, "cpu")
    assert compose(["data.dir=x", "parallel=tp2"]).parallel.tp == 2
    assert compose(["data.dir=x", "parallel=dp-zero1"]).parallel.distributed_optimizer is True


def test_optim_presets_set_train_keys() -> None:
    gpt3 = compose(["data.dir=x", "model=gpt2-small", "optim=gpt3"]).train
    assert (gpt3.beta1, gpt3.beta2, gpt3.weight_decay, gpt3.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert (gpt3.lr_schedule, gpt3.min_lr_ratio, gpt3.lr) == ("cosine", 0.1, 6.0e-4)  # lr: the model preset's
    ft = compose(FINETUNE, "finetune").train
    assert (ft.lr, ft.lr_schedule, ft.warmup_fraction, ft.weight_decay, ft.beta2, ft.min_lr_ratio) == (
        6.25e-5,
        "linear",
        0.002,
        0.01,
        0.999,
        0.0,
    )
    assert compose(["data.dir=x", "train.lr=1e-3", "model=gpt1"]).train.lr == 1e-3  # the command line wins


def test_finetune_shares_the_pretraining_groups() -> None:
    pre, ft = compose(["data.dir=x"]), compose(FINETUNE, "finetune")
    assert set(ft.train) == set(pre.train) == {f.name for f in TrainConfig.__dataclass_fields__.values()}
    assert set(ft.parallel) == set(pre.parallel)
    assert (ft.train.max_steps, ft.train.micro_batch, ft.train.global_batch, ft.train.seed) == (None, 8, 32, 1234)
    assert (ft.train.eval_every, ft.train.save_every, ft.train.keep_last, ft.train.sample_tokens) == (0, 0, 1, 0)
    assert (ft.logging.project, ft.logging.console_every, ft.run.dir) == ("gpt-finetune", 10, "runs/finetune")
    assert compose([*FINETUNE, "parallel=zero2"], "finetune").parallel.engine == "deepspeed"
    text = (CONF_DIR / "finetune.yaml").read_text()
    assert "zero_stage" not in text and "micro_batch" not in text  # no copy of the shared groups


def test_presets_hold_only_their_differences() -> None:
    assert list(OmegaConf.load(CONF_DIR / "parallel" / "tp2.yaml")) == ["tp"]
    for group in ("model", "parallel", "optim", "train", "data", "logging"):
        for path in (CONF_DIR / group).glob("*.yaml"):
            loaded = OmegaConf.load(path) or OmegaConf.create()
            nodes = dict(loaded) if group == "model" else {"train" if group == "optim" else group: loaded}
            for name, node in nodes.items():  # a model preset (@package _global_) sets model.* and train.lr
                defaults = OmegaConf.structured(GROUPS[name])
                same = [k for k in node if not OmegaConf.is_missing(defaults, k) and defaults[k] == node[k]]
                same = [k for k in same if not (group == "model" and k == "lr")]  # each model states its lr
                assert not same, f"{group}/{path.name} repeats the defaults of {name}.{same}"
    assert not list(OmegaConf.load(CONF_DIR / "optim" / "adamw.yaml") or [])  # adamw: the defaults


def test_validate_rejects_one_line() -> None:
    cases = {
        "train.max_steps=abc: expected an integer (or null)": ("train.max_steps", "abc"),
        "train.nope: unknown key": ("train.nope", 1),
        "train.lr=-1: must be > 0": ("train.lr", -1),
        "parallel.tp=two: expected an integer": ("parallel.tp", "two"),
        "model.spec=nope: expected auto, te or local": ("model.spec", "nope"),
        "task.type=nope: expected one of": ("task.type", "nope"),
        "data.dir=: required": ("data.dir", "???"),
    }
    for message, (key, value) in cases.items():
        composed = compose(FINETUNE, "finetune") if key.startswith("task") else compose(["data.dir=x"])
        cfg = OmegaConf.create(OmegaConf.to_container(composed))  # untyped: any config, not only Hydra's
        OmegaConf.update(cfg, key, value)
        with pytest.raises(UserError) as err:
            validate(cfg)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override,line",
    [
        ("train.max_steps=abc", "error: train.max_steps=abc: expected an integer (or null)"),
        ("train.nope=1", "error: train.nope: unknown key (train has: "),
        ("+train.nope=1", "error: train.nope: unknown key (train has: "),
        ("train.sed=1", "error: train.sed: unknown key (did you mean train.seed?)"),
        ("parallel=nope", "error: parallel=nope: unknown preset (known: default, dp-zero1, pp2, pp2-interleaved"),
        ("optim=nope", "error: optim=nope: unknown preset (known: adamw, gpt1-finetune, gpt3)"),
        ("train.lr=1,2", "error: train.lr=1,2: a sweep needs --multirun"),
        ("data.sources=[{dir:/a,wieght:1}]", "error: data.sources: an element's key wieght is unknown (did you mean"),
        ("data.sources.0.weight=0.5", "error: data.sources.0.weight=0.5: data.sources has no element 0 (give the list"),
    ],
)
def test_command_line_mistakes_are_one_line(override: str, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        check_group_choices(["data.dir=x", override])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(line) and err.count("\n") == 1, err


def test_multirun_checks_every_value(capsys: pytest.CaptureFixture[str]) -> None:
    check_group_choices(["-m", "data.dir=x", "parallel=tp2,pp2-interleaved", "train.lr=1e-3,2e-3", "--cfg", "job"])
    with pytest.raises(SystemExit):
        check_group_choices(["--multirun", "data.dir=x", "train.lr=1e-3,abc"])
    assert capsys.readouterr().err == "error: train.lr=abc: expected a number\n"
    check_group_choices([*FINETUNE, "parallel=zero1"], config_name="finetune")


def test_cfg_job_prints_the_composed_config() -> None:
    """Hydra's own app (as the console scripts run it), with the schema registered by conf.cli."""
    code = "import hydra, conf.cli\n"
    code += f"@hydra.main(version_base=None, config_path={str(CONF_DIR)!r}, config_name='finetune')\n"
    code += "def main(cfg): pass\nmain()\n"
    args = [*FINETUNE, "parallel=zero3-offload", "--cfg", "job"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.parallel.offload == "cpu" and printed.train.global_batch == 32
