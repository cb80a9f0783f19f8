"""Optimisation helpers shared by pretraining and the online learner."""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from fleetloop.policy.backend import PolicyModel


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a torch Generator for batch sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_optimizer(net: PolicyModel, lr: float = 1e-3, weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (the usual split)."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def lr_factor(step: int, total: int, warmup: int = 100, floor: float = 0.1) -> float:
    """Linear warmup then cosine decay to `floor` x the base rate. total <= 0: constant after warmup
    (the online learner trains open-ended)."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= 0:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(net: PolicyModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               grad_clip: float = 1.0) -> dict[str, float]:
    """One gradient step on net.loss(batch); returns its metrics plus the gradient norm."""
    net.train()
    loss, metrics = net.loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(net.trainable_parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    metrics["grad_norm"] = float(gn)
    return metrics
