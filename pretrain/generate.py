"""``gpt-generate``: autoregressive sampling from a checkpoint (temperature, top-k, seeded).

The config is checked (``conf/tool_schemas.py``: :class:`GenerateRoot`) before ``checkpoint=`` is
looked at: a bad ``max_new_tokens``/``temperature``/``top_k``/``seed`` is reported in one line even
when the checkpoint is also missing, and no model is loaded for a command that cannot run.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from conf.errors import UserError
from conf.tool_schemas import GenerateRoot, typed

if TYPE_CHECKING:  # torch and megatron come with the model: --help and a refused config stay fast
    from pretrain.interop.load import LoadedModel


def generate_text(loaded: LoadedModel, config: GenerateRoot) -> str:
    """Prompt + continuation as text; a prompt longer than the context is an error, not a silent crop."""
    ids = loaded.tokenizer.encode(config.prompt) if config.prompt else [loaded.tokenizer.eot_id]
    if len(ids) > loaded.context:
        raise UserError(f"prompt is {len(ids)} tokens, longer than the model's context of {loaded.context}")
    from pretrain.model.sampling import sample

    top_k = config.top_k or None  # 0 and null: no top-k
    steps, temperature = config.max_new_tokens, config.temperature
    new = sample(loaded.model, ids, steps, loaded.context, loaded.vocab_size, temperature, top_k, config.seed)
    return loaded.tokenizer.decode((ids if config.prompt else []) + new)


def generate(cfg: DictConfig | GenerateRoot) -> str:
    """The sampled text of ``cfg`` (checked first: see the module doc)."""
    config = typed(cfg, GenerateRoot)
    from pretrain.interop.load import load_model  # megatron: imported only once the arguments are fine

    return generate_text(load_model(config.checkpoint), config)


@hydra.main(version_base=None, config_path="../conf", config_name="generate")
def _hydra_main(cfg: DictConfig) -> None:
    from conf.cli import exit_on_user_error

    with exit_on_user_error():
        print(generate(cfg), flush=True)


def main() -> None:
    from conf.cli import check_command_line, quiet_third_party

    check_command_line(sys.argv[1:], "generate")
    quiet_third_party()
    _hydra_main()


if __name__ == "__main__":
    main()
