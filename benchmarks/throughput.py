"""gpt-pretrain tokens/s over bare PyTorch loops of the same shape, and torch.compile on over off.

Two rows, each trained with batch 12 × 64 tokens from the same shards, side by side, alternating,
``--rounds`` times (``--model tiny``, ``llama-tiny`` or ``both``, the default):

``model=tiny`` (nanoGPT's CPU shape: 4 layers, 4 heads, d=128):

- **nanoGPT loop**: nanoGPT's model in plain PyTorch (``nn.Linear``, fused causal SDPA; see
  ``nanogpt_reference.py``), batches in memory, ``torch.optim.AdamW``, clipping -- what a user
  writes without any framework. This is the reference of the row's ratio.
- **same-GPTModel loop**: the same plain loop around this project's megatron-core ``GPTModel``
  (isolates the cost of the framework around the model).
- **gpt-pretrain**: the real command line (data loader, DDP wrapper, megatron optimizer,
  scheduler, logging), measured from its ``metrics.jsonl``; then again with ``train.compile=true``.

``model=llama-tiny`` (the same size with rotary positions, RMSNorm, SwiGLU, 4 query heads over
2 key/value heads, no biases, untied output layer):

- **Llama loop**: the same plain loop around a Llama-shaped model in plain PyTorch
  (``llama_reference.py``: ``torch.nn.RMSNorm``, rotate-half RoPE in torch, GQA SDPA, SwiGLU), the
  row's reference; its parameter count is asserted equal to the ``GPTModel``'s (both printed).
- **same-GPTModel loop** and **gpt-pretrain** as above (no compile run for this row).

``model=moe-tiny`` (``--model moe-tiny``; llama-tiny's attention, 8 experts of width 176, top-2):

- **MoE loop**: the plain loop around a MoE decoder in plain PyTorch (``moe_reference.py``: a
  linear router, top-k softmax, per-expert SwiGLU over the tokens sorted by expert, the Switch
  load-balancing loss), the row's reference; parameter counts asserted equal.
- **same-GPTModel loop** and **gpt-pretrain** as above (megatron-core's MoE layer).

    python benchmarks/throughput.py [--model {tiny,llama-tiny,moe-tiny,both}] [--steps 300] [--rounds 2] [--data DIR]

Each row prints its ratio gpt-pretrain / bare reference loop (goal >= 1.0); the last line is the
worst of the rows' ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import REPO, prepared_shards, pretrain_tokens_per_s  # noqa: E402

BATCH, SEQ = 12, 64
MODELS = ("tiny", "llama-tiny", "moe-tiny")
REFERENCE = {"tiny": "nanogpt", "llama-tiny": "llama", "moe-tiny": "moe"}  # each row's plain-PyTorch loop
LABEL = {"llama": "Llama-shaped bare loop (plain PyTorch, GQA SDPA)", "moe": "MoE bare loop (plain PyTorch, top-k)"}


def reference_model(kind: str, preset: str, data: Path) -> tuple[torch.nn.Module, Any, Any]:
    """(model, composed config, manifest) of a bare loop: ``nanogpt``, ``llama`` or ``moe`` (plain
    PyTorch) or ``gptmodel`` (this project's megatron-core GPTModel built from ``model=preset`` as
    gpt-pretrain builds it; the process group must exist)."""
    from benchmarks.llama_reference import Llama
    from benchmarks.nanogpt_reference import NanoGPT
    from conf.cli import compose
    from data.shards import load_manifest
    from pretrain.model import build_gpt, padded_vocab_size, transformer_config

    cfg = compose([f"model={preset}", f"data.dir={data}"])
    manifest = load_manifest(data)
    m = cfg.model
    torch.manual_seed(1337)
    if kind == "nanogpt":
        model = NanoGPT(manifest.vocab_size, SEQ, m.num_layers, m.hidden_size, m.num_heads, m.ffn_hidden_size)
    elif kind in ("moe", "llama"):
        from benchmarks.moe_reference import MoELlama

        vocab, kv = padded_vocab_size(manifest.vocab_size, m), m.num_query_groups or m.num_heads
        shape = (vocab, SEQ, m.num_layers, m.hidden_size, m.num_heads, kv)
        if kind == "moe":
            model = MoELlama(
                *shape,
                m.num_experts,
                m.moe_topk,
                m.moe_ffn_hidden_size,
                theta=float(m.rope_theta),
                eps=float(m.layernorm_eps),
                aux_coeff=float(m.moe_aux_loss_coeff),
            )
        else:
            model = Llama(*shape, m.ffn_hidden_size, theta=float(m.rope_theta), eps=float(m.layernorm_eps))
    else:
        model = build_gpt(cfg.model, manifest.vocab_size, transformer_config(cfg.model))
    return model, cfg, manifest


def training_rows(data: Path, manifest: Any) -> torch.Tensor:
    """The first shards' windows in memory: the bare loops sample their batches from them."""
    from data.shards import read_shard

    return torch.cat(
        [
            torch.from_numpy(read_shard(s, manifest.dtype, manifest.seq_len).astype("int64"))
            for s in manifest.shards("train")[:4]
        ]
    )


def fused_adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """What gpt-pretrain runs (megatron's optimizer over torch's fused AdamW), decay on matrices only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=True)


def bare_step(kind: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    """One plain training step: forward, backward, clipping, AdamW."""
    if kind in ("nanogpt", "llama", "moe"):
        loss = model(batch[:, :-1], batch[:, 1:])
    else:
        from pretrain.model import position_ids

        loss = model(batch[:, :-1], position_ids(*batch[:, :-1].shape), None, labels=batch[:, 1:]).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def bare_loop(data: Path, steps: int, skip: int, kind: str, preset: str = "tiny") -> tuple[float, int]:
    """(steady tokens/s: tokens over the timed steps' seconds, parameter count) of a plain loop (no DDP,
    no megatron optimizer; torch's fused AdamW) over ``kind``'s model (:func:`reference_model`)."""
    from conf.cli import compose, quiet_third_party
    from parallel.topology import Topology

    quiet_third_party()
    if kind == "gptmodel":
        from parallel import cpu_compat

        cpu_compat.apply()
        Topology.from_config(compose([f"model={preset}", f"data.dir={data}"]), world_size=1, rank=0).init(seed=1337)
    model, cfg, manifest = reference_model(kind, preset, data)
    rows = training_rows(data, manifest)
    optimizer = fused_adamw(model, float(cfg.train.lr))
    times = []
    for step in range(steps):
        start = time.perf_counter()
        bare_step(kind, model, optimizer, rows[torch.randint(0, len(rows), (BATCH,))])
        if step >= skip:
            times.append(time.perf_counter() - start)
    return BATCH * SEQ * len(times) / sum(times), sum(p.numel() for p in model.parameters())


def framework(data: Path, steps: int, skip: int, compile_: bool = False, preset: str = "tiny") -> float:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.train",
            f"data.dir={data}",
            f"model={preset}",
            f"run.dir={run_dir}",
            f"train.max_steps={steps}",
            f"train.micro_batch={BATCH}",
            f"train.global_batch={BATCH}",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.save_every=-1",
            f"train.compile={str(compile_).lower()}",
            "train.sample_tokens=0",
            "logging.wandb=disabled",
            "logging.progress_bar=false",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        env={**os.environ},
    )
    return pretrain_tokens_per_s(run_dir, skip)


def bare(data: Path, steps: int, skip: int, kind: str, preset: str = "tiny") -> tuple[float, int]:
    """A bare loop in its own process (fresh allocator and threads, like gpt-pretrain):
    (tokens/s, parameter count)."""
    out = subprocess.run(
        [sys.executable, __file__, "--bare-only", str(data), str(steps), str(skip), kind, preset],
        check=True,
        capture_output=True,
        text=True,
    )
    rate, params = out.stdout.strip().splitlines()[-1].split()
    return float(rate), int(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=(*MODELS, "both"), default="both")  # both: tiny and llama-tiny
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    models = MODELS[:2] if args.model == "both" else (args.model,)
    data = prepared_shards(args.data)
    skip = min(20, args.steps // 4)
    rates: dict[str, dict[str, list[float]]] = {
        "tiny": {"nanogpt": [], "gptmodel": [], "pretrain": [], "compiled": []},
        "llama-tiny": {"llama": [], "gptmodel": [], "pretrain": []},
        "moe-tiny": {"moe": [], "gptmodel": [], "pretrain": []},
    }
    params: dict[str, dict[str, int]] = {preset: {} for preset in MODELS}
    for round_ in range(args.rounds):
        for preset in models:
            row = rates[preset]
            for kind in (REFERENCE[preset], "gptmodel"):
                rate, params[preset][kind] = bare(data, args.steps, skip, kind, preset)
                row[kind].append(rate)
            row["pretrain"].append(framework(data, args.steps, skip, preset=preset))
            if preset == "tiny":
                # compilation happens in the first steps; skip a third of the run
                row["compiled"].append(framework(data, args.steps, max(skip, args.steps // 3), compile_=True))
            print(
                f"round {round_ + 1} {preset}: " + "   ".join(f"{k} {v[-1]:,.0f}" for k, v in row.items()), flush=True
            )
    ratios: dict[str, float] = {}
    for preset in models:
        med = {k: statistics.median(v) for k, v in rates[preset].items()}
        ref = REFERENCE[preset]
        threads = torch.get_num_threads()
        print(f"torch {torch.__version__}, threads {threads}, model={preset}, batch {BATCH}x{SEQ}, tokens/s:")
        if preset == "tiny":
            print(f"  nanoGPT-shaped bare loop (plain PyTorch, SDPA): {med['nanogpt']:,.0f}")
            print(f"  bare loop around the same GPTModel:             {med['gptmodel']:,.0f}")
            print(f"  gpt-pretrain:                                   {med['pretrain']:,.0f}")
            print(f"  gpt-pretrain train.compile=true:                {med['compiled']:,.0f}")
            print(f"ratio gpt-pretrain / same-GPTModel bare loop: {med['pretrain'] / med['gptmodel']:.3f}")
            print(f"ratio torch.compile on / off (gpt-pretrain): {med['compiled'] / med['pretrain']:.3f}")
            ratios[preset] = med["pretrain"] / med["nanogpt"]
            print(f"ratio gpt-pretrain / nanoGPT bare loop: {ratios[preset]:.3f}")
        else:
            n_ref, n_gpt = params[preset][ref], params[preset]["gptmodel"]
            print(f"  parameters: {ref} bare loop {n_ref:,}, GPTModel (as gpt-pretrain builds it) {n_gpt:,}")
            assert n_ref == n_gpt, f"parameter counts differ: {ref} reference {n_ref:,} vs GPTModel {n_gpt:,}"
            print(f"  {LABEL[ref] + ':':<50} {med[ref]:,.0f}")
            print(f"  {'bare loop around the same GPTModel:':<50} {med['gptmodel']:,.0f}")
            print(f"  {'gpt-pretrain:':<50} {med['pretrain']:,.0f}")
            print(f"ratio gpt-pretrain / same-GPTModel bare loop ({preset}): {med['pretrain'] / med['gptmodel']:.3f}")
            ratios[preset] = med["pretrain"] / med[ref]
            print(f"ratio gpt-pretrain / {ref} bare loop ({preset}): {ratios[preset]:.3f}")
    each = ", ".join(f"{preset} {r:.3f}" for preset, r in ratios.items())
    print(f"worst ratio gpt-pretrain / bare loop ({each}): {min(ratios.values()):.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--bare-only":
        rate, n_params = bare_loop(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
        print(rate, n_params)
    else:
        main()
