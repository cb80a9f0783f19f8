"""Learner algorithms: HG-DAgger's training targets (strict, success-only, IWR balance) and
RECAP's returns, bins, N-step advantages, per-task thresholds and forced-positive corrections."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fleetloop.buffer.index import EpisodeEntry, FrameIndex
from fleetloop.buffer.sampler import OFFLINE, ONLINE, BufferSampler, SamplerConfig
from fleetloop.learner.algorithms import ALGORITHMS, make_algorithm
from fleetloop.learner.algorithms.hg_dagger import HGDagger
from fleetloop.learner.algorithms.recap import Recap, threshold_for_fraction
from fleetloop.learner.algorithms.value import (bin_values, n_step_advantage, returns_to_go, step_rewards,
                                                two_hot)
from fleetloop.release.guidance import Guidance
from fleetloop.policy.model import INDICATOR_NEGATIVE, INDICATOR_POSITIVE, INDICATOR_UNSET

torch.set_num_threads(1)
S, A = 39, 4


def entry(eid, task="t", source=ONLINE, steps=40, outcome="success", intervention=(), seed=0, states=None):
    rng = np.random.default_rng(seed)
    iv = np.zeros(steps, bool)
    for a, b in intervention:
        iv[a:b] = True
    st = rng.standard_normal((steps, S)).astype(np.float32) if states is None else states.astype(np.float32)
    return EpisodeEntry(episode_id=eid, manifest_key="", robot_id="r", task_id=task, instruction=f"do {task}",
                        policy_version="v000001" if source == ONLINE else "", source=source, outcome=outcome,
                        outcome_source="", incomplete=False, states=st,
                        actions=rng.uniform(-1, 1, (steps, A)).astype(np.float32), intervention=iv, chunks=[],
                        chunk_starts=np.zeros(1, np.int64), ended_ns=0)


def encode(instruction: str) -> np.ndarray:
    return np.random.default_rng(len(instruction)).standard_normal(384).astype(np.float32)


def test_registry():
    assert {"hg-dagger", "recap"} <= set(ALGORITHMS)
    assert isinstance(make_algorithm("hg-dagger", iwr=True), HGDagger)
    with pytest.raises(ValueError, match="unknown algorithm"):
        make_algorithm("ppo")
    with pytest.raises(TypeError):
        make_algorithm("recap", not_an_option=1)


# ---- HG-DAgger ------------------------------------------------------------------------------

def test_hg_dagger_strict_trains_only_on_expert_frames():
    algo = HGDagger()
    rollout = entry("r", intervention=[(10, 20)], outcome="failure")
    demo = entry("d", source=OFFLINE)
    np.testing.assert_array_equal(np.flatnonzero(algo.frame_weights(rollout)), np.arange(10, 20))
    assert algo.frame_weights(demo).all()
    assert (algo.indicators(rollout) == INDICATOR_UNSET).all()  # the plain policy robots run
    assert (HGDagger(indicator="positive").indicators(rollout) == INDICATOR_POSITIVE).all()

    index = FrameIndex()
    index.add(rollout)
    sampler = BufferSampler(index, SamplerConfig(horizon=8), algo, encode=encode)
    b = sampler.sample(512)
    t = b.meta["t"]
    assert ((10 <= t) & (t < 20)).all()
    # A chunk target ends where the human handed control back: never the robot's own actions.
    for ti, mask in zip(t, b.arrays["action_mask"]):
        assert mask.sum() == min(8, 20 - ti) and (mask[: int(mask.sum())] == 1).all()


def test_hg_dagger_successful_autonomous_episodes():
    algo = HGDagger(autonomous="success")
    clean_success = entry("a", outcome="success")
    failed = entry("b", outcome="failure", intervention=[(5, 9)])
    corrected_success = entry("c", outcome="success", intervention=[(5, 9)])
    assert algo.frame_weights(clean_success).all()
    np.testing.assert_array_equal(np.flatnonzero(algo.frame_weights(failed)), np.arange(5, 9))
    np.testing.assert_array_equal(np.flatnonzero(algo.frame_weights(corrected_success)), np.arange(5, 9))
    assert not HGDagger().frame_weights(clean_success).any()  # strict: autonomous frames never


def test_iwr_balances_intervention_and_autonomous_samples():
    algo = HGDagger(iwr=True)
    index = FrameIndex()
    for k in range(10):  # 4 of 40 frames are interventions: 10% of the online frames
        index.add(entry(f"r{k}", intervention=[(20, 24)], outcome="failure", seed=k))
    sampler = BufferSampler(index, SamplerConfig(), algo, encode=encode)
    ids, ts = [], []
    for _ in range(20):
        b = sampler.sample(256)
        ids += b.meta["episode_id"]
        ts += list(b.meta["t"])
    frac = np.mean([index.get(e).intervention[t] for e, t in zip(ids, ts)])
    assert frac == pytest.approx(0.5, abs=0.03)
    proportional = HGDagger(autonomous="all")  # without the balance: by frame count (~10%)
    sampler = BufferSampler(index, SamplerConfig(), proportional, encode=encode)
    b = sampler.sample(2048)
    frac = np.mean([index.get(e).intervention[t] for e, t in zip(b.meta["episode_id"], b.meta["t"])])
    assert frac == pytest.approx(0.1, abs=0.03)


# ---- RECAP: returns, bins, advantages -------------------------------------------------------

def test_rewards_and_returns():
    # r_t = -1, last step 0 (success) or -C_fail (failure); R_t = steps to go (negative).
    np.testing.assert_array_equal(step_rewards(5, True, 10.0), [-1, -1, -1, -1, 0])
    np.testing.assert_array_equal(returns_to_go(step_rewards(5, True, 10.0)), [-4, -3, -2, -1, 0])
    np.testing.assert_array_equal(returns_to_go(step_rewards(5, False, 10.0)), [-14, -13, -12, -11, -10])

    algo = Recap(c_fail=1.0)
    algo.task_len["t"] = 10                     # L = 10, C_fail = 10, Z = 20
    ok = entry("s", steps=5, outcome="success")
    bad = entry("f", steps=5, outcome="failure")
    np.testing.assert_allclose(algo.returns(ok), [-0.2, -0.15, -0.1, -0.05, 0.0])
    np.testing.assert_allclose(algo.returns(bad), [-0.7, -0.65, -0.6, -0.55, -0.5])
    assert algo.returns(entry("u", steps=5, outcome="unknown")) is None
    # Any failure scores below any success of the task (episodes up to L long).
    worst_success = algo.returns(entry("w", steps=10, outcome="success"))[0]
    best_failure = algo.returns(entry("b", steps=1, outcome="failure"))[0]
    assert best_failure < worst_success


def test_two_hot_bins():
    bins = bin_values(201)
    assert len(bins) == 201 and bins[0] == -1.0 and bins[-1] == 0.0
    v = torch.tensor([-1.0, -0.5, -0.123, -0.0001, 0.0])
    p = two_hot(v, 201)
    assert torch.allclose(p.sum(1), torch.ones(5))
    assert torch.allclose(p @ torch.as_tensor(bins, dtype=torch.float32), v, atol=1e-6)  # expectation is exact
    assert (p > 0).sum(1).max() <= 2
    assert p[1, 100] == pytest.approx(1.0)  # -0.5 is a bin centre


def test_n_step_advantage_by_hand():
    r = np.array([-1.0, -1.0, -1.0, 0.0])
    v = np.array([-3.0, -2.5, -1.0, 0.0])
    # N = 2: A_t = r_t + r_{t+1} + V_{t+2} - V_t, with V = 0 past the end.
    # A_0 = r_0 + r_1 + V_2 - V_0 = -2 - 1 + 3 = 0      A_1 = r_1 + r_2 + V_3 - V_1 = -2 + 0 + 2.5 = 0.5
    # A_2 = r_2 + r_3 - V_2 = -1 + 0 + 1 = 0            A_3 = r_3 - V_3 = 0
    np.testing.assert_allclose(n_step_advantage(r, v, 2), [0.0, 0.5, 0.0, 0.0])
    # N >= T: the Monte-Carlo advantage R_t - V_t.
    np.testing.assert_allclose(n_step_advantage(r, v, 50), returns_to_go(r) - v)


def test_threshold_hits_target_fraction():
    a = np.random.default_rng(0).standard_normal(10_000)
    for frac in (0.1, 0.3, 0.4):
        assert (a > threshold_for_fraction(a, frac)).mean() == pytest.approx(frac, abs=1e-3)


def recap_index():
    """Two tasks; demos succeed; rollouts fail or succeed, some with corrections."""
    index = FrameIndex()
    for task in ("a", "b"):
        for k in range(6):
            index.add(entry(f"{task}-d{k}", task, OFFLINE, steps=60 + 5 * k, seed=k))
        for k in range(6):
            iv = [(30, 40)] if k % 2 else []
            index.add(entry(f"{task}-o{k}", task, ONLINE, steps=80, outcome="failure" if k < 3 else "success",
                            intervention=iv, seed=50 + k))
    return index


def test_recap_thresholds_and_forced_positive_corrections():
    algo = Recap(n_step=10, value_pretrain_steps=30, positive_fraction_online=0.4, positive_fraction_offline=0.3)
    algo.bind(encode)
    index = recap_index()
    assert algo.refresh(index)
    assert algo.fitted and set(algo.eps) == {"a", "b"} and set(algo.eps["a"]) == {ONLINE, OFFLINE}
    for task in ("a", "b"):
        for source, target in ((ONLINE, 0.4), (OFFLINE, 0.3)):
            ind, corrected = [], []
            for e in index.episodes(task, source):
                i = algo.indicators(e)
                ind.append(i[~e.intervention])
                corrected.append(i[e.intervention])
            ind = np.concatenate(ind)
            assert set(np.unique(ind)) <= {INDICATOR_NEGATIVE, INDICATOR_POSITIVE}
            assert (ind == INDICATOR_POSITIVE).mean() == pytest.approx(target, abs=0.01)
            corrected = np.concatenate(corrected)
            assert (corrected == INDICATOR_POSITIVE).all()  # corrections are forced positive
    # Forced even where the advantage says otherwise.
    e = next(e for e in index.episodes("a", ONLINE) if e.has_intervention)
    adv = algo.advantages(e)
    assert (adv[e.intervention] <= algo.eps["a"][ONLINE]).any()
    assert algo.stats()["positive_fraction"]["a"][OFFLINE] == pytest.approx(0.3, abs=0.01)
    assert algo.inference_settings() == Guidance(indicator=True, beta=1.5)


def test_recap_unknown_outcome_leaves_the_tail_unset():
    algo = Recap(n_step=10, value_pretrain_steps=10)
    algo.bind(encode)
    index = recap_index()
    index.add(entry("a-unknown", "a", ONLINE, steps=30, outcome="unknown", seed=99))
    algo.refresh(index)
    ind = algo.indicators(index.get("a-unknown"))
    assert (ind[-10:] == INDICATOR_UNSET).all() and (ind[:-10] != INDICATOR_UNSET).all()


def test_value_function_learns_steps_to_go():
    # The state carries progress (t / T); the value must recover the normalised return.
    algo = Recap(value_pretrain_steps=400, value_hidden=64)
    algo.bind(encode)
    index = FrameIndex()
    for k in range(8):
        t_len = 40 + 5 * k
        st = np.zeros((t_len, S), np.float32)
        st[:, 0] = np.arange(t_len) / t_len
        st[:, 1] = t_len / 80
        index.add(entry(f"d{k}", source=OFFLINE, steps=t_len, states=st, seed=k))
    algo.refresh(index)
    e = index.get("d4")
    v = algo.value.predict(e.states, encode(e.instruction))
    assert np.abs(v - algo.returns(e)).mean() < 0.05
    assert v[-1] > v[0]


def test_recap_state_round_trip():
    algo = Recap(n_step=10, value_pretrain_steps=20)
    algo.bind(encode)
    index = recap_index()
    algo.refresh(index)
    meta, tensors = algo.state()
    meta = json.loads(json.dumps(meta))  # JSON only, no pickle
    fresh = Recap(n_step=10)
    fresh.bind(encode)
    fresh.load_state(meta, tensors)
    assert fresh.fitted and fresh.eps == algo.eps
    for e in index.episodes():
        np.testing.assert_allclose(fresh.advantages(e), algo.advantages(e))
        np.testing.assert_array_equal(fresh.indicators(e), algo.indicators(e))
    steps, version = fresh.value.steps, fresh.value_version
    fresh.refresh(index)  # thresholds are recomputed; a restored frozen value function is not refitted
    assert (fresh.value.steps, fresh.value_version) == (steps, version) and fresh.eps == algo.eps


def test_online_value_function_keeps_learning():
    algo = Recap(value_function="online", n_step=10, value_pretrain_steps=10, value_online_steps=5,
                 refresh_interval_s=0.0)
    algo.bind(encode)
    index = recap_index()
    algo.refresh(index)
    v0 = algo.value_version
    index.add(entry("a-new", "a", ONLINE, steps=50, outcome="success", seed=77))
    assert algo.refresh(index)
    assert algo.value_version == v0 + 1 and algo.value.steps == 15
    frozen = Recap(n_step=10, value_pretrain_steps=10, refresh_interval_s=0.0)
    frozen.bind(encode)
    frozen.refresh(index)
    index.add(entry("a-new2", "a", ONLINE, steps=50, outcome="success", seed=78))
    frozen.refresh(index)
    assert frozen.value_version == 1 and frozen.value.steps == 10
