"""``gpt-export``: a checkpoint of any layout → a Hugging Face ``transformers`` directory.

The classic shape (learned positions, LayerNorm, GELU, biases) exports to ``GPT2LMHeadModel``,
the modern one (RoPE, RMSNorm, SwiGLU, any number of key/value heads) to ``LlamaForCausalLM``
and, with QK-norm, to ``Qwen3ForCausalLM``; tied or untied either way. MoE models export to
``Qwen3MoeForCausalLM`` (with QK-norm) or ``MixtralForCausalLM`` (``pretrain/interop/hf_moe.py``). The export is a pure
re-layout of the weights (``pretrain/interop/hf_weights.py``); what no transformers architecture
expresses is refused in one line, not approximated.

``out`` is an owned output directory (``data/output_dir.py``): new, empty, or an earlier
gpt-export output (replaced only with ``overwrite=true``); anything else in it is refused
before the checkpoint is loaded, and the export is swapped in whole at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from conf.tool_schemas import ExportRoot, typed
from data.output_dir import check_output_dir, owned_output
from data.tokenizer import BPETokenizer, Tokenizer

if TYPE_CHECKING:  # torch is imported once a model is loaded: --help stays fast
    import torch

COMMAND = "gpt-export"
# What an export written before gpt-export left a marker may hold (transformers' and ours).
LEGACY_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "gpt_pretrain.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
)


def legacy_export(out: Path) -> set[str] | None:
    """An export without a marker is recognised by its ``gpt_pretrain.json``; only transformers' files count."""
    return set(LEGACY_FILES) if (out / "gpt_pretrain.json").is_file() else None


def build_hf_model(arch: str, config: Any, weights: dict[str, torch.Tensor]) -> Any:  # noqa: ANN401
    """The transformers model holding exactly ``weights`` (strict: every parameter, nothing else).

    Built on the meta device and filled by assignment: no random initialisation, no second copy."""
    import torch
    import transformers

    from pretrain.interop.hf_weights import CLASSES

    with torch.device("meta"):
        model = getattr(transformers, CLASSES[arch])(config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"export mapping incomplete: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def export(checkpoint: str, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``out/`` with config.json, model.safetensors and the tokenizer's files."""
    out = Path(out).expanduser()
    inputs = [Path(checkpoint).expanduser()]
    check_output_dir(out, COMMAND, overwrite, inputs=inputs, legacy=legacy_export)  # before any slow import or load

    from parallel.run_config import as_plain
    from parallel.train_state import TrainState
    from pretrain.interop.hf_weights import CLASSES, hf_architecture, hf_config, to_hf
    from pretrain.interop.load import load_model

    loaded = load_model(checkpoint)
    m = as_plain(loaded.cfg.model)  # the mapping hf_weights reads
    hf_architecture(m)  # refuses what no transformers architecture expresses, before any conversion
    rows = loaded.vocab_size
    if str(TrainState.read(loaded.path).converted_from or "").startswith("transformers:"):
        rows = loaded.model.embedding.word_embeddings.weight.shape[0]  # gpt-import's: the original vocab_size
    arch, config = hf_config(m, rows, loaded.tokenizer.eot_id)
    model = build_hf_model(arch, config, to_hf(loaded.model.state_dict(), m, rows))
    with owned_output(out, COMMAND, overwrite, inputs=inputs, legacy=legacy_export) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(loaded.tokenizer, tmp)
        origin = {"checkpoint": str(loaded.path), "step": loaded.step, "tokenizer": loaded.tokenizer.kind}
        (tmp / "gpt_pretrain.json").write_text(json.dumps({**origin, "architecture": arch}, indent=1))
    print(f"{CLASSES[arch]}: {sum(p.numel() for p in model.parameters()):,} parameters")
    return out


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """transformers tokenizer files (``AutoTokenizer.from_pretrained(out)``) that encode every text as
    ours: char and byte as ``tokenizers`` BPE models without merges (``Tokenizer.to_tokenizers``).
    The end-of-text token is transformers' bos/eos, so, as in any transformers tokenizer, its literal
    text in an input is that token (ours spell it out character by character or byte by byte).
    tiktoken has no such file here (its encoding is saved by name only)."""
    backend = tokenizer.to_tokenizers()
    if backend is None:
        print(f"note: tokenizer '{tokenizer.kind}' has no transformers equivalent; tokenizer files not written")
        return
    from transformers import PreTrainedTokenizerFast

    eot = backend.id_to_token(tokenizer.eot_id)  # <|endoftext|>, or an imported model's own (</s>, ...)
    special = {"bos_token": eot, "eos_token": eot}
    if isinstance(tokenizer, BPETokenizer):
        special["unk_token"] = eot  # byte-level BPE has no unknown token; char's <unk> is no special token
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **special)
    fast.save_pretrained(out)


@hydra.main(version_base=None, config_path="../conf", config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    from conf.cli import exit_on_user_error

    with exit_on_user_error():
        config = typed(cfg, ExportRoot)
        out = export(config.checkpoint, config.out, config.overwrite)
        print(f"exported to {out}")


def main() -> None:
    from conf.cli import check_command_line, quiet_third_party

    check_command_line(sys.argv[1:], "export")
    quiet_third_party()
    _hydra_main()


if __name__ == "__main__":
    main()
