"""``gpt-plan``: know before launch whether a layout fits and how fast it will run.

It takes gpt-pretrain's config (the same groups and keys) and a ``hardware`` preset, runs every
check gpt-pretrain makes before launch (``pretrain/trainer/preflight.py``), then estimates per-rank memory
(``parallel/plan/memory.py``) and step time (``parallel/plan/time.py``) at ``hardware.gpus_per_node x
hardware.nodes`` ranks, without building a model or a process group. ``search=true`` ranks every
layout of that world size (``parallel/plan/search.py``). ``--json`` prints one JSON object instead
of text (Hydra would take it for an override: it is taken off the command line first, as
``--config-dir`` is checked before Hydra starts). Exit status 2 when a check fails or the layout
does not fit, each reason one ``error:`` line; the report still says what it can, since a bare
refusal answers nothing: the header (model, hardware, precision, global batch), the memory (at the
nearest layout that passes when only the global batch or data streams fail) and what to try
(``parallel/plan/advice.py``). On a GPU it plans in bf16 unless ``train.bf16`` is given.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from typing import Any

import hydra
from omegaconf import DictConfig

from conf.cli import check_group_choices, exit_on_user_error

JSON_FLAG = "--json"
_as_json = False  # set by main() from the command line


def _hardware(cfg: DictConfig, rates: bool) -> Any:
    """``hardware.*`` resolved (typed here: gpt-plan needs the world size before the other checks)."""
    from omegaconf import OmegaConf

    from conf.schema import typed_group
    from parallel.plan.hardware import resolve

    hardware = typed_group("hardware", OmegaConf.to_container(cfg.hardware, resolve=True))
    return resolve(hardware, bool(cfg.train.bf16), rates=rates)


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


def plan(cfg: DictConfig, command_line: Sequence[str] = ()) -> tuple[dict[str, Any], int]:
    """The report gpt-plan prints, and its exit status. ``command_line``: the overrides the user gave
    (what they set explicitly: only an explicit ``train.bf16`` overrides the GPU's bf16)."""
    from conf.schema import check_plan

    check_plan(cfg)  # gpt-plan's own keys (not among gpt-pretrain's checks): one line, before torch is imported
    from parallel.plan.advice import precision, set_on_command_line
    from pretrain.trainer.preflight import run_checks

    search = bool(cfg.search)  # PlanRoot's keys, checked by check_plan
    if cfg.plot and not search:
        from conf.errors import UserError

        raise UserError(f"plot={cfg.plot}: the plot shows a search; add search=true")
    explicit = set_on_command_line(command_line)
    sized = _hardware(cfg, rates=False)  # the world size; rates are measured only if the checks pass
    chosen = precision(bool(cfg.train.bf16), "train.bf16" in explicit, sized.asynchronous)
    if chosen.bf16 != bool(cfg.train.bf16):  # planned in bf16 on a GPU (gpt-pretrain's default stays)
        cfg = copy.deepcopy(cfg)
        cfg.train.bf16 = chosen.bf16
        sized = _hardware(cfg, rates=False)
    checked = run_checks(cfg, sized.world_size, layout=not search)
    failed = bool(checked.errors)
    hw = sized if failed else _hardware(cfg, rates=True)
    report: dict[str, Any] = {
        "ok": not failed,
        "errors": list(checked.errors),
        "checks": [{"name": n, "detail": d} for n, d in checked.passed],
        "hardware": _hardware_report(hw, rates=not failed),
        "precision": chosen.as_dict(),
        "model": _model_report(cfg, checked),
    }
    if checked.groups is None:  # the config check failed: no layout to size
        return report, 2
    if search:
        report["global_batch"] = _batch_origin(checked, hw, explicit, hw.world_size)
        return (report, 2) if failed else _search(cfg, hw, checked, report)
    return _at_layout(hw, checked, report, explicit)


def _hardware_report(hw: Any, rates: bool) -> dict[str, Any]:
    """The device; its rates only when resolved (a CPU's are measured, and only once the checks pass)."""
    out = {
        "name": hw.name,
        "description": hw.describe(rates=rates),
        "world_size": hw.world_size,
        "gpus_per_node": hw.gpus_per_node,
        "nodes": hw.nodes,
        "memory_gib": hw.memory_bytes / (1 << 30),
    }
    if rates:
        out["peak_tflops"] = hw.peak_flops / 1e12
        out["matmul_efficiency"] = None if hw.probe else hw.matmul_efficiency
        out["measured"] = dict(hw.measured)
    return out


def _model_report(cfg: DictConfig, checked: Any) -> dict[str, Any]:
    """The model's size: from the validated config, else from the model group alone (a failing
    train or parallel key still leaves a model to size); ``params`` None when the shape itself fails."""
    from omegaconf import OmegaConf

    from conf.errors import UserError
    from conf.schema import typed_group
    from parallel.plan.params import Shape, total_params

    model = checked.groups.model if checked.groups is not None else None
    if model is None:
        try:
            model = typed_group("model", OmegaConf.to_container(cfg.model, resolve=True))
            model.check()
        except UserError:
            return {"name": str(cfg.model.get("name")), "params": None, "seq_len": checked.seq_len}
    shape = Shape.from_config(model, checked.vocab_size)
    return {
        "name": model.name,
        "params": total_params(shape),
        "vocab_size": checked.vocab_size,
        "padded_vocab": shape.vocab,
        "seq_len": checked.seq_len,
    }


def _batch_origin(checked: Any, hw: Any, explicit: set[str], unit: int) -> dict[str, Any]:
    from parallel.plan.advice import global_batch_origin

    return global_batch_origin(checked.groups, explicit, checked.seq_len, hw.asynchronous, unit)


def _at_layout(hw: Any, checked: Any, report: dict[str, Any], explicit: set[str]) -> tuple[dict[str, Any], int]:
    """Memory at the config's layout (or, when only its global batch or data streams fail, at the
    nearest values that divide, said so), step time when every check passed, and the fix when the
    layout failed."""
    from parallel.plan.advice import divides, layout_fix, nearby_run
    from parallel.plan.memory import estimate_memory
    from pretrain.trainer.preflight import describe_layout, largest, memory_problem

    groups, world, passed = checked.groups, hw.world_size, not report["errors"]
    needs = divides(groups, world)  # the global batch first
    report["global_batch"] = _batch_origin(checked, hw, explicit, needs[0].step if needs else world)
    planned, estimated_at = checked.planned, None
    if planned is None:  # the layout check failed
        report["suggestion"] = layout_fix(groups, world)
        planned = nearby_run(groups, world)
        if planned is not None:
            estimated_at = " ".join(report["suggestion"]["overrides"])
    if planned is not None:
        topo = planned.layout
        memory = estimate_memory(planned, topo, vocab_size=checked.vocab_size, seq_len=checked.seq_len)
        report["layout"] = {
            "tp": topo.tp,
            "pp": topo.pp,
            "vpp": topo.vpp,
            "dp": topo.dp,
            "ep": topo.ep,
            "sequence_parallel": topo.sequence_parallel,
            "global_batch": planned.train.global_batch,
            "micro_batch": planned.train.micro_batch,
            "accumulation": planned.micro_batches,
            "description": describe_layout(planned),
        }
        index, _ = largest(memory, hw)
        report["memory"] = {
            "ranks": _rank_rows(memory, hw),
            "largest": f"pp{index}",
            "limit_gib": hw.memory_bytes / (1 << 30),
            "estimated_at": estimated_at,
        }
        if passed:  # the rates are resolved (measured on a CPU) only then
            from parallel.plan.time import estimate_time

            time = estimate_time(planned, topo, hw, checked.vocab_size, checked.seq_len)
            report["time"] = _time_report(time)
        problem = memory_problem(memory, hw, planned)
        if problem:
            report["errors"].append(problem)
    report["ok"] = not report["errors"]
    return report, 2 if report["errors"] else 0


def _search(cfg: DictConfig, hw: Any, checked: Any, report: dict[str, Any]) -> tuple[dict[str, Any], int]:
    from parallel.plan.advice import unreachable_dp
    from parallel.plan.search import search
    from pretrain.trainer.preflight import GiB, largest, resume_problem

    compatible = lambda run: resume_problem(run, checked)  # noqa: E731
    ranked, dropped = search(checked.groups, hw, checked.vocab_size, checked.seq_len, compatible)
    global_batch = int(checked.groups.train.global_batch)  # the search keeps it: the optimisation stays the config's
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
                "global_batch": global_batch,
                "ep": layout.ep,
                "micro_batch": layout.micro_batch,
                "accumulation": global_batch // (layout.micro_batch * r.dp),
                "recompute": layout.recompute,
                "engine": layout.engine,
                "optimizer": layout.optimizer,
                "memory_gib": hw.needs(rank) / GiB,
                "largest_rank": f"pp{index}",
                "step_s": r.time.step_s,
                "tokens_per_s": r.time.tokens_per_s,
                "mfu": r.time.mfu,
                "overrides": f"train.global_batch={global_batch} {layout.command_line()}",
            }
        )
    report["search"] = {
        "world_size": hw.world_size,
        "global_batch": global_batch,
        "unreachable_dp": unreachable_dp(checked.groups, hw.world_size),
        "listed": len(rows),
        "dropped": dict(dropped),
        "layouts": rows,
    }
    if ranked:
        report["time"] = _time_report(ranked[0].time)
    if cfg.plot:
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


def run(cfg: DictConfig, as_json: bool = False, command_line: Sequence[str] = ()) -> int:
    """Print the plan of ``cfg`` (text, or one JSON object); returns the exit status. ``command_line``:
    the overrides as given (Hydra's list under ``gpt-plan``), to tell a key set from its default."""
    from parallel.plan.report import render_text

    report, code = plan(cfg, command_line)
    if as_json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(render_text(report, top=int(cfg.top)))
    for line in report["errors"]:
        print(f"error: {line}", file=sys.stderr, flush=True)
    return code


@hydra.main(version_base=None, config_path="../conf", config_name="plan")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    with exit_on_user_error():
        code = run(cfg, as_json=_as_json, command_line=list(HydraConfig.get().overrides.task))
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
