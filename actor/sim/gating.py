"""HG-DAgger gating: when the simulated human takes over from the robot, and when it hands back.

In HG-DAgger (Kelly et al. 2019) the expert watches the novice and grabs control when the
robot leaves the region the expert considers safe, drives it back, and returns control once
things look right again. Only the expert-driven segments become training labels, so *when*
the gate fires decides what data the learner gets. A simulated human cannot judge "safe" the
way a person does; these observable proxies stand in for it:

  drift             the robot's proposed action differs from what the expert would do by more
                    than `drift_threshold` (L2 over the 4-d action) for `drift_steps` steps in a
                    row -- the robot is heading somewhere the expert would not go;
  stall             for `stall_steps` steps task progress has not improved by `stall_eps` AND
                    over those steps the robot's proposals have, on average, not matched the
                    expert's (mean L2 > `agree_threshold`) -- it hovers, creeps the wrong way
                    or dithers with small actions that never add up to a drift. Progress alone
                    is not enough: MetaWorld's shaped progress is flat for long stretches of a
                    good trajectory (lifting over a handle, going around a window), and a human
                    does not grab a robot that is doing what they would do;
  operator-request  an operator asked for a takeover (dashboard / robot link); always honoured.

Hand-back: after the human has driven at least `min_human_steps`, control returns as soon as
the robot's own proposal has agreed with the expert (L2 <= `agree_threshold`) for
`agree_steps` consecutive steps -- it is back on track and would do the right thing.

Style knobs: `takeover_prob` (an attentive operator reacts to every trigger; a distracted one
misses some), `max_interventions` per episode (people stop correcting at some point; operator
requests are exempt), and the thresholds themselves.

The gate is a pure decision rule over actions and a progress number, so it runs unchanged
against a real robot's stream; `SimTeleoperator` pairs it with the scripted expert.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from fleetloop.actor.sim.expert import ScriptedExpert
from fleetloop.policy.interface import Observation

DRIFT = "drift"
STALL = "stall"
OPERATOR_REQUEST = "operator-request"
REASONS = (DRIFT, STALL, OPERATOR_REQUEST)


@dataclass(frozen=True)
class GatingConfig:
    drift_threshold: float = 0.6      # L2 action distance that counts as drifting
    drift_steps: int = 4              # k: consecutive drifting steps before taking over
    stall_steps: Optional[int] = 30   # m: steps without progress (and off the expert) (None: off)
    stall_eps: float = 0.005          # progress (in [0, 1]) must beat its best by this much
    agree_threshold: float = 0.3      # L2 action distance that counts as agreeing
    agree_steps: int = 3              # j: consecutive agreeing steps before handing back
    min_human_steps: int = 10         # n: the human drives at least this long per takeover
    max_human_steps: Optional[int] = None  # hand back after this many regardless (None: never)
    max_interventions: Optional[int] = 5   # automatic takeovers per episode (None: unlimited)
    takeover_prob: float = 1.0        # chance the human reacts when a rule fires
    operator: str = "sim-expert"      # recorded on every segment

    def __post_init__(self):
        if self.drift_steps < 1 or self.agree_steps < 1 or self.min_human_steps < 1:
            raise ValueError("drift_steps, agree_steps and min_human_steps must be >= 1")
        if self.stall_steps is not None and self.stall_steps < 1:
            raise ValueError("stall_steps must be >= 1 or None")
        if not 0.0 <= self.takeover_prob <= 1.0:
            raise ValueError(f"takeover_prob must be in [0, 1], got {self.takeover_prob}")
        if self.agree_threshold > self.drift_threshold:
            # Otherwise the robot could be handed control while still "drifting".
            raise ValueError("agree_threshold must not exceed drift_threshold")

    @classmethod
    def style(cls, name: str, **overrides) -> "GatingConfig":
        """Named operator styles: "attentive" (the defaults), "strict" (steps in early, drives
        longer, never gives up: more, longer corrections) and "relaxed" (tolerates more, misses
        some triggers, gives up after two takeovers: fewer corrections)."""
        styles = {
            "attentive": {},
            "strict": dict(drift_threshold=0.4, drift_steps=2, stall_steps=20, agree_threshold=0.25,
                           agree_steps=5, min_human_steps=15, max_interventions=None),
            "relaxed": dict(drift_threshold=0.9, drift_steps=8, stall_steps=45, takeover_prob=0.7,
                            max_interventions=2),
        }
        if name not in styles:
            raise ValueError(f"unknown operator style {name!r}: choose from {sorted(styles)}")
        return cls(**{**styles[name], **overrides})


@dataclass(frozen=True)
class Segment:
    """Human-driven steps [start, end) of one episode, and why the human took over."""
    start: int
    end: int
    reason: str
    operator: str

    @property
    def steps(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class GateDecision:
    human: bool                     # the human drives this step
    takeover: Optional[str] = None  # set on the first step of a segment: the reason
    handback: bool = False          # control returned to the robot at this step


def action_distance(a: np.ndarray, b: np.ndarray) -> float:
    """L2 distance between two actions after clipping to the action box (the env clips too, so
    out-of-range proposals that execute identically should not count as disagreement)."""
    a = np.clip(np.asarray(a, dtype=np.float64), -1.0, 1.0)
    b = np.clip(np.asarray(b, dtype=np.float64), -1.0, 1.0)
    return float(np.linalg.norm(a - b))


class InterventionGate:
    """The gating state machine for one robot. Call `reset` per episode, then `step` once per
    control step, before the action is executed, with the robot's proposed action, the expert's
    intended action, and the task progress observed so far."""

    def __init__(self, config: GatingConfig = GatingConfig(), seed: Optional[int] = None):
        self.config = config
        self.reset(seed)

    def reset(self, seed: Optional[int] = None) -> None:
        self._rng = np.random.default_rng(seed)
        self._human = False
        self._segments: list[Segment] = []
        self._open: Optional[tuple[int, str]] = None  # (start step, reason) of the open segment
        self._auto_takeovers = 0
        self._pending_request = False
        self._last_t = -1
        self._reset_robot_watch(progress=None)

    @property
    def human(self) -> bool:
        """Whether the human is driving right now."""
        return self._human

    @property
    def segments(self) -> list[Segment]:
        """Closed segments so far (see `finish` for the episode's full list)."""
        return list(self._segments)

    def request_takeover(self) -> None:
        """An operator asked for a takeover: the human drives from the next step (a request while
        the human already drives is dropped)."""
        self._pending_request = True

    def step(self, t: int, robot_action: np.ndarray, expert_action: np.ndarray,
             progress: Optional[float] = None, operator_request: bool = False) -> GateDecision:
        """Decide who drives step t. `progress` (in [0, 1], higher is better) feeds the stall
        rule; without it the rule never fires."""
        if t <= self._last_t:
            raise ValueError(f"steps must increase: got {t} after {self._last_t}")
        self._last_t = t
        cfg = self.config
        distance = action_distance(robot_action, expert_action)
        request = operator_request or self._pending_request
        self._pending_request = False

        if self._human:
            self._human_steps += 1
            self._agree = self._agree + 1 if distance <= cfg.agree_threshold else 0
            back_on_track = self._human_steps > cfg.min_human_steps and self._agree >= cfg.agree_steps
            too_long = cfg.max_human_steps is not None and self._human_steps > cfg.max_human_steps
            if back_on_track or too_long:
                self._close_segment(t)
                self._reset_robot_watch(progress)
                return GateDecision(human=False, handback=True)
            return GateDecision(human=True)

        # The robot drives: watch it.
        self._drift = self._drift + 1 if distance > cfg.drift_threshold else 0
        if progress is not None:
            if self._best is None or progress > self._best + cfg.stall_eps:
                self._best, self._since_best = progress, 0
            else:
                self._since_best += 1
        self._recent.append(distance)

        reason = None
        if request:
            reason = OPERATOR_REQUEST
        elif self._drift >= cfg.drift_steps:
            reason = DRIFT
        elif (cfg.stall_steps is not None and self._since_best >= cfg.stall_steps
              and sum(self._recent) / len(self._recent) > cfg.agree_threshold):
            reason = STALL
        if reason is None:
            return GateDecision(human=False)
        if reason != OPERATOR_REQUEST:
            budget_left = cfg.max_interventions is None or self._auto_takeovers < cfg.max_interventions
            if not budget_left or self._rng.random() >= cfg.takeover_prob:
                # Missed (or out of patience): the rule must build up again before it refires.
                self._reset_robot_watch(progress)
                return GateDecision(human=False)
            self._auto_takeovers += 1
        self._human = True
        self._human_steps = 1
        self._agree = 0  # the takeover step itself never counts as agreement
        self._open = (t, reason)
        return GateDecision(human=True, takeover=reason)

    def finish(self, num_steps: int) -> list[Segment]:
        """End of episode: close an open segment at `num_steps` and return all segments."""
        if self._open is not None:
            self._close_segment(num_steps)
        return list(self._segments)

    def _close_segment(self, end: int) -> None:
        start, reason = self._open
        if end > start:
            self._segments.append(Segment(start, end, reason, self.config.operator))
        self._open = None
        self._human = False

    def _reset_robot_watch(self, progress: Optional[float]) -> None:
        self._drift = 0
        self._recent: deque = deque(maxlen=self.config.stall_steps or 1)  # last action distances
        self._best = progress
        self._since_best = 0
        self._human_steps = 0
        self._agree = 0


class SimTeleoperator:
    """The simulated human at the robot: a scripted expert plus the gate. Each step it sees the
    observation and the robot's proposed action, and returns the action to execute and the
    gate's decision."""

    def __init__(self, expert: ScriptedExpert, config: GatingConfig = GatingConfig(),
                 seed: Optional[int] = None):
        self.expert = expert
        self.gate = InterventionGate(config, seed)

    @property
    def operator(self) -> str:
        return self.gate.config.operator

    def reset(self, seed: Optional[int] = None) -> None:
        self.expert.reset(seed)
        self.gate.reset(seed)

    def request_takeover(self) -> None:
        self.gate.request_takeover()

    def decide(self, t: int, obs: Observation, robot_action: np.ndarray, progress: Optional[float] = None,
               operator_request: bool = False) -> tuple[np.ndarray, GateDecision]:
        intended = self.expert.clean_action(obs.state)
        decision = self.gate.step(t, robot_action, intended, progress, operator_request)
        action = self.expert.styled(intended) if decision.human else np.asarray(robot_action, np.float32)
        return action, decision

    def finish(self, num_steps: int) -> list[Segment]:
        return self.gate.finish(num_steps)


@dataclass
class InterventionStats:
    """Intervention rate over many episodes: the fraction of steps the human drove and the
    fraction of episodes with at least one intervention, plus takeovers by reason."""
    episodes: int = 0
    steps: int = 0
    human_steps: int = 0
    episodes_with_intervention: int = 0
    reasons: Counter = field(default_factory=Counter)

    def add(self, num_steps: int, segments: Iterable[Segment]) -> None:
        segments = list(segments)
        self.episodes += 1
        self.steps += num_steps
        self.human_steps += sum(s.steps for s in segments)
        self.episodes_with_intervention += bool(segments)
        self.reasons.update(s.reason for s in segments)

    @property
    def step_rate(self) -> float:
        return self.human_steps / self.steps if self.steps else 0.0

    @property
    def episode_rate(self) -> float:
        return self.episodes_with_intervention / self.episodes if self.episodes else 0.0

    def as_dict(self) -> dict:
        return {"episodes": self.episodes, "steps": self.steps, "human_steps": self.human_steps,
                "step_rate": self.step_rate, "episode_rate": self.episode_rate,
                "takeovers": dict(self.reasons)}
