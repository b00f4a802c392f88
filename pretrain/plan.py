"""``gpt-plan``: know before launch whether a layout fits and how fast it will run.

It takes gpt-pretrain's config (the same groups and keys) and a ``hardware`` preset, runs every
check gpt-pretrain makes before launch (``pretrain/trainer/preflight.py``), then estimates per-rank memory
(``parallel/plan/memory.py``) and step time (``parallel/plan/time.py``) at ``hardware.gpus_per_node x
hardware.nodes`` ranks, without building a model or a process group. ``search=true`` ranks every
layout of that world size (``parallel/plan/search.py``). ``--json`` prints one JSON object instead
of text (Hydra would take it for an override: it is taken off the command line first, as
``--config-dir`` is checked before Hydra starts). Exit status 2 when a check fails or the layout
does not fit, each reason one ``error:`` line.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from conf.cli import check_group_choices, exit_on_user_error

JSON_FLAG = "--json"
_as_json = False  # set by main() from the command line


def _hardware(cfg: DictConfig, rates: bool) -> Any:
    from parallel.plan.hardware import resolve

    return resolve(cfg.hardware, bool(cfg.train.bf16), rates=rates)


def _rank_rows(memory: Any, hw: Any) -> list[dict[str, Any]]:
    from pretrain.trainer.preflight import KINDS, GiB

    rows = []
    for i, rank in enumerate(memory.ranks):
        row: dict[str, Any] = {"rank": f"pp{i}", "where": rank.where}
        row.update({f"{k}_gib": getattr(rank, k) / GiB for k in KINDS})
        row.update(cpu_offload_gib=rank.cpu_offload / GiB, total_gib=hw.needs(rank) / GiB, items=dict(rank.items))
        rows.append(row)
    return rows


def _time_report(time: Any) -> dict[str, Any]:
    return {
        "step_s": time.step_s,
        "tokens_per_s": time.tokens_per_s,
        "mfu": time.mfu,
        "tflops_per_device": time.mfu * time.peak_flops / 1e12,
        "terms_s": dict(time.terms),
        "notes": list(time.notes),
    }


def plan(cfg: DictConfig) -> tuple[dict[str, Any], int]:
    """The report gpt-plan prints, and its exit status."""
    from conf.schema import check_plan

    check_plan(cfg)  # gpt-plan's own keys (not among gpt-pretrain's checks): one line, before torch is imported
    from parallel.plan.params import Shape, total_params
    from pretrain.trainer.preflight import describe_layout, largest, memory_problem, run_checks

    search = bool(cfg.get("search", False))
    if cfg.get("plot") and not search:
        from conf.errors import UserError

        raise UserError(f"plot={cfg.plot}: the plot shows a search; add search=true")
    sized = _hardware(cfg, rates=False)  # the world size; rates are measured only if the checks pass
    checked = run_checks(cfg, sized.world_size, layout=not search)
    report: dict[str, Any] = {
        "ok": not checked.errors,
        "errors": list(checked.errors),
        "checks": [{"name": n, "detail": d} for n, d in checked.passed],
    }
    if checked.errors:
        return report, 2
    hw = _hardware(cfg, rates=True)
    shape = Shape.from_config(cfg.model, checked.vocab_size)
    report["hardware"] = {
        "name": hw.name,
        "description": hw.describe(),
        "world_size": hw.world_size,
        "gpus_per_node": hw.gpus_per_node,
        "nodes": hw.nodes,
        "memory_gib": hw.memory_bytes / (1 << 30),
        "peak_tflops": hw.peak_flops / 1e12,
        "matmul_efficiency": None if hw.probe else hw.matmul_efficiency,
        "measured": dict(hw.measured),
    }
    report["model"] = {
        "name": str(cfg.model.name),
        "params": total_params(shape),
        "vocab_size": checked.vocab_size,
        "padded_vocab": shape.vocab,
        "seq_len": checked.seq_len,
    }
    if search:
        return _search(cfg, hw, checked, report)
    from parallel.plan.memory import estimate_memory
    from parallel.plan.time import estimate_time

    topo = checked.topo
    memory = estimate_memory(cfg, topo, vocab_size=checked.vocab_size, seq_len=checked.seq_len)
    time = estimate_time(cfg, topo, hw, checked.vocab_size, checked.seq_len)
    index, _ = largest(memory, hw)
    report["layout"] = {
        "tp": topo.tp,
        "pp": topo.pp,
        "vpp": topo.vpp,
        "dp": topo.dp,
        "ep": topo.ep,
        "sequence_parallel": topo.sequence_parallel,
        "description": describe_layout(cfg, topo),
    }
    limit = hw.memory_bytes / (1 << 30)
    report["memory"] = {"ranks": _rank_rows(memory, hw), "largest": f"pp{index}", "limit_gib": limit}
    report["time"] = _time_report(time)
    problem = memory_problem(memory, hw, cfg, topo)
    if problem:
        report["ok"], report["errors"] = False, [problem]
        return report, 2
    return report, 0


def _search(cfg: DictConfig, hw: Any, checked: Any, report: dict[str, Any]) -> tuple[dict[str, Any], int]:
    from parallel.plan.search import search
    from pretrain.trainer.preflight import GiB, largest, resume_problem

    ranked, dropped = search(cfg, hw, checked.vocab_size, checked.seq_len, lambda c, t: resume_problem(c, t, checked))
    rows = []
    for i, r in enumerate(ranked, 1):
        index, rank = largest(r.memory, hw)
        layout = r.layout
        rows.append(
            {
                "rank": i,
                "tp": layout.tp,
                "pp": layout.pp,
                "vpp": layout.vpp,
                "dp": r.dp,
                "ep": layout.ep,
                "micro_batch": layout.micro_batch,
                "recompute": layout.recompute,
                "engine": layout.engine,
                "optimizer": layout.optimizer,
                "memory_gib": hw.needs(rank) / GiB,
                "largest_rank": f"pp{index}",
                "step_s": r.time.step_s,
                "tokens_per_s": r.time.tokens_per_s,
                "mfu": r.time.mfu,
                "overrides": layout.command_line(),
            }
        )
    report["search"] = {"world_size": hw.world_size, "listed": len(rows), "dropped": dict(dropped), "layouts": rows}
    if ranked:
        report["time"] = _time_report(ranked[0].time)
    if cfg.get("plot"):
        from parallel.plan.report import plot_search

        report["search"]["plot"] = plot_search(str(cfg.plot), rows, hw)
    if not rows:
        report["ok"] = False
        report["errors"] = [
            f"search: no layout of {hw.world_size} ranks passes the checks and fits {hw.memory_bytes / GiB:.1f} GiB "
            f"on {hw.name} ({', '.join(f'{v} {k}' for k, v in dropped.items())})"
        ]
        return report, 2
    return report, 0


def run(cfg: DictConfig, as_json: bool = False) -> int:
    """Print the plan of ``cfg`` (text, or one JSON object); returns the exit status."""
    from parallel.plan.report import render_text

    report, code = plan(cfg)
    if as_json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(render_text(report, top=int(cfg.get("top", 20))))
    for line in report["errors"]:
        print(f"error: {line}", file=sys.stderr, flush=True)
    return code


@hydra.main(version_base=None, config_path="../conf", config_name="plan")
def _hydra_main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        code = run(cfg, as_json=_as_json)
    if code:
        sys.exit(code)


def main() -> None:
    global _as_json
    args = sys.argv[1:]
    _as_json = JSON_FLAG in args
    sys.argv[1:] = [a for a in args if a != JSON_FLAG]
    check_group_choices(sys.argv[1:], config_name="plan")
    with exit_on_user_error():
        _hydra_main()


if __name__ == "__main__":
    main()
