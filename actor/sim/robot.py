"""SimRobot: one simulated robot running episodes -- policy, chunk broker, teleoperator, pacing --
and reporting everything through a small callback interface.

The callbacks are the seam between the robot and the rest of fleetloop. The same five calls
map one-to-one onto the actor daemon's gRPC robot link (StartEpisode, ReportStep,
BeginIntervention, EndIntervention, EndEpisode), so the loop below drives either an in-process
recorder or the real network path:

    class EpisodeCallbacks:
        start(task, instruction)                          episode begins (before reset)
        on_step(obs, action, intervention, policy_chunk)  one executed step; may return True to
                                                          request a takeover (operator button)
        on_takeover(reason, operator)                     before the first human-driven step
        on_handback()                                     before the robot drives again
        end(result)                                       episode over: outcome, segments, ...

Step semantics: `obs` is the observation the action was decided from, `action` what was
executed (the human's action on intervention steps), `policy_chunk` the [H, A] chunk the policy
produced at this step (over the robot link: its time-aligned rows, possibly fewer than H), or None
on steps that replay an earlier chunk. An intervention segment
still open at the end of an episode is closed by `end` (no `on_handback`).

Policy versions: `policy.version` is read after `start()`, so a policy whose version is fixed
when the episode starts (a gRPC-backed one) reports the right one. Swap policies between
episodes with `set_policy`; an episode never mixes versions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from fleetloop.actor.sim.env import SimEnv
from fleetloop.actor.sim.gating import GateDecision, Segment, SimTeleoperator
from fleetloop.policy.interface import Observation, Policy
from fleetloop.proto.v1 import episode_pb2 as pb


@dataclass
class EpisodeResult:
    task: str
    instruction: str
    seed: Optional[int]
    policy_version: str
    success: bool
    num_steps: int
    segments: list[Segment] = field(default_factory=list)
    wall_s: float = 0.0
    late_steps: int = 0  # paced runs: control ticks that started late (the loop could not keep up)

    @property
    def outcome(self) -> int:
        """pb.Outcome for the manifest (the environment's success detector decides)."""
        return pb.OUTCOME_SUCCESS if self.success else pb.OUTCOME_FAILURE

    @property
    def intervention_steps(self) -> int:
        return sum(s.steps for s in self.segments)

    @property
    def intervened(self) -> bool:
        return bool(self.segments)


class EpisodeCallbacks:
    """No-op base: override what you need. See the module docstring for the contract."""

    def start(self, task: str, instruction: str) -> None:
        pass

    def on_step(self, obs: Observation, action: np.ndarray, intervention: bool,
                policy_chunk: Optional[np.ndarray]) -> Optional[bool]:
        return None

    def on_takeover(self, reason: str, operator: str) -> None:
        pass

    def on_handback(self) -> None:
        pass

    def end(self, result: EpisodeResult) -> None:
        pass


# Actions a simulated robot executes from each chunk before re-planning. One value for every
# place a policy drives a simulated robot -- the demo's and the benchmarks' robots and the
# evaluations -- so a policy is evaluated the way it was deployed. (Executing the whole 8-step
# chunk open-loop scored 0.58 on the suite's pretrained policy vs 0.63 at 4, 200 episodes.)
EXECUTE_STEPS = 4


class ChunkBroker:
    """Plays a policy's action chunks open-loop: executes the first `execute_steps` actions of
    each [H, A] chunk, then asks the policy again from the newest observation. Executing fewer
    than H keeps the robot reactive; executing all H saves inference (k = H is ACT's default,
    openpi-style brokers re-plan after part of the chunk).

    A chunk may have fewer than H rows -- a LinkedPolicy returns the daemon's time-aligned rows
    (row 0 for this step) under asynchronous inference: the broker executes min(k, rows) of them
    and asks again when it has executed k or the rows run out."""

    def __init__(self, policy: Policy, execute_steps: Optional[int] = None, action_dim: Optional[int] = None):
        if execute_steps is not None and execute_steps < 1:
            raise ValueError(f"execute_steps must be >= 1 (None: the whole chunk), got {execute_steps}")
        self.policy = policy
        self.execute_steps = execute_steps
        self.action_dim = action_dim
        self.reset()

    def reset(self) -> None:
        self._chunk: Optional[np.ndarray] = None
        self._next = 0
        self._limit = 0

    def next(self, obs: Observation, instruction: str,
             indicator: Optional[bool] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The action for this step, and the chunk if one was planned at this step."""
        planned = None
        if self._chunk is None or self._next >= self._limit:
            chunk = np.asarray(self.policy.act(obs, instruction, indicator), dtype=np.float32)
            if chunk.ndim != 2 or chunk.shape[0] < 1 or (self.action_dim and chunk.shape[1] != self.action_dim):
                raise ValueError(f"policy {self.policy.version!r} returned a chunk of shape {chunk.shape}, "
                                 f"expected [H, {self.action_dim or 'A'}]")
            self._chunk, self._next = chunk, 0
            k = self.execute_steps or chunk.shape[0]
            self._limit = min(k, chunk.shape[0])
            planned = chunk
        action = self._chunk[self._next]
        self._next += 1
        return action, planned


class SimRobot:
    """A simulated robot: runs episodes of `env` with `policy`, optionally watched by a
    teleoperator (HG-DAgger interventions), reporting through `callbacks`.

    execute_steps: actions executed per chunk before re-planning (default: the whole chunk).
    indicator: passed to `policy.act` (RECAP's improvement indicator; True at deployment).
    control_hz: if set, pace the loop in real time (sleep until each tick) -- what scaling
        benchmarks use to emulate a 30 Hz robot; None runs as fast as the CPU allows.
    """

    def __init__(self, env: SimEnv, policy: Policy, *, teleop: Optional[SimTeleoperator] = None,
                 callbacks: Optional[EpisodeCallbacks] = None, execute_steps: Optional[int] = None,
                 indicator: Optional[bool] = None, control_hz: Optional[float] = None):
        if control_hz is not None and control_hz <= 0:
            raise ValueError(f"control_hz must be positive, got {control_hz}")
        self.env = env
        self.teleop = teleop
        self.callbacks = callbacks or EpisodeCallbacks()
        self.execute_steps = execute_steps
        self.indicator = indicator
        self.control_hz = control_hz
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        """Use `policy` from the next episode on (call between episodes)."""
        self.policy = policy
        self.broker = ChunkBroker(policy, self.execute_steps, self.env.action_dim)

    def run_episode(self, seed: Optional[int] = None) -> EpisodeResult:
        env, cb, teleop = self.env, self.callbacks, self.teleop
        cb.start(env.task, env.instruction)
        version = str(self.policy.version)
        started = time.monotonic()
        obs = env.reset(seed)
        self.broker.reset()
        if teleop is not None:
            teleop.reset(env.seed)
        period = 1.0 / self.control_hz if self.control_hz else 0.0
        tick0 = time.monotonic()  # pace from here: reset time is not part of a control tick
        late = 0
        request = False
        t = 0
        done = False
        while not done:
            robot_action, planned = self.broker.next(obs, env.instruction, self.indicator)
            action, decision = robot_action, GateDecision(human=False)
            if teleop is not None:
                action, decision = teleop.decide(t, obs, robot_action, env.progress, operator_request=request)
                if decision.takeover:
                    cb.on_takeover(decision.takeover, teleop.operator)
                elif decision.handback:
                    cb.on_handback()
            request = bool(cb.on_step(obs, action, decision.human, planned))
            obs, _success, done = env.step(action)
            t += 1
            if period:
                delay = tick0 + t * period - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    late += 1
        segments = teleop.finish(t) if teleop is not None else []
        result = EpisodeResult(task=env.task, instruction=env.instruction, seed=env.seed,
                               policy_version=version, success=env.success, num_steps=t,
                               segments=segments, wall_s=time.monotonic() - started, late_steps=late)
        cb.end(result)
        return result
