"""The project's checkpoints as an lm-evaluation-harness ``LM`` (registered as ``gpt-pretrain``).

Scores come from the same single-process model ``gpt-generate`` uses (any saved layout,
resharded on load). Contexts longer than the model's window are truncated from the left,
as lm-eval expects; an empty context starts from the end-of-text token.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from pretrain.inference import LoadedModel
from pretrain.sampling import sample


@register_model("gpt-pretrain")
class GPTPretrainLM(LM):
    def __init__(self, loaded: LoadedModel, batch_size: int = 32) -> None:
        super().__init__()
        self.loaded, self.batch_size = loaded, batch_size

    def _encode(self, text: str) -> list[int]:
        return self.loaded.tokenizer.encode(text)

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of each continuation given its context, is it the greedy one)."""
        window = self.loaded.context
        out: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            rows = [(ctx + cont)[-(window + 1) :] for ctx, cont in chunk]
            width = max(len(r) for r in rows) - 1
            inputs = torch.zeros(len(rows), width, dtype=torch.long)
            for i, row in enumerate(rows):
                inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
            logprobs = self.loaded.log_probs(inputs)
            for i, ((_, cont), row) in enumerate(zip(chunk, rows, strict=True)):
                n = len(row) - 1
                targets = torch.tensor(cont[-n:] if len(cont) > n else cont)
                positions = torch.arange(n - len(targets), n)
                token_lp = logprobs[i, positions, targets]
                greedy = bool((logprobs[i, positions].argmax(-1) == targets).all())
                out.append((float(token_lp.sum()), greedy))
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        eot = self.loaded.tokenizer.eot_id
        pairs = []
        for request in requests:
            context, continuation = request.args
            pairs.append((self._encode(context) or [eot], self._encode(continuation)))
        return [result for result in tqdm(self.score(pairs), desc="loglikelihood", disable=len(pairs) < 64)]

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        eot, window = self.loaded.tokenizer.eot_id, self.loaded.context
        results = []
        for request in tqdm(requests, desc="rolling", disable=len(requests) < 4):
            (text,) = request.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(self._encode(text), eot, max_seq_len=window, context_len=1)
            ]
            results.append(sum(lp for lp, _ in self.score(windows)))
        return results

    def generate_until(self, requests: list[Any]) -> list[str]:
        tokenizer = self.loaded.tokenizer
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            ids = (self._encode(context) or [tokenizer.eot_id])[-self.loaded.context :]
            new = sample(
                self.loaded.model,
                ids,
                int(gen_kwargs.get("max_gen_toks", 64)),
                self.loaded.context,
                self.loaded.vocab_size,
                temperature=float(gen_kwargs.get("temperature", 0.0)),
            )
            text = tokenizer.decode(new)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            outputs.append(text)
        return outputs
