"""A Mixture-of-Experts decoder in plain PyTorch: the bare reference for ``model=moe-tiny``.

``llama_reference.py``'s decoder with each SwiGLU replaced the way a user writes a MoE layer
without a framework (Mixtral's / OLMoE's reference code, torchtitan's non-grouped path): a linear
router without bias, softmax over the top-k logits, tokens gathered once in expert order, each
expert's SwiGLU on its tokens (an ``nn.Linear`` pair per expert: ``[gate; up]`` and ``down``; slices of one 3-D
parameter would give every expert's backward a full-size gradient to accumulate), outputs
weighted and added back with ``index_add_``; the Switch load-balancing loss (weight 0.01) added to
the loss. Same dimensions and parameter count as this project's megatron-core GPT built from the
same preset, none of megatron-core.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.llama_reference import Attention, Llama


class MoE(nn.Module):
    def __init__(self, d: int, experts: int, topk: int, ffn: int, aux_coeff: float) -> None:
        super().__init__()
        self.experts, self.topk, self.aux_coeff = experts, topk, aux_coeff
        self.router = nn.Linear(d, experts, bias=False)
        self.gate_up = nn.ModuleList(nn.Linear(d, 2 * ffn, bias=False) for _ in range(experts))
        self.down = nn.ModuleList(nn.Linear(ffn, d, bias=False) for _ in range(experts))
        self.aux = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat).float()
        top, chosen = logits.topk(self.topk, dim=-1)
        weights = top.softmax(dim=-1).to(flat.dtype)  # renormalised over the k chosen
        per_expert = torch.bincount(chosen.flatten(), minlength=self.experts)
        # Switch: E * sum_i f_i P_i (f: share of the k assignments, P: mean router probability)
        fraction = per_expert.float() / chosen.numel()
        self.aux = self.aux_coeff * self.experts * (fraction * logits.softmax(dim=-1).mean(0)).sum()
        order = chosen.flatten().argsort()
        tokens = order // self.topk
        routed = flat.index_select(0, tokens).split(per_expert.tolist())  # one gather, sorted by expert
        outputs = []
        for e, rows in enumerate(routed):
            gate, up = self.gate_up[e](rows).chunk(2, dim=-1)
            outputs.append(self.down[e](F.silu(gate) * up))
        combined = torch.cat(outputs) * weights.flatten()[order, None]
        out = torch.zeros_like(flat).index_add_(0, tokens, combined)
        return out.view_as(x)


class MoEBlock(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, moe: MoE, eps: float) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
        self.attn = Attention(d, heads, kv_heads)
        self.mlp = moe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class MoELlama(Llama):
    def __init__(
        self,
        vocab: int,
        seq_len: int,
        layers: int,
        d: int,
        heads: int,
        kv_heads: int,
        experts: int,
        topk: int,
        ffn: int,
        theta: float = 10000.0,
        eps: float = 1e-5,
        aux_coeff: float = 0.01,
    ) -> None:
        super().__init__(vocab, seq_len, layers, d, heads, kv_heads, ffn, theta, eps)
        self.blocks = nn.ModuleList(
            MoEBlock(d, heads, kv_heads, MoE(d, experts, topk, ffn, aux_coeff), eps) for _ in range(layers)
        )
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = 0.02 / (2 * layers) ** 0.5 if name.endswith("proj.weight") or ".down." in name else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = super().forward(idx, targets)
        return loss + sum(block.mlp.aux for block in self.blocks)
