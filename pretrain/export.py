"""``gpt-export``: a checkpoint of any layout → a Hugging Face ``transformers`` GPT-2 directory.

Our decoder is GPT-2's architecture (learned positions, pre-LN, GELU MLP, biases, tied
embeddings), so the export is a pure re-layout of weights; the one non-trivial step is
megatron-core's fused QKV matrix, whose rows are grouped per head as ``[q_h, k_h, v_h]``
while GPT-2's ``c_attn`` is ``[all q | all k | all v]`` (and GPT-2's ``Conv1D`` stores
weights transposed). What GPT-2 cannot express is refused, not approximated.

``out`` is an owned output directory (``data/output_dir.py``): new, empty, or an earlier
gpt-export output (replaced only with ``overwrite=true``); anything else in it is refused
before the checkpoint is loaded, and the export is swapped in whole at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from conf.errors import UserError
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


def check_exportable(loaded) -> None:  # noqa: ANN001
    import torch

    config = loaded.model.config
    if not bool(loaded.cfg.model["tie_embeddings"]):
        raise UserError("model.tie_embeddings=false: GPT-2 ties input and output embeddings; refusing to export")
    if config.activation_func is not torch.nn.functional.gelu or config.gated_linear_unit:
        raise UserError(f"activation {config.activation_func.__name__}: GPT-2 expresses only GELU; refusing to export")
    if config.normalization != "LayerNorm" or not config.add_bias_linear:
        raise UserError("GPT-2 needs LayerNorm and biased linear layers; refusing to export")
    if config.num_query_groups not in (None, config.num_attention_heads):
        raise UserError("grouped-query attention has no GPT-2 equivalent; refusing to export")


def gpt2_state_dict(loaded) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Our megatron-core parameter names and layouts → transformers' GPT2LMHeadModel."""
    sd = {k: v for k, v in loaded.model.state_dict().items() if not k.endswith("_extra_state")}
    heads, hidden = int(loaded.cfg.model.num_heads), int(loaded.cfg.model.hidden_size)
    head_dim = hidden // heads
    out = {
        "transformer.wte.weight": sd["embedding.word_embeddings.weight"][: loaded.vocab_size],
        "transformer.wpe.weight": sd["embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": sd["decoder.final_layernorm.weight"],
        "transformer.ln_f.bias": sd["decoder.final_layernorm.bias"],
    }
    for i in range(int(loaded.cfg.model.num_layers)):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        qkv_w = sd[src + "self_attention.linear_qkv.weight"].view(heads, 3, head_dim, hidden)
        qkv_b = sd[src + "self_attention.linear_qkv.bias"].view(heads, 3, head_dim)
        out[dst + "attn.c_attn.weight"] = qkv_w.transpose(0, 1).reshape(3 * hidden, hidden).t()
        out[dst + "attn.c_attn.bias"] = qkv_b.transpose(0, 1).reshape(3 * hidden)
        pairs = {
            "ln_1.weight": "input_layernorm.weight",
            "ln_1.bias": "input_layernorm.bias",
            "ln_2.weight": "pre_mlp_layernorm.weight",
            "ln_2.bias": "pre_mlp_layernorm.bias",
            "attn.c_proj.bias": "self_attention.linear_proj.bias",
            "mlp.c_fc.bias": "mlp.linear_fc1.bias",
            "mlp.c_proj.bias": "mlp.linear_fc2.bias",
        }
        for theirs, ours in pairs.items():
            out[dst + theirs] = sd[src + ours]
        for theirs, ours in {
            "attn.c_proj": "self_attention.linear_proj",
            "mlp.c_fc": "mlp.linear_fc1",
            "mlp.c_proj": "mlp.linear_fc2",
        }.items():
            out[dst + theirs + ".weight"] = sd[src + ours + ".weight"].t()  # Conv1D: [in, out]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def export(checkpoint: str, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``out/`` with config.json, model.safetensors and (BPE) tokenizer files."""
    out = Path(out).expanduser()
    inputs = [Path(checkpoint).expanduser()]
    check_output_dir(out, COMMAND, overwrite, inputs=inputs, legacy=legacy_export)  # before any slow import or load

    from transformers import GPT2Config, GPT2LMHeadModel

    from pretrain.inference import load_model

    loaded = load_model(checkpoint)
    check_exportable(loaded)
    m = loaded.cfg.model
    eot = loaded.tokenizer.eot_id
    config = GPT2Config(
        vocab_size=loaded.vocab_size,
        n_positions=int(m.seq_len),
        n_embd=int(m.hidden_size),
        n_layer=int(m.num_layers),
        n_head=int(m.num_heads),
        n_inner=int(m.ffn_hidden_size),
        activation_function="gelu",
        layer_norm_epsilon=float(m.layernorm_eps),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot,
        eos_token_id=eot,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(gpt2_state_dict(loaded), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
    if missing or unexpected:
        raise RuntimeError(f"export mapping incomplete: missing {missing}, unexpected {unexpected}")
    with owned_output(out, COMMAND, overwrite, inputs=inputs, legacy=legacy_export) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(loaded.tokenizer, tmp)
        origin = {"checkpoint": str(loaded.path), "step": loaded.step, "tokenizer": loaded.tokenizer.kind}
        (tmp / "gpt_pretrain.json").write_text(json.dumps(origin, indent=1))
    return out


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """BPE → transformers tokenizer files; char/byte tokenizers have no transformers equivalent."""
    if isinstance(tokenizer, BPETokenizer):
        from transformers import PreTrainedTokenizerFast

        eot = "<|endoftext|>"
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, bos_token=eot, eos_token=eot, unk_token=eot)
        fast.save_pretrained(out)
    else:
        print(f"note: tokenizer '{tokenizer.kind}' has no transformers equivalent; tokenizer files not written")


@hydra.main(version_base=None, config_path="../conf", config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    from conf.cli import exit_on_user_error

    with exit_on_user_error():
        out = export(str(cfg.checkpoint), str(cfg.out), bool(cfg.overwrite))
        print(f"exported to {out}")


def main() -> None:
    from conf.cli import quiet_third_party

    quiet_third_party()
    _hydra_main()


if __name__ == "__main__":
    main()
