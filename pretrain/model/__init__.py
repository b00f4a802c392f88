"""The GPT model: megatron-core's ``GPTModel`` with this project's specs (``gpt.py``) and local layers
(``layers.py``)."""

from pretrain.model.gpt import (
    GPT,
    build_gpt,
    flops_per_token,
    padded_vocab_size,
    position_ids,
    transformer_config,
    transformer_engine_usable,
)

__all__ = [
    "GPT",
    "build_gpt",
    "flops_per_token",
    "padded_vocab_size",
    "position_ids",
    "transformer_config",
    "transformer_engine_usable",
]
