"""The action expert (pi0 / SmolVLA style): a small transformer over [state token] + H action tokens
whose layers self-attend among those tokens and cross-attend to the backbone's prefix.

Each expert layer l reads the backbone hidden states of one chosen decoder layer, through its own
LayerNorm and K/V projections. Those K/V depend only on the prefix, so sample_actions computes them
once per chunk (prefix_kv) and reuses them across all Euler steps; only the expert runs per step."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_time(tau: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """pi0's sinusoidal embedding of tau in [0, 1]: periods geometric from min to max period.
    emb = [sin(2 pi tau / p_k), cos(2 pi tau / p_k)]_k  -> [B, dim]"""
    frac = torch.linspace(0.0, 1.0, dim // 2, device=tau.device, dtype=torch.float32)
    period = min_period * (max_period / min_period) ** frac
    ang = 2 * math.pi * tau.float()[:, None] / period[None, :]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        assert dim % heads == 0, f"expert width {dim} not divisible by heads {heads}"
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim or dim, dim)
        self.v_proj = nn.Linear(kv_dim or dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, W] -> [B, heads, L, head_dim]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def kv(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(self.k_proj(src)), self._split(self.v_proj(src))

    def forward(self, x, k, v, mask):
        """softmax(q k^T / sqrt(d) + mask) v; mask is boolean, True = may attend."""
        q = self._split(self.q_proj(x))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class ExpertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.kv_norm = nn.LayerNorm(kv_dim)  # backbone hidden states have layer-dependent scales
        self.cross_attn = Attention(dim, heads, kv_dim)
        self.norm3 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def prefix_kv(self, h: torch.Tensor):
        return self.cross_attn.kv(self.kv_norm(h))

    def forward(self, x, kv, self_mask, cross_mask):
        h = self.norm1(x)
        x = x + self.self_attn(h, *self.self_attn.kv(h), self_mask)
        x = x + self.cross_attn(self.norm2(x), kv[0], kv[1], cross_mask)
        return x + self.down_proj(F.gelu(self.up_proj(self.norm3(x))))


class ActionExpert(nn.Module):
    """v_theta(x_tau, tau, state, prefix) -> velocity [B, H, A] (all in normalised action space)."""

    def __init__(self, state_dim: int, action_dim: int, horizon: int, width: int, layers: int, heads: int,
                 kv_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.horizon, self.width = horizon, width
        self.state_proj = nn.Linear(state_dim, width)
        # pi0: action token = MLP([W_a x_tau ; sincos(tau)])
        self.action_in = nn.Linear(action_dim, width)
        self.time_mlp_in = nn.Linear(2 * width, width)
        self.time_mlp_out = nn.Linear(width, width)
        self.pos = nn.Parameter(torch.randn(1 + horizon, width) * 0.02)  # attention alone is order-blind
        self.layers = nn.ModuleList([ExpertLayer(width, heads, kv_dim, mlp_ratio) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.action_out = nn.Linear(width, action_dim)
        # Block-causal as pi0: the state token sees only itself; action tokens see state + all actions.
        m = torch.ones(1 + horizon, 1 + horizon, dtype=torch.bool)
        m[0, 1:] = False
        self.register_buffer("self_mask", m, persistent=False)

    def prefix_kv(self, hiddens: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (K, V) per expert layer, from the backbone hidden states chosen for it."""
        return [layer.prefix_kv(h) for layer, h in zip(self.layers, hiddens)]

    def forward(self, state_n, x_tau, tau, kvs, prefix_mask):
        """state_n [B,S], x_tau [B,H,A], tau [B], kvs from prefix_kv, prefix_mask [B,L] bool."""
        b = x_tau.shape[0]
        t = sincos_time(tau, self.width)[:, None, :].expand(b, self.horizon, self.width)
        a = self.time_mlp_out(F.silu(self.time_mlp_in(torch.cat([self.action_in(x_tau), t], dim=-1))))
        x = torch.cat([self.state_proj(state_n)[:, None, :], a], dim=1) + self.pos
        cross_mask = prefix_mask[:, None, None, :]  # [B, 1, 1, L]: padding never attended
        for layer, kv in zip(self.layers, kvs):
            x = layer(x, kv, self.self_mask, cross_mask)
        return self.action_out(self.norm(x[:, 1:]))
