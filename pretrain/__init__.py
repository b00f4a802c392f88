"""The GPT model, the pretraining loop and the tools around it (generate, export)."""

import logging
import warnings


def silence_known_warnings() -> None:
    """Warnings that say nothing actionable on this project's paths: megatron-core's notes that
    Apex / Transformer Engine are absent (expected on CPU), and torch's deprecation of the
    ShardedTensor API that megatron-core's dist_checkpointing still uses."""
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", message=r".*(Apex|apex|Transformer Engine|TransformerEngine).*")
    warnings.filterwarnings("ignore", message=r".*Please use DTensor instead.*")
    warnings.filterwarnings("ignore", message=r".*`load_state_dict` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor|all_gather_into_tensor.*is deprecated.*")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # its shard writers' errors reach users through the save's own one-line error (cause and path)
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(logging.CRITICAL)


silence_known_warnings()
