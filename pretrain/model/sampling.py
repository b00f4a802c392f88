"""Autoregressive sampling from a single-process GPT (temperature, top-k, seeded)."""

from __future__ import annotations

import torch

from pretrain.model import position_ids


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    context: int,
    vocab_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Continue ``prompt`` by ``max_new_tokens`` tokens; ``temperature=0`` is greedy.

    Logits of vocabulary padding (ids >= vocab_size) are masked out. No KV cache:
    the window of the last ``context`` tokens is re-run for each token, which is
    what a small CPU model needs and keeps this independent of megatron's
    inference engine.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = list(prompt)
    try:
        for _ in range(max_new_tokens):
            window = torch.tensor([ids[-context:]], device=device)
            logits = model(window, position_ids(*window.shape).to(device), None)[0, -1, :vocab_size].float().cpu()
            if temperature <= 0:
                ids.append(int(logits.argmax()))
                continue
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, vocab_size)).values[-1]
                logits[logits < kth] = -float("inf")
            probs = torch.softmax(logits, dim=-1)
            ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    finally:
        model.train(was_training)
    return ids[len(prompt) :]
