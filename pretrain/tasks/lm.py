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
from omegaconf import DictConfig

from conf.errors import UserError
from data.mixture import MixtureLoader, Source, normalised
from data.remote import RemoteOptions, is_remote
from data.shards import Manifest, check_files, load_manifest
from data.stream import Layout, TrainLoader, eval_batches
from data.tokenizer import TOKENIZER_FILE, check_saved_tokenizer, load_tokenizer
from parallel.engine import Engine, ModelSpec, StepResult
from parallel.topology import Topology, compute_device
from parallel.train_state import TrainState
from pretrain.eval.in_loop import InLoopEval
from pretrain.model import build_gpt, flops_per_token, position_ids, transformer_config
from pretrain.model.moe import is_moe
from pretrain.model.moe_metrics import RouterStats
from pretrain.trainer.flops import peak_flops
from pretrain.trainer.metrics import truncate_after
from pretrain.trainer.resume_checks import check_data, data_identity
from pretrain.trainer.source_changes import DataResume, open_sources, per_source_validation, weights_line


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


def lm_model_spec(model_cfg: DictConfig, vocab_size: int, seed: int) -> ModelSpec:
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


def build_engine(cfg: DictConfig, topo: Topology, vocab_size: int) -> Engine:
    """The engine of ``cfg`` over a pretraining GPT, as the Trainer builds it for a new run
    (tests and benchmarks that need an engine without a run dir)."""
    from omegaconf import open_dict

    from parallel.capabilities import distributed_optimizer_in_effect
    from parallel.engine import engine_class

    with open_dict(cfg):
        cfg.parallel.distributed_optimizer = distributed_optimizer_in_effect(cfg, topo.dp)
    spec = lm_model_spec(cfg.model, vocab_size, int(cfg.train.seed))
    return engine_class(str(cfg.parallel.engine))(cfg, topo, spec)


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

    def __init__(self, cfg: DictConfig):
        self.sources: list[Source] = []  # data.sources: a mixture (data/mixture.py, pretrain/trainer/source_changes.py)
        self.resume: DataResume | None = None
        self.mixture_events: list[dict[str, Any]] = []
        if cfg.data.get("sources"):
            self.sources, self.identity = open_sources(cfg)  # one tokenizer, seq_len and dtype
            self.manifest = self.sources[0].manifest
        else:
            if not is_remote(cfg.data.dir):  # config.yaml and checkpoints work from any cwd
                cfg.data.dir = str(Path(cfg.data.dir).expanduser().resolve())
            self.manifest = load_manifest(cfg.data.dir, RemoteOptions.from_config(cfg.data))
            check_files(self.manifest)
            self.identity = data_identity(self.manifest)
            if self.manifest.seq_len > cfg.model.seq_len:
                raise UserError(
                    f"data.dir={cfg.data.dir} has seq_len={self.manifest.seq_len} > model.seq_len={cfg.model.seq_len}"
                )
        # loaded, not only hashed: a broken tokenizer.json would be copied into every checkpoint
        # (a mixture's sources share its bytes: open_sources compared their sha256)
        check_saved_tokenizer(self.manifest.directory, self.manifest.vocab_size, self.manifest.eot_id)
        self.vocab_size = self.manifest.vocab_size
        self.files = (self.manifest.directory / TOKENIZER_FILE,)
        self.cfg = cfg
        self.sample_log: Any = None
        # eval.every_steps: lm-eval tasks on the current weights; task files checked here, before any work
        self.in_loop_eval = InLoopEval.from_config(cfg, self.manifest.directory)

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    def configure(self, cfg: DictConfig) -> None:
        pass

    def check_resume(self, cfg: DictConfig, state: TrainState, step_dir: Path) -> bool:
        if self.sources or "sources" in (state.data_identity or {}):  # a mixture now or then
            self.resume = DataResume(cfg, state, self.identity)
            return self.resume.restore or bool(self.sources)  # a mixture's new sources start at 0
        return check_data(cfg, state, self.identity)

    def model_spec(self, cfg: DictConfig, resuming: bool) -> ModelSpec:
        return lm_model_spec(cfg.model, self.vocab_size, int(cfg.train.seed))

    def start(self, cfg: DictConfig, topo: Topology) -> None:
        self.topo = topo
        self.layout = Layout(int(cfg.train.global_batch), int(cfg.train.micro_batch), topo.dp_rank, topo.dp)
        args = (self.layout, int(cfg.train.seed), int(cfg.data.num_streams), int(cfg.data.num_workers))
        self.loader = MixtureLoader(self.sources, *args) if self.sources else TrainLoader(self.manifest, *args)
        self.tokens_per_step = self.layout.global_batch * self.manifest.seq_len
        # MFU: model FLOPs per token (6N + attention) over all ranks' peak
        self.model_flops = flops_per_token(cfg.model, self.vocab_size, self.manifest.seq_len)
        self.world_peak = peak_flops(cfg.train.peak_tflops, bool(cfg.train.bf16)) * topo.world_size

    def begin(self, run_dir: Path, step: int) -> None:
        """``samples_rank<R>.jsonl`` (``train.log_samples``): the sample ids each rank trained on, per step."""
        if not self.cfg.train.log_samples:
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
        record = {
            "tokens": step * self.tokens_per_step,
            "tokens_per_s": self.tokens_per_step / step_time,
            "mfu": self.model_flops * self.tokens_per_step / step_time / self.world_peak,
        }
        if self.sources:  # consumed over all ranks (the global order is known to every rank)
            seq = self.manifest.seq_len
            record.update({f"tokens/{name}": n * seq for name, n in self.loader.samples().items()})
        return record

    def cadence(self, cfg: DictConfig) -> tuple[int, int]:
        return int(cfg.train.eval_every), int(cfg.train.save_every)

    def evaluate(self, engine: Engine, topo: Topology, beat: Callable[[], None]) -> dict[str, float]:
        train = self.cfg.train
        if self.sources:  # val_loss/<name> per source with a validation split; val_loss: their weighted mean
            losses = {
                s.name: validation_loss(engine, s.manifest, topo, int(train.eval_micro_batch), train.eval_batches, beat)
                for s in self.sources
            }
            found = {name: loss for name, loss in losses.items() if loss is not None}
            return per_source_validation(found, normalised(self.loader.weights))
        loss = validation_loss(engine, self.manifest, topo, int(train.eval_micro_batch), train.eval_batches, beat)
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
            print(f"val_loss {val_loss:.4f} (whole validation split, step {step})", flush=True)
        if topo.rank == 0 and trained and int(self.cfg.train.sample_tokens) > 0:
            self.print_sample(engine, topo)
        return {"step": step, "val_loss": val_loss}

    def print_sample(self, engine: Engine, topo: Topology) -> None:
        if topo.world_size > 1:
            print("(sample skipped in a multi-process run: use gpt-generate on the checkpoint)")
            return
        from pretrain.model.sampling import sample

        cfg = self.cfg
        tokenizer = load_tokenizer(self.manifest.directory)
        prompt = tokenizer.encode(str(cfg.train.sample_prompt)) or [tokenizer.eot_id]
        ids = sample(
            engine.unwrapped_model(),
            prompt,
            int(cfg.train.sample_tokens),
            int(cfg.model.seq_len),
            tokenizer.vocab_size,
            temperature=0.8,
            top_k=200,
            seed=int(cfg.train.seed),
        )
        print("--- sample ---\n" + tokenizer.decode(prompt + ids).strip() + "\n--------------", flush=True)
