"""gpt-export and gpt-generate: exported models load in transformers offline and match ours."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conf.errors import UserError
from tests.conftest import run_cli


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

    from pretrain.inference import load_model

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
    if name == "bpe":
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(out).encode(prompt) == prompt_ids


@pytest.mark.slow
def test_generate_is_seeded_and_checks_its_input(trained_runs, tmp_path: Path) -> None:  # noqa: ANN001
    args = [f"checkpoint={trained_runs['tp1']}", "prompt=KING", "max_new_tokens=30", "temperature=1.0", "top_k=20"]
    first, second = run_cli("pretrain.generate", *args, "seed=5"), run_cli("pretrain.generate", *args, "seed=5")
    other = run_cli("pretrain.generate", *args, "seed=6")
    assert first.returncode == 0 and first.stdout == second.stdout and first.stdout != other.stdout
    for bad, culprit in ((f"checkpoint={tmp_path}/none", "none"), ("prompt=" + "x" * 80, "longer than")):
        result = run_cli("pretrain.generate", *args[1:], f"checkpoint={trained_runs['tp1']}", bad)
        assert result.returncode == 2 and culprit in result.stderr.strip().splitlines()[-1], result.stderr[-1000:]


def test_export_refuses_what_gpt2_cannot_express() -> None:
    from pretrain.export import check_exportable

    def loaded(tied: bool = True, act=torch.nn.functional.gelu, groups=None) -> SimpleNamespace:  # noqa: ANN001
        config = SimpleNamespace(
            activation_func=act,
            gated_linear_unit=False,
            normalization="LayerNorm",
            add_bias_linear=True,
            num_query_groups=groups,
            num_attention_heads=4,
        )
        return SimpleNamespace(
            model=SimpleNamespace(config=config), cfg=SimpleNamespace(model={"tie_embeddings": tied})
        )

    check_exportable(loaded())
    for bad, message in (
        (loaded(tied=False), "tie_embeddings"),
        (loaded(act=torch.nn.functional.silu), "GELU"),
        (loaded(groups=2), "grouped-query"),
    ):
        with pytest.raises(UserError, match=message):
            check_exportable(bad)
