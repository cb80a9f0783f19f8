"""RECAP's distributional value function, and the return/advantage arithmetic around it.

Rewards (pi*0.6): r_t = -1 per step; the last step instead gets 0 on success, -C_fail on failure.
Episode of T frames (t = 0..T-1):
    r_t = -1 (t < T-1),   r_{T-1} = 0 (success) | -C_fail (failure)
    R_t = sum_{t' >= t} r_t' = -(T-1-t) - C_fail * [failure]        (minus the steps to go)
Normalised per task into [-1, 0] by Z = L + C_fail, L = the task's longest episode and
C_fail = c_fail * L (c_fail = 1: a failure costs one more episode length), so any failure
scores below any success.

Value: V(o, l) = sum_b p_b(o, l) * v_b with B = 201 bins v_b = -1 + b / 200 over [-1, 0],
trained by cross-entropy against the two-hot encoding of R_t (the two bins around R_t, weighted
so their mean is exactly R_t; a one-hot target would lose up to half a bin).

N-step advantage (post-training, N = 50):
    A_t = sum_{t'=t}^{t+N-1} r_t' + V(o_{t+N}) - V(o_t),   V(o_{t+N}) = 0 past the episode end.

The net shares nothing with the policy: proprio state (MetaWorld's includes object and goal
positions) + the instruction embedding -> MLP -> 201 logits. So it runs where the frame index
lives (the replay actor, CPU, no image fetches) and its training cannot disturb the policy's
features. A robot whose state lacks the scene would need a vision input here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def step_rewards(num_steps: int, success: bool, c_fail: float) -> np.ndarray:
    """Unnormalised r_t, float64 [T]. c_fail here is the absolute penalty C_fail."""
    r = -np.ones(num_steps, np.float64)
    if num_steps:
        r[-1] = 0.0 if success else -c_fail
    return r


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """R_t = sum_{t' >= t} r_t' (undiscounted)."""
    return np.cumsum(rewards[::-1])[::-1].copy()


def n_step_advantage(rewards: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """A_t = sum_{t'=t}^{min(t+N,T)-1} r_t' + V_{t+N} [t+N < T] - V_t, float64 [T]."""
    t_len = len(rewards)
    c = np.concatenate([[0.0], np.cumsum(rewards)])          # c[k] = sum_{t' < k} r_t'
    t = np.arange(t_len)
    end = np.minimum(t + n, t_len)
    boot = np.where(t + n < t_len, values[np.minimum(t + n, t_len - 1)], 0.0)
    return c[end] - c[t] + boot - values


def bin_values(num_bins: int) -> np.ndarray:
    return np.linspace(-1.0, 0.0, num_bins)


def two_hot(values: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[N] in [-1, 0] -> [N, B] probabilities on the two bins around each value (mean exact)."""
    x = (values.clamp(-1.0, 0.0) + 1.0) * (num_bins - 1)       # position in bin units
    lo = x.floor().long().clamp(0, num_bins - 1)
    hi = (lo + 1).clamp(max=num_bins - 1)
    frac = x - lo.float()
    out = torch.zeros(len(values), num_bins, dtype=torch.float32, device=values.device)
    out.scatter_add_(1, lo[:, None], (1.0 - frac)[:, None])
    out.scatter_add_(1, hi[:, None], frac[:, None])
    return out


@dataclass
class ValueConfig:
    state_dim: int = 39
    lang_dim: int = 384
    hidden: int = 256
    bins: int = 201


class ValueNet(nn.Module):
    def __init__(self, cfg: ValueConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("state_mean", torch.zeros(cfg.state_dim))
        self.register_buffer("state_std", torch.ones(cfg.state_dim))
        self.register_buffer("support", torch.as_tensor(bin_values(cfg.bins), dtype=torch.float32))
        self.state_proj = nn.Linear(cfg.state_dim, cfg.hidden)
        self.lang_proj = nn.Linear(cfg.lang_dim, cfg.hidden)
        self.mlp = nn.Sequential(nn.LayerNorm(cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(),
                                 nn.Linear(cfg.hidden, cfg.bins))

    def logits(self, state: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        s = ((state - self.state_mean) / self.state_std).clamp(-10, 10)
        return self.mlp(self.state_proj(s) + self.lang_proj(lang))

    def value(self, state: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        """V = sum_b softmax(logits)_b * v_b, in [-1, 0]."""
        return (self.logits(state, lang).softmax(-1) * self.support).sum(-1)


class ValueFunction:
    """ValueNet + its optimiser; numpy in, numpy out."""

    def __init__(self, cfg: ValueConfig, lr: float = 1e-3, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.net = ValueNet(cfg)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=1e-4)
        self.rng = np.random.default_rng(seed)
        self.steps = 0
        self.last_loss: float | None = None

    def set_state_stats(self, states: np.ndarray) -> None:
        with torch.no_grad():
            self.net.state_mean.copy_(torch.as_tensor(states.mean(0), dtype=torch.float32))
            self.net.state_std.copy_(torch.as_tensor(states.std(0), dtype=torch.float32).clamp_min(1e-2))

    def train(self, states: np.ndarray, lang_table: np.ndarray, lang_idx: np.ndarray, targets: np.ndarray,
              steps: int, batch_size: int = 256) -> float:
        """Cross-entropy against two-hot targets of the normalised returns, on uniform minibatches
        of frames (lang_table[lang_idx[i]] is frame i's instruction embedding). Returns the mean loss."""
        self.net.train()
        s_all = torch.as_tensor(states, dtype=torch.float32)
        table = torch.as_tensor(lang_table, dtype=torch.float32)
        li = torch.as_tensor(lang_idx, dtype=torch.long)
        y_all = torch.as_tensor(targets, dtype=torch.float32)
        total = 0.0
        for _ in range(steps):
            i = torch.as_tensor(self.rng.integers(0, len(s_all), size=min(batch_size, len(s_all))))
            logp = F.log_softmax(self.net.logits(s_all[i], table[li[i]]), -1)
            loss = -(two_hot(y_all[i], self.cfg.bins) * logp).sum(-1).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.item()
            self.steps += 1
        self.last_loss = total / max(1, steps)
        return self.last_loss

    @torch.no_grad()
    def predict(self, states: np.ndarray, lang: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        self.net.eval()
        s = torch.as_tensor(np.array(states, np.float32))   # copies: inputs may be read-only views
        lg = torch.as_tensor(np.array(lang, np.float32))
        if lg.ndim == 1:
            lg = lg.expand(len(s), -1)
        out = [self.net.value(s[i:i + batch_size], lg[i:i + batch_size]) for i in range(0, len(s), batch_size)]
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        tensors = {f"value.{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        return {"config": asdict(self.cfg), "steps": self.steps, "last_loss": self.last_loss}, tensors

    def load_state(self, meta: dict, tensors: dict[str, np.ndarray]) -> None:
        sd = {k[len("value."):]: torch.as_tensor(v) for k, v in tensors.items() if k.startswith("value.")}
        self.net.load_state_dict(sd, strict=True)
        self.steps = int(meta.get("steps", 0))
        self.last_loss = meta.get("last_loss")
