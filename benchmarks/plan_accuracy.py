"""How close ``parallel.plan.estimate_memory`` is to real runs on this machine (issue #20).

Starts ``benchmarks/plan_census.py`` under torchrun (gloo, CPU, one thread per rank) for

- **model states**: megatron tp2, pp2, pp2-vpp2, dp2 (distributed optimizer and not), tp2-dp2 and
  bf16 variants; DeepSpeed ZeRO 0-3 at dp2, fp32 and bf16, with and without CPU offload. A census
  of every live tensor (parameters, gradients and buffers, optimizer state) when the second
  optimizer update begins, per rank, against the estimate of the same rank (``at_optimizer_step``).
  Each case runs in its own processes: a census counts everything alive.
- **activations**: the peak bytes saved for backward (``saved_tensors_hooks``, per storage) over one
  training step, per rank, through megatron-core's schedules: tp1, tp2 + sequence parallelism,
  pp2 1F1B and pp2 interleaved (4 micro-batches), recompute none / selective / full, two sequence
  lengths, two micro-batch sizes (``model=tiny``; ``model=llama-tiny`` at one size).

    python benchmarks/plan_accuracy.py [--quick] [--no-deepspeed]

Prints one table row per case (the rank with the largest error) and the worst relative error LAST.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "benchmarks" / "plan_census.py"
LAYOUTS = {  # name: (processes, overrides)
    "tp1": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "pp2-vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"]),
    "dp2": (2, []),
    "tp2-dp2": (4, ["parallel.tp=2"]),
}
DS = ["parallel.engine=deepspeed"]


def states_cases(deepspeed: bool, quick: bool) -> list[tuple[str, int, list[str]]]:
    """(name, processes, overrides) of the model-state census."""
    batch = ["train.micro_batch=2", "train.global_batch=8"]
    cases = [
        ("tp2", *LAYOUTS["tp2"]),
        ("pp2", *LAYOUTS["pp2"]),
        ("pp2-vpp2", *LAYOUTS["pp2-vpp2"]),
        ("dp2 distributed optimizer", 2, []),
        ("tp2-dp2", *LAYOUTS["tp2-dp2"]),
        ("dp2 no distributed optimizer", 2, ["parallel.distributed_optimizer=false"]),
        ("dp2 bf16", 2, ["train.bf16=true"]),
        ("pp2 bf16", 2, ["parallel.pp=2", "train.bf16=true"]),
        ("llama-tiny pp2", 2, ["model=llama-tiny", "parallel.pp=2"]),
        ("llama-tiny dp2 bf16", 2, ["model=llama-tiny", "train.bf16=true"]),
    ]
    if quick:
        cases = [cases[0], cases[2], cases[3], cases[6]]
    if deepspeed:
        stages = [("0", []), ("1", []), ("2", []), ("3", [])]
        for bf16 in ("false", "true"):
            for stage, extra in stages:
                if quick and (stage in ("0", "1") or bf16 == "true"):
                    continue
                overrides = [*DS, f"parallel.zero_stage={stage}", f"train.bf16={bf16}", *extra]
                cases.append((f"ZeRO-{stage} dp2{' bf16' if bf16 == 'true' else ''}", 2, overrides))
            for stage in ("1", "2", "3"):
                if quick and (stage != "3" or bf16 == "true"):
                    continue
                overrides = [*DS, f"parallel.zero_stage={stage}", "parallel.offload=cpu", f"train.bf16={bf16}"]
                cases.append((f"ZeRO-{stage} offload dp2{' bf16' if bf16 == 'true' else ''}", 2, overrides))
    return [(name, procs, [*batch, *overrides]) for name, procs, overrides in cases]


def activation_cases(quick: bool) -> dict[str, list[dict]]:
    """Per layout, the cases one torchrun measures (layout fixed per process group)."""
    out: dict[str, list[dict]] = {}
    for layout in ("tp1", "tp2", "pp2", "pp2-vpp2"):
        micro_batches = 4 if layout.startswith("pp") else 2
        cases = []
        sizes = [(64, 2)] if quick else [(64, 1), (64, 2), (128, 1), (128, 2)]
        for model in ("tiny", "llama-tiny"):
            for recompute in ("none", "selective", "full"):
                for seq, micro in sizes if model == "tiny" else [(64, 2)]:
                    name = f"{model} {layout} recompute={recompute} s={seq} b={micro}"
                    overrides = [*LAYOUTS[layout][1], f"model={model}", f"model.seq_len={seq}"]
                    overrides.append(f"model.recompute={recompute}")
                    overrides += [f"train.micro_batch={micro}", f"train.global_batch={micro * micro_batches}"]
                    cases.append({"name": name, "mode": "activations", "overrides": overrides})
        if not quick:
            for model in ("tiny", "llama-tiny"):
                overrides = [*LAYOUTS[layout][1], f"model={model}", "train.bf16=true", "train.micro_batch=2"]
                overrides += [f"train.global_batch={2 * micro_batches}"]
                cases.append({"name": f"{model} {layout} bf16 s=64 b=2", "mode": "activations", "overrides": overrides})
        out[layout] = cases
    return out


def torchrun(procs: int, cases: list[dict], out: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = out / f"cases-{port}.json"
    spec.write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={port}", str(WORKER), str(spec), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        sys.exit(f"plan_census failed for {[c['name'] for c in cases]}:\n{done.stderr[-3000:]}")


def results(out: Path, name: str) -> list[dict]:
    slug = name.replace(" ", "_")
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{slug}.rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cases of each kind")
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--only", choices=("states", "activations"), default=None, help="one kind of comparison")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    rows: list[tuple[str, str, int, int, float]] = []  # (kind, case, measured, estimate, error)
    for name, procs, overrides in states_cases(not args.no_deepspeed, args.quick) if args.only != "activations" else []:
        torchrun(procs, [{"name": name.replace(" ", "_"), "mode": "states", "overrides": overrides}], out)
        rows.append(row("model states", name, results(out, name), "total"))
    for layout, cases in activation_cases(args.quick).items() if args.only != "states" else {}.items():
        for case in cases:
            case["name"] = case["name"].replace(" ", "_")
        torchrun(LAYOUTS[layout][0], cases, out)
        for case in cases:
            rows.append(row("activations", case["name"].replace("_", " "), results(out, case["name"]), "saved_peak"))
    print("| kind | case | measured (bytes, worst rank) | estimate | error |")
    print("|---|---|---|---|---|")
    for kind, name, measured, estimate, error in rows:
        print(f"| {kind} | {name} | {measured:,} | {estimate:,} | {error:+.2%} |")
    for kind, limit in (("model states", 0.02), ("activations", 0.10)):
        of_kind = [r for r in rows if r[0] == kind]
        if not of_kind:
            continue
        _, name, _, _, error = max(of_kind, key=lambda r: abs(r[4]))
        verdict = "ok" if abs(error) <= limit else "OVER"
        print(f"{kind}: worst {abs(error):.2%} ({name}), limit {limit:.0%}: {verdict}")
    overall = max(rows, key=lambda r: abs(r[4]))
    print(f"worst relative error: {abs(overall[4]):.4f} ({overall[0]}: {overall[1]})")


def row(kind: str, name: str, ranks: list[dict], key: str) -> tuple[str, str, int, int, float]:
    """The rank whose estimate is furthest from its measurement."""
    if not ranks:
        sys.exit(f"no results for {name}")
    errors = [(r["estimate"][key] / r["measured"][key] - 1, r) for r in ranks]
    error, rank = max(errors, key=lambda x: abs(x[0]))
    return kind, name, rank["measured"][key], rank["estimate"][key], error


if __name__ == "__main__":
    main()
