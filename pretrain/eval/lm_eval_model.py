"""The project's checkpoints as an lm-evaluation-harness ``LM`` (registered as ``gpt-pretrain``).

Scores come from the same single-process model ``gpt-generate`` uses (any saved layout,
resharded on load). Contexts longer than the window (the model's ``seq_len``, or a shorter
``max_length``) are truncated from the left, as lm-eval expects; an empty context starts
from the end-of-text token.

In process, ``GPTPretrainLM(load_model(...))`` (gpt-eval). From a shell, by name (the
``lm_eval.models`` entry point in pyproject.toml; ``pretrain/lm_eval_cli.py`` for lm-eval 0.4.13)::

    lm_eval --model gpt-pretrain --model_args checkpoint=RUN_DIR[,max_length=N] --tasks ... --device cpu

:class:`InLoopLM` is the same request handling over the training engine's model (in-loop
evaluation, ``pretrain/eval/in_loop.py``): rows are built here exactly as for a checkpoint, so
both score the same tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from conf.errors import UserError
from data.tokenizer import Tokenizer
from pretrain.interop.load import LoadedModel, load_model
from pretrain.model.sampling import sample

DEFAULT_BATCH_SIZE = 32  # batch_size=auto, and gpt-eval's default
# model_args (and what lm-eval adds from --batch_size, --max_batch_size, --device)
MODEL_ARGS = ("checkpoint", "batch_size", "max_batch_size", "max_length", "device")
# one scored window: (its tokens, how many of its last tokens are the continuation scored)
Row = tuple[list[int], int]


def window_rows(pairs: list[tuple[list[int], list[int]]], window: int) -> list[Row]:
    """(context, continuation) token pairs as windows of at most ``window`` + 1 tokens, truncated from
    the left (lm-eval's convention); a continuation longer than the window keeps its last tokens."""
    rows = []
    for context, continuation in pairs:
        row = (context + continuation)[-(window + 1) :]
        rows.append((row, min(len(continuation), len(row) - 1)))
    return rows


def _positive_int(name: str, value: object, expected: str = "a positive integer") -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"gpt-pretrain: {name}={value}: expected {expected}")
    return value


def batch_size_of(value: object, max_batch_size: object = None) -> int:
    """lm-eval's ``batch_size``: an integer, or ``auto`` / ``auto:N`` (no search here: the default, capped
    by ``max_batch_size``)."""
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        cap = DEFAULT_BATCH_SIZE if max_batch_size is None else _positive_int("max_batch_size", max_batch_size)
        return min(DEFAULT_BATCH_SIZE, cap)
    return _positive_int("batch_size", value, "a positive integer or auto")


def device_of(value: object) -> torch.device:
    """``cpu`` or ``cuda[:N]``; none given, or cuda where there is none (lm-eval's default is
    ``cuda:0``): cuda when available, else cpu, with a warning line (as lm-eval's ``hf`` model does)."""
    available = torch.cuda.is_available()
    if value is None:
        return torch.device("cuda" if available else "cpu")
    try:
        device = torch.device(str(value))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"gpt-pretrain: device={value}: expected cpu or cuda[:N]")
    if device.type == "cuda" and not available:
        print(f"warning: gpt-pretrain: device={value}: CUDA is not available here, using cpu", file=sys.stderr)
        return torch.device("cpu")
    return device


@register_model("gpt-pretrain")
class GPTPretrainLM(LM):
    def __init__(
        self,
        loaded: LoadedModel,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.loaded, self.batch_size = loaded, batch_size
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.progress = True  # tqdm bars for long request lists
        seq_len = loaded.context
        self.max_length = seq_len if max_length is None else _positive_int("max_length", max_length)
        if self.max_length > seq_len:
            raise UserError(
                f"gpt-pretrain: max_length={self.max_length}: more than the model's seq_len ({seq_len}, {loaded.path})"
            )
        self._device = torch.device(device)
        loaded.model.to(self._device)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        batch_size: object = DEFAULT_BATCH_SIZE,
        max_batch_size: object = None,
        max_length: object = None,
        device: object = None,
    ) -> GPTPretrainLM:
        """``checkpoint=`` a run dir or a ``checkpoints/step_<N>`` dir, any layout, either engine."""
        size, where = batch_size_of(batch_size, max_batch_size), device_of(device)
        if max_length is not None:
            _positive_int("max_length", max_length)  # before the load; the seq_len bound after it
        return cls(load_model(str(checkpoint)), batch_size=size, max_length=max_length, device=where)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> GPTPretrainLM:
        """lm-eval's constructor: ``--model_args`` as a dict, plus its ``--batch_size``/``--device``
        (``additional_config``; a key given in both is taken from model_args)."""
        args = {k: v for k, v in (additional_config or {}).items() if v is not None} | dict(arg_dict)
        unknown = [k for k in args if k not in MODEL_ARGS]
        if unknown:
            raise UserError(
                f"gpt-pretrain: unknown model_args {unknown[0]}= (known: checkpoint, batch_size, max_length, device)"
            )
        if args.get("checkpoint") in (None, ""):
            raise UserError("gpt-pretrain needs --model_args checkpoint=RUN_DIR (or a checkpoints/step_<N> dir)")
        return cls.from_checkpoint(**args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> GPTPretrainLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def _log_probs(self, inputs: torch.Tensor) -> torch.Tensor:
        if self._device.type == "cpu":
            return self.loaded.log_probs(inputs)
        with torch.device(self._device):  # position ids are made on the model's device too
            return self.loaded.log_probs(inputs.to(self._device)).cpu()

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of each continuation given its context, is it the greedy one)."""
        rows = window_rows(pairs, self.max_length)
        out: list[tuple[float, bool]] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = max(len(row) for row, _ in chunk) - 1
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, (row, _) in enumerate(chunk):
                inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
            logprobs = self._log_probs(inputs)
            for i, (row, scored) in enumerate(chunk):
                n = len(row) - 1
                targets = torch.tensor(row[n + 1 - scored :], dtype=torch.long)
                positions = torch.arange(n - scored, n)
                token_lp = logprobs[i, positions, targets]
                greedy = bool((logprobs[i, positions].argmax(-1) == targets).all())
                out.append((float(token_lp.sum()), greedy))
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        eot = self.tokenizer.eot_id
        pairs = []
        for request in requests:
            context, continuation = request.args
            pairs.append((self._encode(context) or [eot], self._encode(continuation)))
        quiet = not self.progress or len(pairs) < 64
        return [result for result in tqdm(self.score(pairs), desc="loglikelihood", disable=quiet)]

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """Every document's disjoint windows, scored together (batches span documents), summed per document."""
        eot, window = self.tokenizer.eot_id, self.max_length
        pairs: list[tuple[list[int], list[int]]] = []
        spans = []
        for request in tqdm(requests, desc="rolling", disable=not self.progress or len(requests) < 4):
            (text,) = request.args
            windows = get_rolling_token_windows(self._encode(text), eot, max_seq_len=window, context_len=1)
            start = len(pairs)
            pairs += [make_disjoint_window(w) for w in windows]
            spans.append((start, len(pairs)))
        scores = self.score(pairs)
        return [sum(lp for lp, _ in scores[a:b]) for a, b in spans]

    def generate_until(self, requests: list[Any]) -> list[str]:
        tokenizer = self.tokenizer
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            ids = (self._encode(context) or [tokenizer.eot_id])[-self.max_length :]
            new = sample(
                self.loaded.model,
                ids,
                int(gen_kwargs.get("max_gen_toks", 64)),
                self.max_length,
                self.loaded.vocab_size,
                temperature=float(gen_kwargs.get("temperature", 0.0)),
            )
            text = tokenizer.decode(new)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            outputs.append(text)
        return outputs


class InLoopLM(GPTPretrainLM):
    """gpt-eval's request handling over the model being trained (``pretrain/eval/in_loop.py``).

    The model lives in the training engine, split over tp/pp ranks, so there is no
    :class:`LoadedModel` and no logits here: ``score_rows`` returns each row's summed
    log-probability of its scored tokens (from the training loss, the same numbers). Hence
    ``is_greedy`` is always False (the argmax is not computed; the bundled tasks use only
    the sums) and generation tasks are refused.
    """

    def __init__(
        self, tokenizer: Tokenizer, max_length: int, batch_size: int, score_rows: Callable[[list[Row]], list[float]]
    ) -> None:
        LM.__init__(self)  # not GPTPretrainLM's: there is no checkpoint to load
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.score_rows = score_rows
        self.progress = False  # the training log gets one line per evaluation instead

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        rows = window_rows(pairs, self.max_length)
        out: list[tuple[float, bool]] = []
        for start in range(0, len(rows), self.batch_size):
            out += [(logprob, False) for logprob in self.score_rows(rows[start : start + self.batch_size])]
        return out

    def generate_until(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError(
            "generation tasks (generate_until) are not evaluated in the training loop: "
            "run gpt-eval or lm_eval --model gpt-pretrain on a checkpoint"
        )
