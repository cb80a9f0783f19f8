"""The simulated human: MetaWorld's scripted expert policies, with a configurable style.
(One replaced: reach-v3's, see _TcpReachPolicy.)

A real teleoperator is neither perfectly precise nor perfectly fast. `ScriptedExpert` adds
Gaussian action noise and a speed factor on the motion part of the action, so demonstrations
and corrections can be made as clean or as sloppy as an experiment needs. The gating rule
compares the robot against the expert's *intended* (clean) action, while the executed action
carries the style -- like a person who knows what to do but does it imperfectly.

The scripted policies read only the 39-d state vector, so the expert works from exactly the
`Observation.state` a robot reports -- no access to simulator internals.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from fleetloop.actor.sim.env import ACTION_DIM
from fleetloop.actor.sim.tasks import TaskSpec, get_task, task_for_instruction
from fleetloop.policy.interface import Observation


@dataclass(frozen=True)
class ExpertStyle:
    noise_std: float = 0.0  # std of Gaussian noise added to every action dimension
    speed: float = 1.0      # scale on (dx, dy, dz): <1 a slower, more careful operator

    def __post_init__(self):
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if not 0 < self.speed <= 1:
            raise ValueError(f"speed must be in (0, 1], got {self.speed}")


# The gripper's tool centre point (between the finger pads) sits this far below the hand
# position reported in the state vector (measured: constant to a millimetre).
_TCP_BELOW_HAND = 0.045


class _TcpReachPolicy:
    """reach-v3 expert that brings the TCP, not the hand, to the goal. MetaWorld's reach policy
    steers the hand onto the goal, but success is judged at the TCP (within 5 cm), which is then
    4.5 cm away: its demonstrations end on the success boundary, and a correction that starts
    from a slightly different posture can hover at 5.5 cm for the rest of the episode. Aiming
    the TCP gives demonstrations with margin (and faster ones: the gain is higher too)."""

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        hand, goal = obs[:3], obs[-3:]
        target = goal + np.array([0.0, 0.0, _TCP_BELOW_HAND])
        return np.append(10.0 * (target - hand), 0.0).astype(np.float32)


_OVERRIDES = {"reach-v3": _TcpReachPolicy}


def _scripted_policy(task: str):
    from metaworld.policies import ENV_POLICY_MAP

    if task in _OVERRIDES:
        return _OVERRIDES[task]()
    try:
        return ENV_POLICY_MAP[task]()
    except KeyError:
        raise ValueError(f"MetaWorld has no scripted policy for {task!r}") from None


class ScriptedExpert:
    """The expert for one task. `clean_action` is deterministic; `action` applies the style
    with the expert's own generator (re-seed per episode with `reset(seed)` for reproducible
    demonstrations)."""

    def __init__(self, task: str | TaskSpec, style: ExpertStyle = ExpertStyle(), seed: Optional[int] = None):
        self.spec = task if isinstance(task, TaskSpec) else get_task(task)
        self.style = style
        self._policy = _scripted_policy(self.spec.name)
        self._rng = np.random.default_rng(seed)

    def reset(self, seed: Optional[int] = None) -> None:
        self._rng = np.random.default_rng(seed)

    def clean_action(self, state: np.ndarray) -> np.ndarray:
        """What the expert means to do in this state: float32 [4] in [-1, 1]."""
        with warnings.catch_warnings():
            # The scripted policies warn whenever their gain saturates; clipping handles that.
            warnings.simplefilter("ignore", UserWarning)
            raw = self._policy.get_action(np.asarray(state, dtype=np.float64))
        return np.clip(np.asarray(raw, dtype=np.float32), -1.0, 1.0)

    def styled(self, clean: np.ndarray) -> np.ndarray:
        """The action the expert actually executes, given its intended one."""
        action = clean.astype(np.float32, copy=True)
        action[:3] *= self.style.speed
        if self.style.noise_std > 0:
            action += self._rng.normal(0.0, self.style.noise_std, size=action.shape).astype(np.float32)
        return np.clip(action, -1.0, 1.0)

    def action(self, state: np.ndarray) -> np.ndarray:
        return self.styled(self.clean_action(state))


class ExpertPolicy:
    """The scripted expert behind fleetloop's `Policy` protocol (chunks of one action), for
    collection, `fleetloop eval --policy expert`, and tests. Multi-task: the instruction picks
    the task, as it does for the VLA."""

    version = "expert"
    horizon = 1
    action_dim = ACTION_DIM

    def __init__(self, style: ExpertStyle = ExpertStyle(), seed: Optional[int] = None):
        self.style = style
        self._seed = seed
        self._experts: dict[str, ScriptedExpert] = {}

    def expert_for(self, instruction: str) -> ScriptedExpert:
        spec = task_for_instruction(instruction)
        if spec.name not in self._experts:
            self._experts[spec.name] = ScriptedExpert(spec, self.style, seed=self._seed)
        return self._experts[spec.name]

    def act(self, obs: Observation, instruction: str, indicator: Optional[bool] = None) -> np.ndarray:
        return self.expert_for(instruction).action(obs.state)[None, :]
