"""A Llama-shaped decoder written in plain PyTorch: the bare reference for ``model=llama-tiny``.

Written the way litgpt / torchtitan's llama / Hugging Face's Llama write it: pre-norm blocks with
``torch.nn.RMSNorm``, one fused q/k/v ``nn.Linear`` (litgpt's ``qkv``), rotary embeddings in torch
(rotate-half convention; cos/sin computed once per forward for the sequence and shared by all
layers), grouped-query attention through ``F.scaled_dot_product_attention(is_causal=True,
enable_gqa=True)`` (k/v expanded instead where that torch lacks ``enable_gqa``), a SwiGLU MLP
(``w_down(silu(w_gate x) * w_up x)``), no biases and an untied output layer. Same dimensions and
parameter count as this project's megatron-core GPT built from the same preset, none of megatron-core.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hd, kv = self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.qkv(x).split((d, kv, kv), dim=-1)
        q = q.view(b, t, self.heads, hd).transpose(1, 2)  # [b, heads, t, hd]
        k = k.view(b, t, self.kv_heads, hd).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if _ENABLE_GQA:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # torchtitan's repeat_kv
            rep = self.heads // self.kv_heads
            k = k[:, :, None].expand(b, self.kv_heads, rep, t, hd).reshape(b, self.heads, t, hd)
            v = v[:, :, None].expand(b, self.kv_heads, rep, t, hd).reshape(b, self.heads, t, hd)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d, ffn, bias=False)
        self.w_up = nn.Linear(d, ffn, bias=False)
        self.w_down = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
        self.attn = Attention(d, heads, kv_heads)
        self.mlp = SwiGLU(d, ffn)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(
        self,
        vocab: int,
        seq_len: int,
        layers: int,
        d: int,
        heads: int,
        kv_heads: int,
        ffn: int,
        theta: float = 10000.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, kv_heads, ffn, eps) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=eps)
        self.lm_head = nn.Linear(d, vocab, bias=False)  # untied
        head_dim = d // heads
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / (2 * layers) ** 0.5 if name.endswith(("proj.weight", "w_down.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def rope(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(torch.arange(t, device=device, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [t, head_dim], rotate-half layout
        return emb.cos(), emb.sin()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope(idx.shape[1], idx.device)
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
