"""The policy interface: what the actor runs and the learner improves.

The robot side only ever calls `act`. Any policy that implements this Protocol -- fleetloop's
own VLA (fleetloop.policy.model), a scripted expert, or a wrapper around another project's
policy given local weights -- can be dropped in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import numpy as np


@dataclass
class Observation:
    images: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> HxWx3 uint8
    state: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [S] float32


@runtime_checkable
class Policy(Protocol):
    version: str      # the policy version that produced an action (recorded on every episode)
    horizon: int      # H: actions per chunk
    action_dim: int   # A

    def act(self, obs: Observation, instruction: str, indicator: Optional[bool] = None) -> np.ndarray:
        """Return an action chunk, float32 [H, A]. `indicator` is RECAP's improvement
        indicator (True = "advantage positive"); None leaves it unset."""
        ...
