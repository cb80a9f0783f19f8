"""Simulated robots: task catalogue, MetaWorld env, scripted expert, SimRobot loop, collection
into the store, evaluation, and the Wilson interval. State-only except one rendering test."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from fleetloop.actor.sim.tasks import (DEMO_TASKS, TASKS, UnknownTaskError, get_task, parse_task_list,
                                       task_for_instruction)
from fleetloop.stats import wilson_interval

sim = pytest.mark.sim


# ---- catalogue and statistics (no simulator) ------------------------------------------------

def test_catalogue_lookups_and_unknown_task_error():
    assert get_task("reach-v3").instruction == "reach to the red goal"
    assert task_for_instruction(get_task("push-v3").instruction).name == "push-v3"
    assert set(DEMO_TASKS) <= set(TASKS)
    with pytest.raises(UnknownTaskError, match=r"unknown task 'reach-v9'.*Did you mean reach-v3"):
        get_task("reach-v9")
    assert parse_task_list("reach-v3, push-v3,reach-v3") == ["reach-v3", "push-v3"]
    assert parse_task_list("demo") == list(DEMO_TASKS)
    with pytest.raises(UnknownTaskError, match="Known tasks"):
        parse_task_list("reach-v3,fly-v3")
    with pytest.raises(UnknownTaskError):
        parse_task_list(" , ")


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    lo, hi = wilson_interval(10, 10)
    assert round(lo, 4) == 0.7225 and hi == 1.0
    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    lo, hi = wilson_interval(1, 3, z=1.0)
    assert (round(lo, 4), round(hi, 4)) == (0.1356, 0.6144)  # center 0.375, half-width 0.2394
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


# ---- environment ---------------------------------------------------------------------------

@sim
def test_env_reset_step_shapes_and_episode_end():
    from fleetloop.actor.sim.env import SimEnv

    with SimEnv("push-v3", max_steps=10) as env:
        obs = env.reset(seed=3)
        assert obs.state.shape == (39,) and obs.state.dtype == np.float32 and obs.images == {}
        assert env.instruction == get_task("push-v3").instruction and env.steps == 0
        done = False
        while not done:
            obs, success, done = env.step(np.zeros(4))
            assert obs.state.shape == (39,) and isinstance(success, bool)
            assert 0.0 <= env.progress <= 1.0
        assert env.steps == 10 and not env.success
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(4))
        env.reset(seed=3)
        with pytest.raises(ValueError):
            env.step(np.zeros(3))


@sim
def test_env_seeds_fix_the_scene():
    from fleetloop.actor.sim.env import SimEnv

    with SimEnv("reach-v3") as env:
        goal_a = env.reset(seed=11).state[-3:].copy()
        goal_b = env.reset(seed=12).state[-3:].copy()
        goal_a2 = env.reset(seed=11).state[-3:].copy()
    np.testing.assert_array_equal(goal_a, goal_a2)
    assert not np.allclose(goal_a, goal_b)


@sim
def test_env_unknown_task():
    from fleetloop.actor.sim.env import SimEnv

    with pytest.raises(UnknownTaskError, match="reach-v3"):
        SimEnv("rech-v3")


@sim
def test_rendering_gives_64x64_images_that_change():
    from fleetloop.actor.sim.env import SimEnv
    from fleetloop.actor.sim.expert import ScriptedExpert

    with SimEnv("reach-v3", images=True) as env:
        expert = ScriptedExpert("reach-v3")
        obs = env.reset(seed=0)
        first = obs.images["front"]
        assert first.shape == (64, 64, 3) and first.dtype == np.uint8 and first.std() > 5
        for _ in range(10):
            obs, _, _ = env.step(expert.action(obs.state))
        later = obs.images["front"]
        assert later.shape == (64, 64, 3)
        assert np.abs(later.astype(int) - first.astype(int)).sum() > 0, "the arm moved; the image must change"


# ---- expert --------------------------------------------------------------------------------

@sim
def test_expert_succeeds_on_reach():
    from fleetloop.actor.sim.env import SimEnv
    from fleetloop.actor.sim.expert import ScriptedExpert

    successes = 0
    with SimEnv("reach-v3") as env:
        expert = ScriptedExpert("reach-v3")
        for seed in range(10):
            obs, done = env.reset(seed), False
            while not done:
                obs, _, done = env.step(expert.action(obs.state))
            successes += env.success
    assert successes >= 9


@sim
def test_expert_style():
    from fleetloop.actor.sim.expert import ExpertStyle, ScriptedExpert

    state = np.zeros(39, np.float32)
    state[-3:] = [0.1, 0.8, 0.2]  # goal far from the hand at the origin: saturated action
    clean = ScriptedExpert("reach-v3").clean_action(state)
    noisy = ScriptedExpert("reach-v3", ExpertStyle(noise_std=0.3), seed=1)
    a, b = noisy.action(state), noisy.action(state)
    assert not np.allclose(a, clean) and not np.allclose(a, b) and np.abs(a).max() <= 1.0
    again = ScriptedExpert("reach-v3", ExpertStyle(noise_std=0.3), seed=1).action(state)
    np.testing.assert_array_equal(a, again)
    slow = ScriptedExpert("reach-v3", ExpertStyle(speed=0.5)).action(state)
    np.testing.assert_allclose(slow[:3], clean[:3] * 0.5)
    with pytest.raises(ValueError):
        ExpertStyle(speed=0.0)


# ---- SimRobot ------------------------------------------------------------------------------

class ChunkPolicy:
    """A stand-in policy: chunks whose rows are numbered, so the broker's replay is visible."""
    version = "test-7"
    horizon = 4
    action_dim = 4

    def __init__(self):
        self.calls = 0

    def act(self, obs, instruction, indicator=None):
        self.calls += 1
        chunk = np.zeros((self.horizon, self.action_dim), np.float32)
        chunk[:, 0] = np.arange(self.horizon) * 0.1
        return chunk


class Recorder:
    """Records every callback (duck-typed: the SimRobot needs no base class)."""

    def __init__(self):
        self.events = []

    def start(self, task, instruction):
        self.events.append(("start", task, instruction))

    def on_step(self, obs, action, intervention, policy_chunk):
        self.events.append(("step", obs.state.copy(), np.asarray(action).copy(), intervention,
                            None if policy_chunk is None else policy_chunk.copy()))

    def on_takeover(self, reason, operator):
        self.events.append(("takeover", reason, operator))

    def on_handback(self):
        self.events.append(("handback",))

    def end(self, result):
        self.events.append(("end", result))


@sim
def test_sim_robot_chunk_broker_and_callbacks():
    from fleetloop.actor.sim.env import SimEnv
    from fleetloop.actor.sim.robot import SimRobot

    policy, rec = ChunkPolicy(), Recorder()
    with SimEnv("reach-v3", max_steps=10) as env:
        robot = SimRobot(env, policy, callbacks=rec, execute_steps=3)
        result = robot.run_episode(seed=5)
    assert rec.events[0] == ("start", "reach-v3", "reach to the red goal")
    steps = [e for e in rec.events if e[0] == "step"]
    assert len(steps) == 10 == result.num_steps and rec.events[-1] == ("end", result)
    # 3 actions executed per chunk: re-plans at steps 0, 3, 6, 9.
    assert policy.calls == 4
    assert [s[4] is not None for s in steps] == [t % 3 == 0 for t in range(10)]
    np.testing.assert_allclose([s[2][0] for s in steps], [0.1 * (t % 3) for t in range(10)], atol=1e-6)
    assert not any(s[3] for s in steps)
    assert result.policy_version == "test-7" and result.seed == 5 and not result.success
    assert result.outcome == 2  # OUTCOME_FAILURE


@sim
def test_sim_robot_rejects_bad_chunks_and_paces():
    from fleetloop.actor.sim.env import SimEnv
    from fleetloop.actor.sim.expert import ExpertPolicy
    from fleetloop.actor.sim.robot import SimRobot

    class Flat(ChunkPolicy):
        def act(self, obs, instruction, indicator=None):
            return np.zeros(4, np.float32)  # [A] instead of [H, A]

    with SimEnv("reach-v3", max_steps=12) as env:
        with pytest.raises(ValueError, match="shape"):
            SimRobot(env, Flat()).run_episode(0)
        robot = SimRobot(env, ExpertPolicy(), control_hz=100.0)
        env.terminate_on_success = False
        started = time.monotonic()
        result = robot.run_episode(0)
        assert result.num_steps == 12 and time.monotonic() - started >= 12 / 100.0


# ---- collect and eval ----------------------------------------------------------------------

@sim
def test_collect_writes_readable_episodes(tmp_path):
    from fleetloop.actor.sim.collect import collect, demo_episode_id
    from fleetloop.buffer.codec import decode_image, manifest_key, read_episode
    from fleetloop.buffer.store import open_store
    from fleetloop.proto.v1 import episode_pb2 as pb

    uri = (tmp_path / "store").as_uri()
    summary = collect(uri, ["reach-v3", "button-press-topdown-v3"], 2, seed=100, images=False, chunk_steps=16)
    assert summary.episodes == {"reach-v3": 2, "button-press-topdown-v3": 2}
    store = open_store(uri)
    for task in ("reach-v3", "button-press-topdown-v3"):
        for seed in (100, 101):
            ep = read_episode(store, manifest_key("sim-collector", demo_episode_id(task, seed)))
            m = ep.manifest
            assert m.kind == pb.EPISODE_KIND_DEMONSTRATION and m.robot_id == "sim-collector"
            assert m.task_id == task and m.instruction == get_task(task).instruction
            assert m.outcome == pb.OUTCOME_SUCCESS and m.outcome_source == pb.LABEL_SOURCE_ENVIRONMENT
            assert m.policy_version == "" and m.attributes["seed"] == str(seed)
            assert m.num_steps == len(ep.actions) > 16 and len(m.chunks) == -(-m.num_steps // 16)
            assert ep.states.shape == (m.num_steps, 39) and ep.actions.shape == (m.num_steps, 4)
            assert m.state_dim == 39 and m.action_dim == 4 and not ep.intervention.any()
            assert np.abs(ep.actions).max() <= 1.0 and list(m.cameras) == []

    # With images (one short episode): the frames come back as 64x64 RGB.
    collect(uri, ["reach-v3"], 1, seed=7, images=True, max_steps=20)
    chunks: dict = {}
    ep = read_episode(store, manifest_key("sim-collector", demo_episode_id("reach-v3", 7)), keep_chunks=chunks)
    assert list(ep.manifest.cameras) == ["front"]
    frames = [decode_image(step.images[0]) for i in sorted(chunks) for step in chunks[i].steps]
    assert len(frames) == ep.manifest.num_steps and frames[0].shape == (64, 64, 3)
    assert [s.index for i in sorted(chunks) for s in chunks[i].steps] == list(range(ep.manifest.num_steps))


@sim
def test_collect_cli(tmp_path, capsys):
    from fleetloop.cli import main

    uri = (tmp_path / "s").as_uri()
    assert main(["collect", "--tasks", "reach-v3", "--episodes", "2", "--store", uri, "--no-images"]) == 0
    assert "reach-v3" in capsys.readouterr().out
    assert len(list((tmp_path / "s").rglob("manifest.json"))) == 2
    with pytest.raises(UnknownTaskError):
        main(["collect", "--tasks", "nope-v3", "--episodes", "1", "--store", uri])


@sim
def test_eval_expert_and_json(capsys):
    from fleetloop.actor.sim.evaluate import evaluate, format_table
    from fleetloop.actor.sim.expert import ExpertPolicy
    from fleetloop.cli import main

    results = evaluate(ExpertPolicy(), ["reach-v3"], 4)
    r = results[0]
    assert (r.task, r.episodes, r.successes) == ("reach-v3", 4, 4)
    assert r.ci95 == pytest.approx(wilson_interval(4, 4)) and 0 < r.mean_steps < 100
    assert "reach-v3" in format_table(results)

    assert main(["eval", "--policy", "expert", "--tasks", "reach-v3,button-press-topdown-v3",
                 "--episodes", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [t["task"] for t in doc["tasks"]] == ["reach-v3", "button-press-topdown-v3"]
    assert doc["overall"]["episodes"] == 4 and len(doc["tasks"][0]["ci95"]) == 2
    # a --policy that names nothing: one line on stderr and exit status 2, not a traceback
    assert main(["eval", "--policy", "/no/such/dir", "--tasks", "reach-v3"]) == 2
    assert "fleetloop eval:" in capsys.readouterr().err
