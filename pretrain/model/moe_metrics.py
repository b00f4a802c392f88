"""What a MoE user watches, per optimizer step: the router's auxiliary losses and how evenly the
experts are loaded (``metrics.jsonl`` keys ``moe/*``).

The losses are megatron-core's own (its router records each layer's load-balancing and z-loss
terms in ``moe_utils``' tracker while the loss the Trainer optimises carries them). The load
(tokens each expert received, after any capacity dropping) is read from the routers' outputs by
a forward hook. Both are reduced so that every layout of the same run reports the same numbers:
a layer's terms are summed over pipeline stages (each layer lives on one), over tensor-parallel
ranks where each holds a slice of the sequence and a share of the loss, and averaged over
data-parallel ranks; token counts are summed over all ranks (each (dp, tp) rank routes
different tokens), then divided by the micro-batches each rank ran.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.moe.router import TopKRouter

from conf.moe import moe_layer_pattern

# megatron's tracker names, and how a layer's value combines over tensor-parallel ranks: the
# load-balancing terms are each rank's share of the loss (summed), the z-loss a mean over its tokens
TERMS = {"load_balancing_loss": "sum", "seq_load_balancing_loss": "sum", "z_loss": "mean"}


class RouterStats:
    """Per-step MoE metrics of one model (all its chunks); :meth:`collect` is a collective."""

    def __init__(self, model_cfg: Any) -> None:
        self.pattern = moe_layer_pattern(model_cfg)
        self.experts, self.topk = int(model_cfg.num_experts), int(model_cfg.moe_topk)
        self.dropping = model_cfg.moe_capacity_factor is not None
        layers = len(self.pattern)
        self.load = torch.zeros(layers, self.experts, dtype=torch.float64)
        self.tokens = torch.zeros(layers, dtype=torch.float64)
        self.terms = [name for name, on in self._enabled(model_cfg).items() if on]

    @staticmethod
    def _enabled(m: Any) -> dict[str, bool]:
        balancing = str(m.moe_load_balancing)
        weight = float(m.moe_aux_loss_coeff) > 0
        return {
            "load_balancing_loss": balancing == "aux_loss" and weight,
            "seq_load_balancing_loss": balancing == "seq_aux_loss" and weight,
            "z_loss": float(m.moe_z_loss_coeff) > 0,
        }

    def attach(self, model: torch.nn.Module) -> None:
        """Count each router's assignments in training forwards (not in evaluation, nor twice
        under activation recomputation: the first forward of a recomputed layer runs without grad)."""
        for module in model.modules():
            if isinstance(module, TopKRouter):
                module.register_forward_hook(self._count)

    def _count(self, module: TopKRouter, _inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        if not (module.training and torch.is_grad_enabled()) or module.layer_number is None:
            return
        routing_map = output[1]
        row = module.layer_number - 1
        self.load[row] += routing_map.sum(0).to(self.load.device, torch.float64)
        self.tokens[row] += routing_map.shape[0]

    def collect(self, micro_batches: int) -> dict[str, Any]:
        """This step's metrics (the same on every rank), then zero the counts for the next step."""
        rows = [i for i, moe in enumerate(self.pattern) if moe]
        values = {}
        for name in self.terms:
            values[name] = _reduced_term(name, len(self.pattern)) / micro_batches
        clear_aux_losses_tracker()
        load, tokens = self.load, self.tokens
        if dist.is_initialized() and dist.get_world_size() > 1:
            both = torch.cat([load, tokens[:, None]], dim=1)
            dist.all_reduce(both)
            load, tokens = both[:, :-1], both[:, -1]
        load, tokens = load[rows], tokens[rows]
        self.load.zero_()
        self.tokens.zero_()
        record: dict[str, Any] = {f"moe/{name}": float(v[rows].mean()) for name, v in values.items()}
        mean = load.mean(dim=1).clamp(min=1e-12)
        ratio, cv = load.max(dim=1).values / mean, load.std(dim=1, correction=0) / mean
        record["moe/load_max_over_mean"] = float(ratio.max())  # the worst layer: 1.0 is perfectly even
        record["moe/load_cv"] = float(cv.mean())  # std / mean of the tokens per expert, averaged over layers
        record.update({f"moe/load_cv/layer{i + 1}": float(x) for i, x in zip(rows, cv, strict=True)})
        if self.dropping:
            record["moe/dropped_fraction"] = float(1 - load.sum() / (tokens.sum() * self.topk).clamp(min=1))
        return record


def _reduced_term(name: str, layers: int) -> torch.Tensor:
    """megatron's tracker entry ``name`` ([layers], summed over this rank's micro-batches), reduced
    as the module docstring says; zeros where this rank recorded none (a stage without MoE layers
    still joins the collectives)."""
    entry = get_moe_layer_wise_logging_tracker().get(name)
    values = torch.zeros(layers) if entry is None else entry["values"].detach().clone().float()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(values, group=parallel_state.get_tensor_model_parallel_group())
        if TERMS[name] == "mean":
            values /= parallel_state.get_tensor_model_parallel_world_size()
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= parallel_state.get_data_parallel_world_size()
    return values
