"""Autoregressive sampling from a single-process GPT (temperature, top-k, seeded).

``gpt-generate`` checks its sampling arguments before it looks at ``checkpoint=``: a bad
``max_new_tokens``/``temperature``/``top_k``/``seed`` is reported in one line even when the
checkpoint is also missing, and no model is loaded for a command that cannot run.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from conf.errors import UserError


def _integer(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key}={value}: must be an integer")
    return value


def sampling_args(cfg: DictConfig) -> tuple[int, float, int | None, int]:
    """``max_new_tokens, temperature, top_k, seed`` from the config, each refused in one line when out of range."""
    max_new_tokens = _integer("max_new_tokens", cfg.max_new_tokens)
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    temperature = cfg.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0:
        raise UserError(f"temperature={temperature}: must be a number >= 0 (0 is greedy)")
    top_k = _integer("top_k", cfg.top_k) if cfg.top_k is not None else 0
    if top_k < 0:
        raise UserError(f"top_k={top_k}: must be >= 0 (0 or null: no top-k)")
    return max_new_tokens, float(temperature), top_k or None, _integer("seed", cfg.seed)


def generate_text(loaded, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, seed: int) -> str:  # noqa: ANN001
    """Prompt + continuation as text; a prompt longer than the context is an error, not a silent crop."""
    ids = loaded.tokenizer.encode(prompt) if prompt else [loaded.tokenizer.eot_id]
    if len(ids) > loaded.context:
        raise UserError(f"prompt is {len(ids)} tokens, longer than the model's context of {loaded.context}")
    from pretrain.model.sampling import sample

    new = sample(loaded.model, ids, max_new_tokens, loaded.context, loaded.vocab_size, temperature, top_k, seed)
    return loaded.tokenizer.decode((ids if prompt else []) + new)


@hydra.main(version_base=None, config_path="../conf", config_name="generate")
def _hydra_main(cfg: DictConfig) -> None:
    from conf.cli import exit_on_user_error

    with exit_on_user_error():
        max_new_tokens, temperature, top_k, seed = sampling_args(cfg)  # before the checkpoint: see the module doc
        from pretrain.interop.load import load_model  # megatron: imported only once the arguments are fine

        loaded = load_model(str(cfg.checkpoint))
        print(generate_text(loaded, str(cfg.prompt), max_new_tokens, temperature, top_k, seed), flush=True)


def main() -> None:
    from conf.cli import answer_help, quiet_third_party

    answer_help(sys.argv[1:], "generate", groups=())
    quiet_third_party()
    _hydra_main()


if __name__ == "__main__":
    main()
