"""gpt-export and gpt-generate: exported models load in transformers offline and match ours.

GPT-2 (the classic shape) from checkpoints saved at tp=1, tp=2 and with BPE; Llama (llama-tiny) from
checkpoints saved at tp=2 and pp=2; and, in process from random weights, every combination the
mapping supports (GPT-2 tied/untied, Llama with GQA or MHA, biases, tied or untied, Qwen3 with QK-norm).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conf.cli import compose
from conf.errors import UserError
from tests.conftest import TINYSHAKESPEARE, one_line_error, run_cli


def exported(run_dir: Path, out: Path) -> Path:
    result = run_cli("pretrain.export", f"checkpoint={run_dir}", f"out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp1", "tp2", "bpe"])
def test_exported_logits_and_greedy_generation_match(
    trained_runs,
    name: str,
    tmp_path: Path,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from pretrain.interop.load import load_model

    out = exported(trained_runs[name], tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_model(trained_runs[name])
    ids = torch.randint(0, ours.vocab_size, (3, ours.context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.logits(ids), rtol=0, atol=1e-4)

    prompt = "ROMEO:"
    prompt_ids = ours.tokenizer.encode(prompt)
    with torch.no_grad():
        greedy = hf.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=20,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )
    hf_text = ours.tokenizer.decode(greedy[0].tolist())
    cli = run_cli(
        "pretrain.generate",
        f"checkpoint={trained_runs[name]}",
        f"prompt={prompt}",
        "max_new_tokens=20",
        "temperature=0",
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert cli.stdout == hf_text + "\n"  # print() adds the last newline
    from transformers import AutoTokenizer  # char (tp1, tp2) and BPE alike: the tokenizer loads and matches

    tokenizer, text = AutoTokenizer.from_pretrained(out), TINYSHAKESPEARE.read_text()[:2000]
    assert tokenizer.encode(text) == ours.tokenizer.encode(text) and tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token_id == ours.tokenizer.eot_id
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"  # the tokenizers format
    step = json.loads((trained_runs[name] / "checkpoints" / "step_40" / "tokenizer.json").read_text())
    assert "model" in step and "kind" not in step  # the checkpoint's copy too


@pytest.mark.parametrize(
    ("module", "args", "line"),
    [
        ("pretrain.generate", ["tempreature=1"], "tempreature: unknown key (did you mean temperature?)"),
        ("pretrain.generate", ["top_k=many"], "top_k=many: expected an integer (or null)"),
        ("pretrain.export", ["out=OUT", "ovewrite=true"], "ovewrite: unknown key (did you mean overwrite?)"),
        ("pretrain.export", ["out=OUT", "overwrite=maybe"], "overwrite=maybe: expected true or false"),
    ],
)
def test_generate_and_export_refuse_a_misspelt_key_in_one_line(
    module: str, args: list[str], line: str, tmp_path: Path
) -> None:
    """Composed on their schemas (conf/tool_schemas.py): one error line, exit 2, nothing read or written."""
    args = [arg.replace("OUT", str(tmp_path / "out")) for arg in args]
    assert one_line_error(run_cli(module, f"checkpoint={tmp_path}/none", *args), 2) == f"error: {line}"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_generate_is_seeded_and_checks_its_input(trained_runs, tmp_path: Path) -> None:  # noqa: ANN001
    args = [f"checkpoint={trained_runs['tp1']}", "prompt=KING", "max_new_tokens=30", "temperature=1.0", "top_k=20"]
    first, second = run_cli("pretrain.generate", *args, "seed=5"), run_cli("pretrain.generate", *args, "seed=5")
    other = run_cli("pretrain.generate", *args, "seed=6")
    assert first.returncode == 0 and first.stdout == second.stdout and first.stdout != other.stdout
    for bad, culprit in ((f"checkpoint={tmp_path}/none", "none"), ("prompt=" + "x" * 80, "longer than")):
        result = run_cli("pretrain.generate", *args[1:], f"checkpoint={trained_runs['tp1']}", bad)
        assert culprit in one_line_error(result, 2), result.stderr[-1000:]  # the whole of stderr, not its last line


LLAMA_TRAIN = [
    "model=llama-tiny",
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.max_steps=2",
    "train.warmup_steps=0",  # two full-rate steps: every weight (norms too) moves off its initial value
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "logging.wandb=disabled",
    "logging.progress_bar=false",
]


@pytest.fixture(scope="module")
def llama_runs(bpe_shards: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """llama-tiny trained two steps and saved at tp=2 x pp=2 (trained on first use)."""
    from tests.distributed import torchrun

    root, done = tmp_path_factory.mktemp("llama_runs"), {}

    def get(layout: str) -> Path:
        if layout not in done:  # one 4-rank run splits the model both ways (cheaper than two 2-rank runs)
            keys = {"tp2-pp2": ("parallel.tp=2", "parallel.pp=2")}[layout]
            torchrun(4, f"data.dir={bpe_shards}", f"run.dir={root / layout}", *LLAMA_TRAIN, *keys)
            done[layout] = root / layout
        return done[layout]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2-pp2"])
def test_llama_export_logits_and_greedy_generation_match(
    llama_runs,  # noqa: ANN001
    layout: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from pretrain.export import export
    from pretrain.interop.load import load_model
    from pretrain.model.sampling import sample

    run = llama_runs(layout)
    export(str(run), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, LlamaForCausalLM) and hf.config.num_key_value_heads == 2
    assert not hf.config.tie_word_embeddings and "lm_head.weight" in dict(hf.named_parameters())
    ours = load_model(run)
    ids = torch.randint(0, ours.vocab_size, (3, ours.context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours.logits(ids)
    print(f"llama-tiny saved at {layout}: max |logits difference| {(theirs - mine).abs().max():.2e}")
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-4)

    prompt_ids = ours.tokenizer.encode("ROMEO:")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode("ROMEO:") == prompt_ids
    hf.generation_config.eos_token_id = None  # ours does not stop at end-of-text either
    with torch.no_grad():
        greedy = hf.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=20,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt_ids)),
        )[0, len(prompt_ids) :].tolist()
    assert greedy == sample(ours.model, prompt_ids, 20, ours.context, ours.vocab_size, temperature=0)


# one model per transformers architecture and option the mapping supports: (overrides, architecture)
SHAPES = {
    "gpt2-tied": (["model=tiny"], "GPT2LMHeadModel"),
    "gpt2-untied": (["model=tiny", "model.tie_embeddings=false"], "GPT2LMHeadModel"),
    "llama-gqa-untied": (["model=llama-tiny"], "LlamaForCausalLM"),
    "llama-mha-bias-tied": (
        [
            "model=llama-tiny",
            "model.num_query_groups=null",
            "model.bias=true",
            "model.tie_embeddings=true",
            "model.rope_theta=500",
            "model.layernorm_eps=1e-6",
        ],
        "LlamaForCausalLM",
    ),
    "qwen3-qk-norm-mqa": (["model=llama-tiny", "model.qk_norm=true", "model.num_query_groups=1"], "Qwen3ForCausalLM"),
    # MoE (pretrain/interop/hf_moe.py): Qwen3-MoE with a dense layer after a MoE one and OLMoE's routing
    # (top-k weights not renormalised); Mixtral (every layer MoE, renormalised), tied
    "qwen3-moe-interleaved": (
        ["model=moe-tiny", "model.qk_norm=true", "model.moe_layer_freq=2", "model.moe_norm_topk_prob=false"],
        "Qwen3MoeForCausalLM",
    ),
    "mixtral": (["model=moe-tiny", "model.tie_embeddings=true", "model.moe_topk=3"], "MixtralForCausalLM"),
}


@pytest.fixture(scope="module")
def single_process():  # noqa: ANN201
    from parallel.topology import Topology

    cfg = compose(["model=tiny", "data.dir=unused"])
    Topology.from_config(cfg, world_size=1, rank=0).init(seed=1)
    yield


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_supported_shape_exports_exactly_and_maps_back(single_process, shape: str, tmp_path: Path) -> None:  # noqa: ANN001
    """Random weights (every parameter, norms included, perturbed so that a swapped mapping shows): the
    transformers model's logits are ours, and from_hf(to_hf(...)) gives back every tensor bit for bit."""
    import transformers

    from pretrain.export import build_hf_model
    from pretrain.interop.hf_weights import from_hf, hf_config, to_hf
    from pretrain.model import build_gpt, position_ids, transformer_config

    overrides, cls = SHAPES[shape]
    m = compose([*overrides, "data.dir=unused", "model.num_layers=2"]).model
    vocab = 72  # a multiple of vocab_multiple=8: no padding rows
    model = build_gpt(m, vocab, transformer_config(m), seed=5).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    arch, config = hf_config(m, vocab, eot_id=0)
    build_hf_model(arch, config, to_hf(model.state_dict(), m, vocab)).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == cls and hf.config.tie_word_embeddings == bool(m.tie_embeddings)
    ids = torch.randint(0, vocab, (2, int(m.seq_len)), generator=generator)
    with torch.no_grad():
        theirs, mine = hf(ids).logits, model(ids, position_ids(*ids.shape), None)
    print(f"{shape}: max |logits difference| {(theirs - mine).abs().max():.2e}")
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-4)

    back, weights = from_hf(hf.state_dict(), hf.config.to_dict())
    assert {k: back[k] for k in ("position", "norm", "mlp", "bias", "tie_embeddings", "qk_norm")} == {
        k: m[k] for k in ("position", "norm", "mlp", "bias", "tie_embeddings", "qk_norm")
    }
    assert (back["num_query_groups"] or m.num_heads) == (m.num_query_groups or m.num_heads)
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert sorted(weights) == sorted(ours)
    assert all(torch.equal(weights[k], ours[k]) for k in ours)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=tiny", "model.position=rope"], "model.position=rope, model.norm=layernorm, model.mlp=gelu: no trans"),
        (["model=tiny", "model.norm=rmsnorm"], "no transformers architecture has this combination"),
        (["model=llama-tiny", "model.mlp=gelu"], "no transformers architecture"),
        (["model=tiny", "model.num_query_groups=2"], "GPT-2 has no grouped-query attention"),
        (["model=tiny", "model.bias=false"], "GPT-2 always has biases"),
        (["model=tiny", "model.qk_norm=true"], "GPT-2 has no QK-norm"),
        (["model=llama-tiny", "model.qk_norm=true", "model.bias=true"], "Qwen3 (QK-norm) has no MLP biases"),
        (["model=moe-tiny", "model.moe_capacity_factor=1.5"], "model.moe_capacity_factor=1.5: transformers' MoE"),
        (["model=moe-tiny", "model.moe_shared_expert_size=64"], "model.moe_shared_expert_size=64: trans"),
        (["model=moe-tiny", "model.moe_layer_freq=2"], "Mixtral has no dense layers"),
        (["model=moe-tiny", "model.moe_norm_topk_prob=false"], "Mixtral renormalises the top-k weights"),
        (
            ["model=moe-tiny", "model.moe_score_function=sigmoid", "model.moe_expert_bias=true"],
            "model.moe_score_function=sigmoid: transformers' MoE classes route with a softmax",
        ),
    ],
)
def test_export_refuses_what_no_transformers_architecture_expresses(overrides: list[str], message: str) -> None:
    from pretrain.interop.hf_weights import hf_architecture

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hf_architecture(compose([*overrides, "data.dir=unused"]).model)
