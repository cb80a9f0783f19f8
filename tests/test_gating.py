"""HG-DAgger gating: the pure decision rule first (synthetic action streams), then the simulated
teleoperator driving a real MetaWorld episode."""
from __future__ import annotations

import numpy as np
import pytest

from fleetloop.actor.sim.gating import (DRIFT, OPERATOR_REQUEST, STALL, GatingConfig, InterventionGate,
                                        InterventionStats, Segment, action_distance)

GOOD = np.array([0.5, 0.5, 0.0, 0.0], np.float32)
BAD = np.array([-0.5, -0.5, 0.0, 0.0], np.float32)  # distance to GOOD: sqrt(2) > drift threshold


def drive(gate: InterventionGate, robot_actions, expert=GOOD, progress=None):
    """Feed a stream of robot actions; return the per-step decisions."""
    return [gate.step(t, a, expert, progress=None if progress is None else progress[t])
            for t, a in enumerate(robot_actions)]


def test_takes_over_after_k_drifting_steps_and_not_before():
    gate = InterventionGate(GatingConfig(drift_steps=4, stall_steps=None))
    decisions = drive(gate, [BAD] * 3 + [GOOD] + [BAD] * 3)
    assert not any(d.human for d in decisions), "3 drifting steps in a row must not trigger (k=4)"
    decisions = drive(InterventionGate(GatingConfig(drift_steps=4, stall_steps=None)), [BAD] * 4)
    assert [d.human for d in decisions] == [False, False, False, True]
    assert decisions[3].takeover == DRIFT


def test_hands_back_after_min_human_steps_and_agreement():
    cfg = GatingConfig(drift_steps=2, min_human_steps=5, agree_steps=3, stall_steps=None)
    gate = InterventionGate(cfg)
    # t=0,1 drift -> takeover at t=1. The robot keeps proposing BAD for 2 more steps, then GOOD.
    stream = [BAD, BAD, BAD, BAD] + [GOOD] * 10
    decisions = drive(gate, stream)
    human = [d.human for d in decisions]
    assert human[1] and decisions[1].takeover == DRIFT
    back = next(t for t, d in enumerate(decisions) if d.handback)
    # Agreement starts at t=4; 3 agreeing steps are complete at t=6 and the human has driven
    # t=1..5 (5 steps) by then, so the robot drives again from t=6.
    assert back == 6
    assert not decisions[back].human and all(human[1:back]) and not any(human[back:])
    segments = gate.finish(len(stream))
    assert segments == [Segment(1, 6, DRIFT, "sim-expert")]


def test_human_keeps_driving_while_the_robot_disagrees():
    cfg = GatingConfig(drift_steps=1, min_human_steps=3, agree_steps=2, stall_steps=None)
    gate = InterventionGate(cfg)
    decisions = drive(gate, [BAD] * 20)
    assert decisions[0].takeover == DRIFT and all(d.human for d in decisions)
    assert gate.finish(20) == [Segment(0, 20, DRIFT, "sim-expert")]  # closed at episode end


def test_max_human_steps_forces_handback():
    gate = InterventionGate(GatingConfig(drift_steps=1, min_human_steps=2, max_human_steps=4, stall_steps=None,
                                         max_interventions=1))
    decisions = drive(gate, [BAD] * 10)
    assert [d.handback for d in decisions].index(True) == 4
    assert gate.finish(10) == [Segment(0, 4, DRIFT, "sim-expert")]


def test_stall_needs_flat_progress_and_a_robot_off_the_expert():
    cfg = GatingConfig(stall_steps=5, drift_steps=100)
    # 0.4 from the expert: above the agreement threshold (0.3), below the drift one (0.6).
    mild = GOOD + np.array([0.4, 0, 0, 0], np.float32)
    flat = [0.2] * 12
    decisions = drive(InterventionGate(cfg), [GOOD] * 12, progress=flat)
    assert not any(d.human for d in decisions), "flat progress while doing what the expert does is no stall"
    decisions = drive(InterventionGate(cfg), [mild] * 12, progress=flat)
    first = next(t for t, d in enumerate(decisions) if d.human)
    assert decisions[first].takeover == STALL and first == 5
    rising = [0.1 + 0.01 * t for t in range(12)]
    decisions = drive(InterventionGate(cfg), [mild] * 12, progress=rising)
    assert not any(d.human for d in decisions), "progress that keeps improving is not a stall"
    decisions = drive(InterventionGate(cfg), [mild] * 12)
    assert not any(d.human for d in decisions), "no progress signal, no stall rule"


def test_operator_request_is_honoured_even_without_budget():
    gate = InterventionGate(GatingConfig(max_interventions=0, min_human_steps=2, agree_steps=1, stall_steps=None))
    assert not gate.step(0, GOOD, GOOD).human
    d = gate.step(1, GOOD, GOOD, operator_request=True)
    assert d.human and d.takeover == OPERATOR_REQUEST
    # Pending-request form (what a dashboard button would use).
    gate = InterventionGate(GatingConfig(min_human_steps=2, agree_steps=1, stall_steps=None))
    gate.step(0, GOOD, GOOD)
    gate.request_takeover()
    decisions = drive_from(gate, 1, [GOOD] * 6)
    assert decisions[0].takeover == OPERATOR_REQUEST
    assert gate.finish(7)[0].reason == OPERATOR_REQUEST


def drive_from(gate, t0, actions, expert=GOOD):
    return [gate.step(t0 + i, a, expert) for i, a in enumerate(actions)]


def test_max_interventions_and_takeover_probability():
    cfg = GatingConfig(drift_steps=1, min_human_steps=1, agree_steps=1, max_interventions=2, stall_steps=None)
    gate = InterventionGate(cfg)
    # Alternate drifting and agreeing: each drift would be a new takeover, but only 2 are allowed.
    stream = [BAD, GOOD, GOOD] * 6
    drive(gate, stream)
    segments = gate.finish(len(stream))
    assert len(segments) == 2
    never = InterventionGate(GatingConfig(drift_steps=1, takeover_prob=0.0, stall_steps=None))
    assert not any(d.human for d in drive(never, [BAD] * 50))
    sometimes = InterventionGate(GatingConfig(drift_steps=1, min_human_steps=1, agree_steps=1, takeover_prob=0.5,
                                              max_interventions=None, stall_steps=None), seed=0)
    drive(sometimes, [BAD, GOOD] * 200)
    n = len(sometimes.finish(400))
    assert 60 < n < 140, n  # about half of 200 triggers


def test_segments_are_well_formed_on_random_streams():
    rng = np.random.default_rng(1)
    for trial in range(20):
        cfg = GatingConfig(drift_steps=int(rng.integers(1, 4)), min_human_steps=int(rng.integers(1, 6)),
                           agree_steps=int(rng.integers(1, 4)), max_interventions=None, stall_steps=7)
        gate = InterventionGate(cfg, seed=trial)
        n = 200
        flags = []
        for t in range(n):
            robot = GOOD if rng.random() < 0.6 else BAD
            d = gate.step(t, robot, GOOD, progress=float(rng.random() * 0.1),
                          operator_request=rng.random() < 0.02)
            flags.append(d.human)
        segments = gate.finish(n)
        covered = np.zeros(n, bool)
        last_end = -1
        for s in segments:
            assert 0 <= s.start < s.end <= n and s.start >= last_end and s.reason in (DRIFT, STALL, OPERATOR_REQUEST)
            covered[s.start:s.end] = True
            last_end = s.end
        assert (covered == np.array(flags)).all(), "segments must cover exactly the human-driven steps"


def test_intervention_stats():
    stats = InterventionStats()
    stats.add(100, [Segment(10, 30, DRIFT, "x"), Segment(50, 60, STALL, "x")])
    stats.add(50, [])
    stats.add(50, [Segment(0, 10, OPERATOR_REQUEST, "x")])
    assert stats.step_rate == pytest.approx(40 / 200)
    assert stats.episode_rate == pytest.approx(2 / 3)
    assert stats.as_dict()["takeovers"] == {DRIFT: 1, STALL: 1, OPERATOR_REQUEST: 1}
    assert InterventionStats().step_rate == 0.0 and InterventionStats().episode_rate == 0.0


def test_config_validation_and_distance():
    with pytest.raises(ValueError):
        GatingConfig(drift_steps=0)
    with pytest.raises(ValueError):
        GatingConfig(takeover_prob=1.5)
    with pytest.raises(ValueError):
        GatingConfig(agree_threshold=0.9, drift_threshold=0.5)
    assert GatingConfig.style("strict").drift_steps < GatingConfig().drift_steps < GatingConfig.style("relaxed").drift_steps
    assert GatingConfig.style("relaxed", operator="bob").operator == "bob"
    with pytest.raises(ValueError, match="style"):
        GatingConfig.style("sleepy")
    # Clipped before comparing: proposals beyond the action box execute like the box edge.
    assert action_distance([3, 0, 0, 0], [1, 0, 0, 0]) == 0.0
    with pytest.raises(ValueError):
        gate = InterventionGate()
        gate.step(3, GOOD, GOOD)
        gate.step(3, GOOD, GOOD)


# ---- with the simulator ------------------------------------------------------------------------

class ConstantPolicy:
    """A stand-in robot policy that always proposes the same action (a broken novice)."""
    version = "constant"
    horizon = 4
    action_dim = 4

    def __init__(self, action):
        self.action = np.asarray(action, np.float32)

    def act(self, obs, instruction, indicator=None):
        return np.tile(self.action, (self.horizon, 1))


@pytest.mark.sim
def test_teleoperator_rescues_a_broken_policy_and_records_segments():
    from fleetloop.actor.sim.env import SimEnv
    from fleetloop.actor.sim.expert import ExpertPolicy, ScriptedExpert
    from fleetloop.actor.sim.gating import SimTeleoperator
    from fleetloop.actor.sim.robot import EpisodeCallbacks, SimRobot

    class Log(EpisodeCallbacks):
        def __init__(self):
            self.flags, self.events = [], []

        def on_step(self, obs, action, intervention, policy_chunk):
            self.flags.append(intervention)

        def on_takeover(self, reason, operator):
            self.events.append(("takeover", len(self.flags), reason, operator))

        def on_handback(self):
            self.events.append(("handback", len(self.flags)))

    stats = InterventionStats()
    with SimEnv("reach-v3", max_steps=100) as env:
        log = Log()
        teleop = SimTeleoperator(ScriptedExpert("reach-v3"), GatingConfig(max_interventions=None))
        # Moving away from every goal (+z up, -y back): the human must step in, and succeeds.
        robot = SimRobot(env, ConstantPolicy([0.0, -1.0, 1.0, 0.0]), teleop=teleop, callbacks=log)
        for seed in range(3):
            log.flags.clear()
            log.events.clear()
            result = robot.run_episode(seed)
            stats.add(result.num_steps, result.segments)
            assert result.success, "the expert takes over and finishes the task"
            assert result.segments and result.segments[0].reason == DRIFT
            covered = np.zeros(result.num_steps, bool)
            for s in result.segments:
                covered[s.start:s.end] = True
            assert (covered == np.array(log.flags)).all()
            takeovers = [e for e in log.events if e[0] == "takeover"]
            assert [(e[1], e[2], e[3]) for e in takeovers] == [(s.start, s.reason, "sim-expert")
                                                               for s in result.segments]
            assert result.intervention_steps == covered.sum()

        # The expert as the robot: nothing to correct.
        robot.set_policy(ExpertPolicy())
        for seed in range(3):
            result = robot.run_episode(seed)
            stats.add(result.num_steps, result.segments)
            assert result.success and not result.segments
    assert stats.episode_rate == pytest.approx(0.5)
    assert 0 < stats.step_rate < 1


@pytest.mark.sim
def test_operator_request_through_the_callbacks():
    from fleetloop.actor.sim.env import SimEnv
    from fleetloop.actor.sim.expert import ExpertPolicy, ScriptedExpert
    from fleetloop.actor.sim.gating import SimTeleoperator
    from fleetloop.actor.sim.robot import EpisodeCallbacks, SimRobot

    class PressAtStep5(EpisodeCallbacks):
        n = 0

        def on_step(self, obs, action, intervention, policy_chunk):
            self.n += 1
            return self.n == 5  # an operator presses "take over" while step 4 runs

    with SimEnv("reach-v3") as env:
        robot = SimRobot(env, ExpertPolicy(), teleop=SimTeleoperator(ScriptedExpert("reach-v3")),
                         callbacks=PressAtStep5())
        result = robot.run_episode(0)
    assert result.segments and result.segments[0].start == 5 and result.segments[0].reason == OPERATOR_REQUEST
    assert result.segments[0].steps >= GatingConfig().min_human_steps or result.segments[0].end == result.num_steps
