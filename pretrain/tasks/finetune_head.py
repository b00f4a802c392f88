"""GPT-1 fine-tuning model: the pretrained megatron-core GPT plus a linear head, and its loss L3.

The head reads the final hidden state (after the last LayerNorm) of each sequence's extract
token. One forward pass gives both that state (captured from the decoder's output) and the
per-token language-model loss of the same tokens, so L3 = L2 + λ·L1 costs one pass; λ = 0
leaves L1 out of the gradient.

Parallelism: the wrapper is a chunk like any other for the megatron engine. Its inner GPT is
``self.module`` (megatron-core unwraps ``.module`` to find the embedding for tied-weight
reductions), the head lives on the last pipeline stage only and is replicated over tp; with
sequence parallelism the decoder output is gathered along the sequence with a backward that
splits (not sums) the replicated head's gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import sharded_state_dict_default

from parallel.topology import compute_device

HEAD = "finetune_head"


class FinetuneGPT(MegatronModule):
    """``GPTModel`` + dropout + linear head on the extract token's final hidden state.

    ``body_frozen`` (head-only steps of LP-FT, ``pretrain/tasks/finetune.py``): while it returns
    true, every GPT parameter's gradient is replaced by zeros before either engine's hooks read it.
    The body stays in the optimizer (megatron's DDP buffers and DeepSpeed's ZeRO partitions are fixed
    when the engine is built: a ``requires_grad=False`` body could never be thawed) and the backward
    keeps its full shape, so every pipeline stage still exchanges its activation gradients.
    """

    def __init__(
        self,
        gpt: torch.nn.Module,
        task_type: str,
        num_labels: int,
        dropout: float,
        seed: int,
        body_frozen: Callable[[], bool] | None = None,
    ):
        super().__init__(config=gpt.config)
        self.module = gpt
        if body_frozen is not None:
            for param in gpt.parameters():
                param.register_hook(lambda grad: torch.zeros_like(grad) if body_frozen() else None)
        self.task_type = task_type
        self.post_process = gpt.post_process
        self._hidden: torch.Tensor | None = None
        if self.post_process:
            torch.manual_seed(seed + 31)  # same head at every layout
            outputs = 1 if task_type == "multiple_choice" else num_labels
            self.dropout = torch.nn.Dropout(dropout)
            self.finetune_head = torch.nn.Linear(gpt.config.hidden_size, outputs)
            torch.nn.init.normal_(self.finetune_head.weight, std=0.02)
            torch.nn.init.zeros_(self.finetune_head.bias)
            gpt.decoder.register_forward_hook(self._capture)

    def _capture(self, _module: Any, _inputs: Any, output: Any) -> None:
        self._hidden = output[0] if isinstance(output, tuple) else output

    def set_input_tensor(self, input_tensor: Any) -> None:
        self.module.set_input_tensor(input_tensor)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, extract: torch.Tensor, k: int
    ) -> Any:
        """tokens [n·k, L] → on the last stage (per-token LM loss [n·k, L], scores [n, classes or k])."""
        output = self.module(tokens, positions, None, labels=labels)
        if not self.post_process:
            return output
        hidden = self._hidden  # [L, n·k, h] (or [L/tp, ...] with sequence parallelism; [n·k, L, h] batch-first)
        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        picked = hidden[rows, extract] if self.module.batch_first else hidden[extract, rows]
        final = self.dropout(picked.float())  # [n·k, h]
        if self.task_type == "similarity":  # both orders, summed (GPT-1)
            final = final.view(-1, k, final.shape[-1]).sum(1)
        scores = self.finetune_head(final.to(self.finetune_head.weight.dtype)).float()
        if self.task_type == "multiple_choice":
            scores = scores.view(-1, k)
        return output, scores

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:  # type: ignore[override]
        """Loads what :meth:`sharded_state_dict` describes (GPT keys unprefixed, head keys under ``finetune_head.``),
        or this module's own ``state_dict`` (GPT keys under ``module.``: DeepSpeed's checkpoints)."""
        state_dict = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}
        head = {k[len(HEAD) + 1 :]: v for k, v in state_dict.items() if k.startswith(f"{HEAD}.")}
        self.module.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith(f"{HEAD}.")}, strict)
        if self.post_process:
            self.finetune_head.load_state_dict(head, strict)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """The GPT's keys unchanged (a pretraining checkpoint loads into them) + the head's."""
        state = self.module.sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.post_process:
            # replicated over tp: the tp group must be explicit, or megatron-core 0.16 gives every
            # tp rank replica id 0 once ``metadata`` names the dp group (two writers: save fails)
            tp_group = parallel_state.get_tensor_model_parallel_group()
            key = f"{prefix}{HEAD}."
            head = sharded_state_dict_default(self.finetune_head, key, sharded_offsets, metadata, tp_group)
            state.update(head)
        return state


def task_batch_shape(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(sequence length, sequences) of a micro-batch of examples: [n, k, L] tokens → (L, n·k)."""
    n, k, length = batch["tokens"].shape
    return length, n * k


def make_forward_step(aux_lm_weight: float, first_special: int):  # noqa: ANN201 - megatron forward_step_func
    """The schedule's step: one micro-batch of examples → (L3, named sums for metrics)."""

    def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[Any, Any]:
        batch = next(data_iterator)
        device = compute_device()
        tokens = batch["tokens"].to(device)  # [n, k, L]
        n, k, length = tokens.shape
        flat = tokens.view(n * k, length)
        # next-token targets; the last column has none (masked below)
        labels = torch.cat([flat[:, 1:], flat[:, :1]], dim=1)
        extract = batch["extract"].to(device).view(n * k)
        positions = torch.arange(length, device=device).unsqueeze(0).expand(n * k, -1)
        output = model(flat, positions, labels, extract, k)
        weight = batch["weight"].to(device)  # [n]: 0 for examples that only pad a batch
        before_extract = positions < extract.unsqueeze(1)  # targets up to the extract token
        lm_mask = (before_extract & (labels < first_special)).float() * weight.repeat_interleave(k).unsqueeze(1)

        def loss_func(outputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            per_token, scores = outputs
            if "choice_mask" in batch and k > 1 and scores.shape[1] == k:
                scores = scores.masked_fill(batch["choice_mask"].to(device) == 0, -1e9)
            target = batch["labels"].to(device)
            ce = F.cross_entropy(scores, target, reduction="none") * weight
            cls = ce.sum() / weight.sum().clamp(min=1)
            lm_sum = (per_token.float() * lm_mask).sum()
            lm_tokens = lm_mask.sum()
            loss = cls + aux_lm_weight * lm_sum / lm_tokens.clamp(min=1) if aux_lm_weight else cls
            correct = ((scores.argmax(-1) == target).float() * weight).sum()
            sums = {
                "loss_sum": loss.detach().clone(),  # the schedule divides ``loss`` in place
                "tokens": torch.ones((), device=device),  # micro-batches: loss_sum/tokens = mean L3
                "cls_sum": ce.sum().detach(),
                "examples": weight.sum(),
                "correct": correct,
                "lm_sum": lm_sum.detach(),
                "lm_tokens": lm_tokens,
            }
            return loss, sums

        return output, loss_func

    return forward_step


def init_added_tokens(gpt: torch.nn.Module, special_ids: list[int], eot_id: int, seed: int, std: float) -> None:
    """Start, delimiter and extract rows := the end-of-text row + N(0, std/10) noise.

    In pretraining every document sits between end-of-text tokens, so framing a task input
    as ``start text extract`` with both tokens starting at the end-of-text embedding shows
    the pretrained model the boundaries it knows; the noise makes the three tokens differ
    from each other and fine-tuning separates them. (GPT-1 initialised them randomly; with
    small models and little pretraining data that leaves the extract state meaningless at
    the start.) Rows beyond the checkpoint's vocabulary that megatron zero-filled on load
    stay zero: they are padding. Both copies of a tied embedding (first stage's input, last
    stage's output layer when pp > 1) get the same rows, at any tp.
    """

    weights = []
    if getattr(gpt, "pre_process", False):
        weights.append(gpt.embedding.word_embeddings.weight)
    last_only = getattr(gpt, "post_process", False) and not getattr(gpt, "pre_process", False)
    if last_only and gpt.share_embeddings_and_output_weights:
        weights.append(gpt.output_layer.weight)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for weight in weights:
        per_rank = weight.shape[0]
        start = tp_rank * per_rank
        eot = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
        if start <= eot_id < start + per_rank:
            eot += weight[eot_id - start].float()
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            # the row from the rank that holds it; on the device NCCL needs (the model is still on the CPU)
            reduced = eot.to(compute_device())
            torch.distributed.all_reduce(reduced, group=tp_group)
            eot = reduced.to(weight.device)
        generator = torch.Generator().manual_seed(seed + 77)
        noise = torch.randn(len(special_ids), weight.shape[1], generator=generator) * std / 10
        with torch.no_grad():
            for row, token in zip(noise, special_ids, strict=True):
                if start <= token < start + per_rank:
                    weight[token - start] = (eot + row.to(eot.device)).to(weight.dtype)
