"""Load a checkpoint of any layout into this single process (generation, export, evaluation).

megatron-core's ``dist_checkpointing`` reshards on load, so a checkpoint written at any
(tp, pp, dp) loads into a tp=pp=1 model; only the model weights are read. DeepSpeed runs
are read through their converted megatron view (``pretrain/interop/deepspeed_convert.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from conf.errors import UserError
from data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from parallel import cpu_compat
from parallel.run_config import Run
from parallel.train_state import TrainState
from pretrain.interop.deepspeed_convert import model_checkpoint
from pretrain.model import build_gpt, position_ids, transformer_config


@dataclass
class LoadedModel:
    model: torch.nn.Module  # megatron-core GPTModel (or load_model's wrap of it), eval mode
    cfg: Run  # the training run as its checkpoint recorded it (at tp = pp = 1)
    tokenizer: Tokenizer
    vocab_size: int  # the tokenizer's (the model's output is padded beyond it)
    step: int
    path: Path

    @property
    def context(self) -> int:
        return int(self.cfg.model.seq_len)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids → [batch, seq, vocab_size] fp32 logits (padding ids dropped)."""
        return self.model(ids, position_ids(*ids.shape), None)[..., : self.vocab_size].float()

    @torch.no_grad()
    def log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq, vocab_size] log-probabilities of the model's own distribution.

        Normalised over the padded vocabulary, exactly as the training loss is, so that a
        log-likelihood equals minus the summed training loss over the same tokens.
        """
        logits = self.model(ids, position_ids(*ids.shape), None).float()
        return torch.log_softmax(logits, dim=-1)[..., : self.vocab_size]


Wrap = Callable[[torch.nn.Module, TrainState], torch.nn.Module]


def load_model(spec: str | Path, wrap: Wrap | None = None) -> LoadedModel:
    """The model of ``checkpoint=spec`` (a run dir or a step dir, either engine) in this process, tp=pp=1.

    ``wrap`` builds the module the checkpoint holds around the GPT before the weights are read
    (gpt-eval's classifier: a gpt-finetune run's head, ``pretrain/eval/classifier.py``)."""
    from megatron.core import dist_checkpointing

    path = model_checkpoint(spec)  # a DeepSpeed step is converted to megatron's format once
    state = TrainState.read(path)
    cfg = Run.from_saved(state.config, tp=1, pp=1, vpp=1, ep=1)  # experts of any ep: all here
    tokenizer_dir = path if (path / TOKENIZER_FILE).is_file() else Path(cfg.data.dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab_size = state.vocab_size  # the tokenizer's; a fine-tuned model has its added tokens beyond it
    model_vocab = vocab_size + int(state.task.get("added_tokens", 3 if "labels" in state.task else 0))
    cpu_compat.apply()  # megatron-core on a CPU-only machine
    cfg.layout.init(cfg.train.seed)
    model = build_gpt(cfg.model, model_vocab, transformer_config(cfg.model), seed=cfg.train.seed)
    if wrap is not None:
        model = wrap(model, state)
    sharded = {"model": model.sharded_state_dict()}
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except Exception as exc:  # noqa: BLE001 - report which checkpoint is unreadable
        raise UserError(f"checkpoint={spec}: cannot load the model from {path} ({exc})") from exc
    model.load_state_dict(loaded["model"])
    model.eval()
    return LoadedModel(model, cfg, tokenizer, vocab_size, state.step, path)
