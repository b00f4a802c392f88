"""Pretraining: the next-token objective L1 over webdataset shards (``gpt-pretrain``).

The loss here is the one LM loss of the project: both engines call :func:`lm_forward_step`
(megatron-core's schedule directly, DeepSpeed's engine one micro-batch at a time).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from conf.errors import UserError
from conf.groups import ModelConfig
from data.mixture import MixtureLoader, Source, normalised
from data.remote import RemoteOptions, is_remote
from data.shards import Manifest, check_files, load_manifest
from data.stream import Layout, TrainLoader, eval_batches
from data.tokenizer import TOKENIZER_FILE, check_saved_tokenizer, load_tokenizer
from parallel.engine import Engine, ModelSpec, StepResult
from parallel.run_config import Groups, Run, as_plain, replaced
from parallel.topology import Topology, compute_device
from parallel.train_state import TrainState
from pretrain.eval.in_loop import InLoopEval, resolved_eval
from pretrain.model import build_gpt, flops_per_token, position_ids, transformer_config
from pretrain.model.moe import is_moe
from pretrain.model.moe_metrics import RouterStats
from pretrain.trainer.flops import peak_flops
from pretrain.trainer.metrics import truncate_after
from pretrain.trainer.resume_checks import check_data, data_identity
from pretrain.trainer.source_changes import (
    DataResume,
    open_sources,
    per_source_validation,
    resolved_sources,
    weights_line,
)


def lm_forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
    """One micro-batch of token windows through this stage; the loss is the masked mean token loss.

    A batch carrying a ``row_sums`` list gets its per-sequence sums of masked token losses appended
    (on the last pipeline stage, where the loss exists): the engines reduce only named scalars, and
    in-loop evaluation needs one log-likelihood per sequence from the same forward and loss.
    """
    batch = next(data_iterator)
    device = compute_device()
    tokens = batch["tokens"].to(device, non_blocking=True)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    output = model(inputs, position_ids(*inputs.shape).to(device), None, labels=labels)

    def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch["mask"].to(device, non_blocking=True)
        loss_sum = (per_token.float() * mask).sum()
        count = mask.sum()
        if "row_sums" in batch:  # in-loop evaluation asks for each sequence's sum (pretrain/eval/in_loop.py)
            batch["row_sums"].append((per_token.double() * mask).sum(-1).detach().cpu())
        return loss_sum / count.clamp(min=1), {"loss_sum": loss_sum.detach(), "tokens": count}

    return output, loss_func


def lm_batch_shape(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(sequence length, sequences) the model sees for a batch of windows (inputs drop the last token)."""
    rows, width = batch["tokens"].shape
    return width - 1, rows


def lm_model_spec(model_cfg: ModelConfig, vocab_size: int, seed: int) -> ModelSpec:
    """The GPT of ``model_cfg`` with the LM loss: initial weights depend on ``seed`` only. A MoE
    model reports its router losses and expert load after each step (``pretrain/model/moe_metrics.py``)."""
    stats = RouterStats(model_cfg) if is_moe(model_cfg) else None

    def build(config: Any, vp_stage: int | None) -> torch.nn.Module:
        model = build_gpt(model_cfg, vocab_size, config, vp_stage=vp_stage, seed=seed)
        if stats is not None:
            stats.attach(model)
        return model

    return ModelSpec(
        functools.partial(transformer_config, model_cfg),
        build,
        lm_forward_step,
        lm_batch_shape,
        step_metrics=stats.collect if stats is not None else None,
    )


def build_engine(run: Run, vocab_size: int) -> Engine:
    """The engine of ``run`` over a pretraining GPT, as the Trainer builds it for a new run (benchmarks
    and tests that need an engine without a run dir: ``Run.from_config(cfg, world_size, rank)``)."""
    from parallel.engine import engine_class

    return engine_class(run.parallel.engine)(run, run.layout, lm_model_spec(run.model, vocab_size, run.train.seed))


def validation_loss(
    engine: Engine, manifest: Manifest, topo: Topology, micro: int, limit: int | None, beat: Callable[[], None]
) -> float | None:
    """Mean token loss over the validation split (all of it unless ``limit`` batches).

    Micro-batches go to the engine in groups whose size is a multiple of pp (the
    interleaved pipeline schedule needs at least pp of them), padded with empty ones.
    """
    if "val" not in manifest.splits:
        return None
    batches = eval_batches(manifest, "val", micro, topo.dp_rank, topo.dp, limit=limit)
    group = topo.pp * max(1, 16 // topo.pp)
    loss_sum = tokens = 0.0
    chunk: list = []
    for batch in itertools.chain(batches, [None]):
        if batch is not None:
            chunk.append(batch)
        if chunk and (len(chunk) == group or batch is None):
            while len(chunk) % topo.pp:
                chunk.append({"tokens": chunk[0]["tokens"], "mask": torch.zeros_like(chunk[0]["mask"])})
            totals = engine.eval_step(chunk)
            loss_sum, tokens, chunk = loss_sum + totals["loss_sum"], tokens + totals["tokens"], []
            beat()
    return loss_sum / max(tokens, 1.0)


class PretrainTask:
    """L1 over the shards of ``data.dir`` (or the mixture of ``data.sources``), in the dp-independent
    global order of ``data/stream.py`` (``data/mixture.py``)."""

    command = "gpt-pretrain"

    def __init__(self, groups: Groups):
        self.sources: list[Source] = []  # data.sources: a mixture (data/mixture.py, pretrain/trainer/source_changes.py)
        self.resume: DataResume | None = None
        self.mixture_events: list[dict[str, Any]] = []
        data, model = groups.data, groups.model
        if data.sources:
            self.data = resolved_sources(data)  # dirs resolved, names filled in: as the run records them
            self.sources, self.identity = open_sources(self.data, model.seq_len)  # one tokenizer, seq_len, dtype
            self.manifest = self.sources[0].manifest
        else:
            # config.yaml and checkpoints work from any cwd
            self.data = data if is_remote(data.dir) else replaced(data, dir=str(Path(data.dir).expanduser().resolve()))
            self.manifest = load_manifest(self.data.dir, RemoteOptions.from_config(as_plain(self.data)))
            check_files(self.manifest)
            self.identity = data_identity(self.manifest)
            if self.manifest.seq_len > model.seq_len:
                raise UserError(
                    f"data.dir={data.dir} has seq_len={self.manifest.seq_len} > model.seq_len={model.seq_len}"
                )
        # loaded, not only hashed: a broken tokenizer.json would be copied into every checkpoint
        # (a mixture's sources share its bytes: open_sources compared their sha256)
        check_saved_tokenizer(self.manifest.directory, self.manifest.vocab_size, self.manifest.eot_id)
        self.vocab_size = self.manifest.vocab_size
        self.files = (self.manifest.directory / TOKENIZER_FILE,)
        self.sample_log: Any = None
        self.mfu_warned = False
        # eval.every_steps: lm-eval tasks on the current weights; task files checked here, before any work
        self.eval = resolved_eval(groups.eval)
        resolved = Groups({**groups.as_dict(), "eval": self.eval})
        self.in_loop_eval = InLoopEval.from_config(resolved, self.manifest.directory)

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    def configure(self, groups: Groups) -> dict[str, Any]:
        return {"data": self.data, "eval": self.eval}

    def check_resume(self, config: Run, state: TrainState, step_dir: Path) -> bool:
        if self.sources or "sources" in (state.data_identity or {}):  # a mixture now or then
            self.resume = DataResume(config, state, self.identity)
            return self.resume.restore or bool(self.sources)  # a mixture's new sources start at 0
        return check_data(config, state, self.identity)

    def model_spec(self, config: Run, resuming: bool) -> ModelSpec:
        return lm_model_spec(config.model, self.vocab_size, config.train.seed)

    def start(self, config: Run, topo: Topology) -> None:
        self.config, self.topo = config, topo
        train, data = config.train, config.data
        self.layout = Layout(train.global_batch, train.micro_batch, topo.dp_rank, topo.dp)
        args = (self.layout, train.seed, data.num_streams, data.num_workers)
        self.loader = MixtureLoader(self.sources, *args) if self.sources else TrainLoader(self.manifest, *args)
        self.tokens_per_step = self.layout.global_batch * self.manifest.seq_len
        # MFU: model FLOPs per token (6N + attention) over all ranks' peak
        self.model_flops = flops_per_token(config.model, self.vocab_size, self.manifest.seq_len)
        peak = peak_flops(train.peak_tflops, train.bf16)  # None: no peak a step cannot exceed (no MFU)
        self.world_peak = None if peak is None else peak * topo.world_size

    def describe(self) -> str:
        m = self.manifest
        what = f"{m.tokenizer} tokenizer, vocab {m.vocab_size}, windows of {m.seq_len}"
        if self.sources:
            return f"data.sources {', '.join(s.name for s in self.sources)} ({what})"
        return f"data.dir {m.location or m.directory} ({what})"

    def eval_description(self) -> str:
        manifests = [s.manifest for s in self.sources] if self.sources else [self.manifest]
        windows = sum(
            min(sum(s.num_samples for s in m.shards("val")), self._eval_limit()) for m in manifests if "val" in m.splits
        )
        whole = self.config.train.eval_batches is None
        return f"{windows} windows of the validation split" + ("" if whole else " (train.eval_batches)")

    def _eval_limit(self) -> int:
        """Windows an evaluation reads per split (``train.eval_batches`` micro-batches on every dp rank)."""
        train = self.config.train
        limit = train.eval_batches
        return 1 << 62 if limit is None else limit * train.eval_micro_batch * self.topo.dp

    def begin(self, run_dir: Path, step: int) -> None:
        """``samples_rank<R>.jsonl`` (``train.log_samples``): the sample ids each rank trained on, per step."""
        if not self.config.train.log_samples:
            return
        path = run_dir / f"samples_rank{self.topo.rank}.jsonl"
        truncate_after(path, step)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.sample_log = path.open("a", buffering=1)

    def next_batches(self) -> list[dict[str, torch.Tensor]]:
        self._last = [next(self.loader) for _ in range(self.layout.micro_batches_per_step)]
        return self._last

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.resume is not None:  # a mixture now or then: sources matched by name and shard set
            if not self.resume.restore:
                return
            state = self.resume.loader_state(state, mixture=bool(self.sources))
        self.loader.load_state_dict(state)
        changed = getattr(self.loader, "changed", None)
        if changed is not None:
            self.mixture_events.append({"event": "mixture_weights", "old": changed[0], "new": changed[1]})
            if self.topo.rank == 0:
                print(weights_line(self.resume.step, *changed), flush=True)

    def resume_events(self) -> list[dict[str, Any]]:
        """What the resume changed in the data (``metrics.jsonl`` events; the Trainer logs them)."""
        events = (self.resume.events if self.resume is not None else []) + self.mixture_events
        for event in events:
            if event["event"] == "mixture_sources" and self.topo.rank == 0:
                print(f"data: data.allow_new=true: sources added {event['added']}, dropped {event['removed']}")
        return events

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"data_identity": self.identity}

    def step_record(self, result: StepResult, step_time: float, step: int) -> dict[str, Any]:
        if self.sample_log is not None:
            ids = [i for batch in self._last for i in batch["ids"].tolist()]
            line = {"step": step, "ids": ids}
            if self.sources:  # the index of each id's source in data.sources
                line["sources"] = [i for batch in self._last for i in batch["source"].tolist()]
            self.sample_log.write(json.dumps(line) + "\n")
        record = {"tokens": step * self.tokens_per_step, "tokens_per_s": self.tokens_per_step / step_time}
        if self.world_peak is not None:
            mfu = self.model_flops * self.tokens_per_step / step_time / self.world_peak
            if mfu <= 1.0:
                record["mfu"] = mfu
            elif not self.mfu_warned:  # a peak below what the run reaches: not a peak, say so once
                self.mfu_warned = True
                print(
                    f"warning: train.peak_tflops={self.config.train.peak_tflops} is below what this run "
                    f"reaches (MFU {mfu:.2f} > 1): MFU is left out; pass the device's datasheet peak",
                    flush=True,
                )
        if self.sources:  # consumed over all ranks (the global order is known to every rank)
            seq = self.manifest.seq_len
            record.update({f"tokens/{name}": n * seq for name, n in self.loader.samples().items()})
        return record

    def cadence(self, config: Run) -> tuple[int, int]:
        return config.train.eval_every, config.train.save_every

    def evaluate(self, engine: Engine, topo: Topology, beat: Callable[[], None]) -> dict[str, float]:
        train = self.config.train
        if self.sources:  # val_loss/<name> per source with a validation split; val_loss: their weighted mean
            losses = {
                s.name: validation_loss(engine, s.manifest, topo, train.eval_micro_batch, train.eval_batches, beat)
                for s in self.sources
            }
            found = {name: loss for name, loss in losses.items() if loss is not None}
            return per_source_validation(found, normalised(self.loader.weights))
        loss = validation_loss(engine, self.manifest, topo, train.eval_micro_batch, train.eval_batches, beat)
        return {} if loss is None else {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    def finish(
        self, engine: Engine, topo: Topology, step: int, last_eval: dict[str, float] | None, trained: bool
    ) -> dict:
        if self.sample_log is not None:
            self.sample_log.close()
        if self.in_loop_eval is not None:
            self.in_loop_eval.close()
        val_loss = (last_eval or {}).get("val_loss")
        if topo.rank == 0 and val_loss is not None:
            print(f"val_loss {val_loss:.4f} ({self.eval_description()}, step {step})", flush=True)
        if topo.rank == 0 and trained and self.config.train.sample_tokens > 0:
            self.print_sample(engine, topo)
        return {"step": step, "val_loss": val_loss}

    def print_sample(self, engine: Engine, topo: Topology) -> None:
        if topo.world_size > 1:
            print("(sample skipped in a multi-process run: use gpt-generate on the checkpoint)")
            return
        from pretrain.model.sampling import sample

        train = self.config.train
        tokenizer = load_tokenizer(self.manifest.directory)
        prompt = tokenizer.encode(train.sample_prompt) or [tokenizer.eot_id]
        ids = sample(
            engine.unwrapped_model(),
            prompt,
            train.sample_tokens,
            self.config.model.seq_len,
            tokenizer.vocab_size,
            temperature=0.8,
            top_k=200,
            seed=train.seed,
        )
        print("--- sample ---\n" + tokenizer.decode(prompt + ids).strip() + "\n--------------", flush=True)
