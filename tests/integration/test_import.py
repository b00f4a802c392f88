"""gpt-import: local transformers GPT-2 / Llama directories become run dirs whose model is the source's.

The sources are small random models built here (perturbed so that every weight, norms included,
differs from its initial value): GPT-2 untied with a 300-token vocabulary (padding multiple 4),
Llama with grouped-query attention, tied embeddings, sharded safetensors and a tokenizer of 380
tokens under a 384-row embedding. One import per architecture is shared by the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SHARED_DATA, TINYSHAKESPEARE, one_line_error, run_cli

SOURCES = {  # architecture: (transformers config, tokenizer vocabulary, end-of-text token)
    "gpt2": (
        {"vocab_size": 300, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
         "activation_function": "gelu", "tie_word_embeddings": False},
        300,
        "<|endoftext|>",
    ),
    "llama": (
        {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "rope_theta": 5000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
        380,
        "</s>",
    ),
    # MoE: a dense layer after a MoE one (mlp_only_layers), top-k weights not renormalised, per-head QK-norm
    "qwen3_moe": (
        {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 48,
         "num_experts": 4, "num_experts_per_tok": 2, "mlp_only_layers": [1], "norm_topk_prob": False,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
        380,
        "</s>",
    ),
    "mixtral": (
        {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 48, "num_local_experts": 4,
         "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
         "head_dim": 16, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
        380,
        "</s>",
    ),
}  # fmt: skip
MODELS = {
    "gpt2": "GPT2",
    "llama": "Llama",
    "qwen3_moe": "Qwen3Moe",
    "mixtral": "Mixtral",
}  # transformers' class prefixes


def gpt_import(*args: str) -> subprocess.CompletedProcess:
    """The console script, as a user runs it."""
    script = Path(sys.executable).parent / "gpt-import"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def make_source(arch: str, out: Path) -> Path:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    config, vocab, eot = SOURCES[arch]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[eot],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TINYSHAKESPEARE.read_text()[:100_000]], trainer=trainer)
    assert backend.get_vocab_size() == vocab
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eot, eos_token=eot, unk_token=eot)
    fast.save_pretrained(out)
    torch.manual_seed(0)
    prefix = MODELS[arch]
    hf_config = getattr(transformers, f"{prefix}Config")(bos_token_id=0, eos_token_id=0, **config)
    model = getattr(transformers, f"{prefix}LMHeadModel" if arch == "gpt2" else f"{prefix}ForCausalLM")(hf_config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    shards = {"max_shard_size": "100KB"} if arch == "llama" else {}
    model.save_pretrained(out, safe_serialization=True, **shards)
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """arch -> (source dir, run dir, gpt-import's stdout), imported once on first use."""
    root, done = tmp_path_factory.mktemp("import"), {}

    def get(arch: str) -> tuple[Path, Path, str]:
        if arch not in done:
            source = make_source(arch, root / f"{arch}-source")
            result = gpt_import(f"source={source}", f"out={root / arch}")
            assert result.returncode == 0, result.stderr[-3000:]
            done[arch] = (source, root / arch, result.stdout)
        return done[arch]

    return get


def hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3_moe", "mixtral"])
def test_imported_model_is_the_source_and_exports_back_bit_exact(imported, arch: str, tmp_path: Path) -> None:  # noqa: ANN001
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from conf.cli import compose
    from parallel.train_state import TrainState
    from pretrain.export import export
    from pretrain.interop.load import load_model

    source, run, stdout = imported(arch)
    name = f"imported-{arch}"
    step = run / "checkpoints" / "step_0"
    state = TrainState.read(step)
    assert state.weights_only and state.converted_from == f"transformers:{arch}" and state.step == 0
    assert state.vocab_size == SOURCES[arch][1] and state.layout == {"tp": 1, "pp": 1, "dp": 1, "vpp": 1}
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0"
    assert (step / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert f"gpt-pretrain --config-dir {run}/conf model={name} run.dir={run}" in stdout
    assert ("vocab_multiple=4: parallel.tp must divide 4" in stdout) == (arch == "gpt2")  # 300 = 4 x 75
    # the preset, as gpt-pretrain --config-dir composes it, is the model of config.yaml and of the checkpoint
    preset = compose([f"model={name}", "data.dir=unused", f"hydra.searchpath=[file://{run / 'conf'}]"]).model
    assert OmegaConf.to_container(preset) == OmegaConf.load(run / "config.yaml").model == state.model

    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    ours = load_model(run)
    ids = torch.randint(0, ours.vocab_size, (2, ours.context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine = hf(ids).logits[..., : ours.vocab_size], ours.logits(ids)
    print(f"imported {arch}: max |logits difference| {(theirs - mine).abs().max():.2e}")
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-4)

    export(str(run), tmp_path / "hf")
    before, after = hf_weights(source), hf_weights(tmp_path / "hf")
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    a, b = (json.loads((d / "config.json").read_text()) for d in (source, tmp_path / "hf"))
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert differ <= {"n_inner", "attn_pdrop", "embd_pdrop", "resid_pdrop"}  # GPT-2's None = 4·d; dropout 0


@pytest.mark.slow
def test_finetune_starts_from_an_imported_model(imported, tmp_path: Path) -> None:  # noqa: ANN001
    _, run, _ = imported("llama")
    validation = tmp_path / "val.jsonl"
    validation.write_text("".join((SHARED_DATA / "rotten_tomatoes.validation.jsonl").read_text().splitlines(True)[:32]))
    result = run_cli(
        "pretrain.finetune",
        f"init.checkpoint={run}",
        f"task.train={SHARED_DATA / 'rotten_tomatoes.train.jsonl'}",
        f"task.validation={validation}",
        "task.max_train_examples=32",
        "finetune.epochs=1",
        "train.micro_batch=16",
        "train.global_batch=16",
        "train.eval_micro_batch=32",
        f"run.dir={tmp_path / 'ft'}",
        "logging.wandb=disabled",
        "logging.progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["step"] == 2 and results["init_checkpoint"] == str(run / "checkpoints" / "step_0")


@pytest.mark.slow
def test_pretraining_continues_from_an_imported_model_at_tp2(imported, tmp_path: Path) -> None:  # noqa: ANN001
    """The printed next steps, as a user runs them: shards with the source's tokenizer, then
    gpt-pretrain --config-dir RUN_DIR/conf model=imported-llama at tp=2; shards of another
    tokenizer are refused in one line."""
    import shutil

    from tests.distributed import torchrun

    source, run, stdout = imported("llama")
    assert f"--config-dir {run}/conf model=imported-llama" in stdout
    shutil.copytree(run, tmp_path / "run")  # the module's import stays as it is for the other tests
    run = tmp_path / "run"
    text = tmp_path / "text.txt"
    text.write_text(TINYSHAKESPEARE.read_text()[:30_000])
    for name, tokenizer in (("data", f"file:{source}"), ("chars", "char")):
        prepared = run_cli(
            "data.prepare", f"input={text}", f"out={tmp_path / name}", f"tokenizer={tokenizer}", "seq_len=32"
        )
        assert prepared.returncode == 0, prepared.stderr[-2000:]
    args = [
        f"--config-dir={run}/conf",
        "model=imported-llama",
        f"run.dir={run}",
        "train.max_steps=2",
        "train.micro_batch=2",
        "train.global_batch=4",
        "train.eval_every=0",
        "train.sample_tokens=0",
        "train.save_every=1",
        "train.keep_last=1",
        "logging.wandb=disabled",
        "logging.progress_bar=false",
    ]
    refused = run_cli("pretrain.train", *args, f"data.dir={tmp_path / 'chars'}")
    assert refused.returncode == 2 and "another tokenizer" in refused.stderr, refused.stderr[-2000:]
    result = torchrun(2, *args, f"data.dir={tmp_path / 'data'}", "parallel.tp=2")
    assert "continuing from the model weights" in result.stdout and "transformers:llama" in result.stdout
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        "step_0",
        "step_2",
    ]  # keep_last=1 spares step_0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "init_weights" for r in rows)


def test_unsupported_sources_and_outputs_are_refused_in_one_line(tmp_path: Path) -> None:
    """Before any model is read: a scaled RoPE, a missing tokenizer.json, another architecture, an out
    that holds someone else's files, a misspelt key. Nothing is written."""
    llama = {"model_type": "llama", **SOURCES["llama"][0]}
    cases = {
        "rope": (
            {**llama, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            True,
            "scaled RoPE is not supported",
        ),
        "no-tokenizer": (llama, False, "no tokenizer.json"),
        "mistral": ({**llama, "model_type": "mistral"}, True, "model_type=mistral: gpt-import reads"),
    }
    for case, (config, tokenizer, message) in cases.items():
        source = tmp_path / case
        source.mkdir()
        (source / "config.json").write_text(json.dumps(config))
        (source / "model.safetensors").write_bytes(b"")
        if tokenizer:
            (source / "tokenizer.json").write_text("{}")
        result = gpt_import(f"source={source}", f"out={tmp_path / 'out'}")
        assert message in one_line_error(result, 2), case  # the whole of stderr, not its last line
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    for args, message in (
        ([f"out={tmp_path / 'taken'}"], "holds files gpt-import did not write (notes.txt)"),
        ([f"out={tmp_path / 'out'}", "ovewrite=true"], "ovewrite: unknown key (did you mean overwrite?)"),
        ([f"out={tmp_path / 'out'}", "seq_len=long"], "seq_len=long: expected an integer (or null)"),
        ([f"out={tmp_path / 'out'}", "seq_len=0"], "seq_len=0: must be >= 1"),
        ([f"out={tmp_path / 'out'}", "name=../x"], "name=../x: must be a plain preset name"),
    ):
        result = gpt_import(f"source={tmp_path / 'rope'}", *args)
        assert message in one_line_error(result, 2)
    assert not (tmp_path / "out").exists() and (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_gpt_import_imports_no_heavy_library_before_a_run() -> None:
    """Like the other commands (tests/unit/test_imports.py): --help and refusals do not pay for torch."""
    heavy = "('torch', 'megatron', 'deepspeed')"
    code = f"import sys, pretrain.hf_import; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
