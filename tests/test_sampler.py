"""The sampler: SOP's adaptive online fraction, task balance, version tags and staleness,
batch format (chunk targets, images through the payload cache), JSON state."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fleetloop.buffer import index as index_mod
from fleetloop.buffer.codec import commit_episode, encode_chunk, encode_image, read_episode
from fleetloop.buffer.index import EpisodeEntry, FrameIndex, PayloadCache, entry_from_loaded
from fleetloop.buffer.sampler import (OFFLINE, ONLINE, AdaptiveMix, BufferSampler, SamplerConfig, online_fraction,
                                      version_number)
from fleetloop.buffer.store import open_store
from fleetloop.policy.data import chunk_targets
from fleetloop.proto.v1 import episode_pb2 as pb

S, A = 39, 4


def make_entry(eid: str, task: str, source: str, steps: int = 20, version: str = "", outcome: str = "success",
               intervention=None, seed: int = 0) -> EpisodeEntry:
    rng = np.random.default_rng(seed)
    iv = np.zeros(steps, bool) if intervention is None else np.asarray(intervention, bool)
    return EpisodeEntry(episode_id=eid, manifest_key="", robot_id="r0", task_id=task, instruction=f"do {task}",
                        policy_version=version, source=source, outcome=outcome, outcome_source="", incomplete=False,
                        states=rng.standard_normal((steps, S)).astype(np.float32),
                        actions=rng.uniform(-1, 1, (steps, A)).astype(np.float32), intervention=iv, chunks=[],
                        chunk_starts=np.zeros(1, np.int64), ended_ns=0)


def encode(instruction: str) -> np.ndarray:
    return np.random.default_rng(len(instruction)).standard_normal(384).astype(np.float32)


def test_source_names_match_the_index():
    assert (ONLINE, OFFLINE) == (index_mod.ONLINE, index_mod.OFFLINE)


# ---- the formula ------------------------------------------------------------------------

def test_online_fraction_formula():
    # w_on = exp(a*l_on) / (exp(a*l_on) + exp(l_off))
    for l_on, l_off, a in [(0.3, 0.2, 2.0), (0.1, 0.5, 3.0), (1.0, 1.0, 1.5), (0.0, 0.0, 2.0)]:
        want = math.exp(a * l_on) / (math.exp(a * l_on) + math.exp(l_off))
        assert online_fraction(l_on, l_off, a) == pytest.approx(want, rel=1e-12)
    assert online_fraction(0.3, 0.2, 2.0) == pytest.approx(0.598688, abs=1e-6)
    # Equal losses: alpha > 1 tilts toward online data.
    assert online_fraction(0.5, 0.5, 2.0) > 0.5
    # No overflow at extreme losses.
    assert online_fraction(1e4, 0.0, 2.0) == 1.0 and online_fraction(0.0, 1e4, 2.0) == 0.0


def fill(mix: AdaptiveMix, task: str, l_on: float, l_off: float, steps, count: int = 8) -> None:
    for s in steps:
        mix.observe(s, task, ONLINE, l_on * count, count)
        mix.observe(s, task, OFFLINE, l_off * count, count)


def test_clipping_and_full_window():
    mix = AdaptiveMix(SamplerConfig(window=10, alpha=2.0))
    fill(mix, "hard-online", 5.0, 0.0, range(1, 11))
    fill(mix, "hard-offline", 0.0, 5.0, range(1, 11))
    fill(mix, "mid", 0.3, 0.2, range(1, 11))
    assert mix.fraction("hard-online") == pytest.approx(0.8)   # formula ~1, clipped
    assert mix.fraction("hard-offline") == pytest.approx(0.2)  # formula ~0, clipped
    assert mix.fraction("mid") == pytest.approx(online_fraction(0.3, 0.2, 2.0))


def test_warmup_blends_from_half():
    mix = AdaptiveMix(SamplerConfig(window=10, alpha=2.0))
    assert mix.fraction("t") == 0.5                              # nothing observed yet
    fill(mix, "t", 5.0, 0.0, range(1, 6))                       # half the window
    assert mix.fraction("t") == pytest.approx(0.5 + 0.5 * (0.8 - 0.5))
    fill(mix, "t", 5.0, 0.0, range(6, 11))
    assert mix.fraction("t") == pytest.approx(0.8)


def test_missing_buffers():
    mix = AdaptiveMix(SamplerConfig())
    assert mix.fraction("t", has_online=False) == 0.0            # no online data: offline only
    assert mix.fraction("t", has_offline=False) == 1.0


def test_window_forgets_old_steps_and_rewinds():
    mix = AdaptiveMix(SamplerConfig(window=10))
    fill(mix, "t", 9.0, 9.0, range(1, 11))
    fill(mix, "t", 0.1, 0.3, range(11, 21))
    assert mix.mean_loss("t", ONLINE) == pytest.approx(0.1)
    assert mix.mean_loss("t", OFFLINE) == pytest.approx(0.3)
    mix.rewind(15)  # restart from a checkpoint at step 15: steps 16..20 never happened
    assert len(mix._window("t", ONLINE)) == 5


def test_config_validation():
    with pytest.raises(ValueError):
        SamplerConfig(alpha=1.0)
    with pytest.raises(ValueError):
        SamplerConfig(w_min=0.9, w_max=0.1)


# ---- sampling -----------------------------------------------------------------------------

def build_index(spec: dict[str, tuple[int, int]], steps: int = 20) -> FrameIndex:
    """spec: task -> (offline episodes, online episodes)."""
    index = FrameIndex()
    for task, (n_off, n_on) in spec.items():
        for k in range(n_off):
            index.add(make_entry(f"{task}-d{k}", task, OFFLINE, steps, seed=k))
        for k in range(n_on):
            index.add(make_entry(f"{task}-o{k}", task, ONLINE, steps, version=f"v{k % 5 + 1:06d}", seed=100 + k))
    return index


def test_task_balance_is_one_over_m():
    # Very different amounts of data per task; each task still gets 1/M of the samples.
    index = build_index({"big": (200, 50), "mid": (20, 5), "small": (2, 0), "online-only": (0, 3)})
    sampler = BufferSampler(index, SamplerConfig(seed=1), encode=encode)
    counts = np.zeros(4)
    for _ in range(100):
        b = sampler.sample(256)
        counts += np.bincount(b.meta["task"], minlength=4)
    frac = counts / counts.sum()
    assert b.tasks == ["big", "mid", "online-only", "small"]
    np.testing.assert_allclose(frac, 0.25, atol=0.01)


def test_online_fraction_is_what_is_sampled():
    index = build_index({"both": (10, 10), "demos": (10, 0), "fleet": (0, 10)})
    sampler = BufferSampler(index, SamplerConfig(window=10, seed=2), encode=encode)
    fill(sampler.mix, "both", 5.0, 0.0, range(1, 11))  # -> w_on = 0.8
    assert sampler.online_fractions() == {"both": pytest.approx(0.8), "demos": 0.0, "fleet": 1.0}
    on = {t: [] for t in ("both", "demos", "fleet")}
    for _ in range(60):
        b = sampler.sample(256)
        for j, t in enumerate(b.tasks):
            on[t].append(b.meta["online"][b.meta["task"] == j])
    assert np.concatenate(on["both"]).mean() == pytest.approx(0.8, abs=0.02)
    assert not np.concatenate(on["demos"]).any()
    assert np.concatenate(on["fleet"]).all()


def test_losses_feed_the_mix():
    index = build_index({"t": (5, 5)})
    sampler = BufferSampler(index, SamplerConfig(window=4), encode=encode)
    for step in range(1, 5):
        b = sampler.sample(64)
        losses = np.where(b.meta["online"], 2.0, 0.5)
        sampler.observe_losses(step, b.tasks, b.meta["task"], b.meta["online"], losses)
    assert sampler.mix.mean_loss("t", ONLINE) == pytest.approx(2.0)
    assert sampler.mix.mean_loss("t", OFFLINE) == pytest.approx(0.5)
    assert sampler.online_fractions()["t"] == pytest.approx(min(0.8, online_fraction(2.0, 0.5, 2.0)))


def test_batch_format_and_chunk_targets():
    index = build_index({"t": (3, 3)}, steps=12)
    sampler = BufferSampler(index, SamplerConfig(horizon=8), encode=encode)
    b = sampler.sample(128)
    arr = b.arrays
    assert arr["state"].shape == (128, S) and arr["state"].dtype == np.float32
    assert arr["lang"].shape == (128, 384) and arr["indicator"].dtype == np.int64
    assert arr["actions"].shape == (128, 8, A) and arr["action_mask"].shape == (128, 8)
    assert "images" not in arr
    for i in range(128):
        e, t = index.get(b.meta["episode_id"][i]), int(b.meta["t"][i])
        chunks, mask = chunk_targets(e.actions, 8)  # the pretraining code's targets
        np.testing.assert_array_equal(arr["actions"][i], chunks[t])
        np.testing.assert_array_equal(arr["action_mask"][i], mask[t])
        np.testing.assert_array_equal(arr["state"][i], e.states[t])
        np.testing.assert_array_equal(arr["lang"][i], encode(e.instruction))


def test_version_tags_and_staleness():
    index = FrameIndex()
    index.add(make_entry("old", "t", ONLINE, version="v000003"))
    index.add(make_entry("new", "t", ONLINE, version="v000005", seed=1))
    index.add(make_entry("demo", "t", OFFLINE, seed=2))
    sampler = BufferSampler(index, SamplerConfig(seed=3), encode=encode)
    sampler.set_learner_version("v000007")
    b = sampler.sample(512)
    want = {"old": ("v000003", 4), "new": ("v000005", 2), "demo": ("", -1)}
    for eid, v, s in zip(b.meta["episode_id"], b.meta["policy_version"], b.meta["staleness"]):
        assert (v, s) == want[eid]
    st = sampler.staleness_stats()
    assert st["learner_version"] == 7 and st["sampled_max"] == 4
    assert 2 <= st["sampled_mean"] <= 4 and st["buffer_mean"] == pytest.approx(3.0)
    assert version_number("v000012") == 12 and version_number("") == -1


def test_state_is_json_and_restores_the_draws():
    index = build_index({"a": (5, 5), "b": (5, 2)})
    s1 = BufferSampler(index, SamplerConfig(window=20, seed=4), encode=encode)
    for step in range(1, 8):
        b = s1.sample(32)
        s1.observe_losses(step, b.tasks, b.meta["task"], b.meta["online"], np.linspace(0, 1, 32))
    s1.set_learner_version("v000009")
    state = json.loads(json.dumps(s1.state_dict()))
    s2 = BufferSampler(index, SamplerConfig(window=20, seed=99), encode=encode)
    s2.load_state_dict(state)
    assert s2.online_fractions() == s1.online_fractions()
    assert s2.learner_version == 9
    b1, b2 = s1.sample(64), s2.sample(64)
    assert b1.meta["episode_id"] == b2.meta["episode_id"]
    np.testing.assert_array_equal(b1.meta["t"], b2.meta["t"])


# ---- images through the payload cache ---------------------------------------------------

def write_image_episode(store, eid: str, task: str, steps: int, seed: int, kind=pb.EPISODE_KIND_DEMONSTRATION):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (steps, 64, 64, 3), dtype=np.uint8)
    msgs = [pb.Step(index=t, state=rng.standard_normal(S).astype(np.float32), action=rng.uniform(-1, 1, A),
                    images=[encode_image(pixels[t], "front")]) for t in range(steps)]
    half = steps // 2
    m = pb.EpisodeManifest(episode_id=eid, robot_id="sim-0", task_id=task, instruction=f"do {task}", kind=kind,
                           outcome=pb.OUTCOME_SUCCESS, num_steps=steps, action_dim=A, state_dim=S, cameras=["front"])
    key = commit_episode(store, m, [(encode_chunk(eid, 0, msgs[:half]), half),
                                    (encode_chunk(eid, 1, msgs[half:]), steps - half)])
    return key, pixels


def test_images_come_from_the_payload_cache(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    index, pixels = FrameIndex(), {}
    for k in range(3):
        key, px = write_image_episode(store, f"ep-{k}", "t", 10, seed=k)
        index.add(entry_from_loaded(read_episode(store, key)))
        pixels[f"ep-{k}"] = px
    cache = PayloadCache(store)
    sampler = BufferSampler(index, SamplerConfig(), encode=encode, image_fn=cache.images, cameras=["front"])
    b = sampler.sample(32)
    assert b.arrays["images"].shape == (32, 3, 64, 64) and b.arrays["images"].dtype == np.uint8
    for i in range(32):
        want = pixels[b.meta["episode_id"][i]][b.meta["t"][i]].transpose(2, 0, 1)
        np.testing.assert_array_equal(b.arrays["images"][i], want)
    assert cache.misses <= 6  # each image section fetched once, then cached


def test_corrupt_images_quarantine_the_episode(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    index = FrameIndex()
    for k in range(2):
        key, _ = write_image_episode(store, f"ep-{k}", "t", 10, seed=k)
        index.add(entry_from_loaded(read_episode(store, key)))
    # Flip a byte in the image section of ep-0's chunks after ingest (bit rot, bad disk).
    for ref in index.get("ep-0").chunks:
        data = bytearray(store.get(ref.key))
        data[-5] ^= 0xFF
        store.put(ref.key, bytes(data))
    sampler = BufferSampler(index, SamplerConfig(), encode=encode, image_fn=PayloadCache(store).images,
                            cameras=["front"])
    for _ in range(5):
        b = sampler.sample(16)
        assert set(b.meta["episode_id"]) == {"ep-1"}
    assert sampler.quarantined == {"ep-0"}


def test_episodes_without_images_are_skipped_for_an_image_model():
    index = FrameIndex()
    index.add(make_entry("no-images", "t", OFFLINE))
    sampler = BufferSampler(index, SamplerConfig(), encode=encode, image_fn=lambda e, t: {}, cameras=["front"])
    assert sampler.sample(8) is None


class SuccessOnly:
    """Rules that train on successful episodes only (so a relabel changes what is eligible)."""
    weights_version = 0
    class_mix = None

    def frame_weights(self, e):
        return np.full(e.num_steps, float(e.outcome == "success"))

    def frame_classes(self, e):
        return np.zeros(e.num_steps, np.int8)

    def action_labels(self, e):
        return np.ones(e.num_steps, bool)

    def indicators(self, e):
        return np.zeros(e.num_steps, np.int64)


def test_new_episodes_and_relabels_reach_the_pools():
    index = FrameIndex()
    index.add(make_entry("d0", "t", OFFLINE))
    sampler = BufferSampler(index, SamplerConfig(refresh_s=0.0), SuccessOnly(), encode=encode)
    assert sampler.eligible_frames() == {"t": {OFFLINE: 20}}
    index.add(make_entry("o0", "t", ONLINE, version="v000001", outcome="failure"))
    index.add(make_entry("o1", "t", ONLINE, version="v000001", outcome="success", steps=10))
    assert sampler.eligible_frames() == {"t": {OFFLINE: 20, ONLINE: 10}}   # appended
    index.relabel("o0", "success")                                         # changed in place
    assert sampler.eligible_frames() == {"t": {OFFLINE: 20, ONLINE: 30}}
    index.relabel("d0", "failure")
    assert sampler.eligible_frames() == {"t": {ONLINE: 30}}
    assert set(sampler.sample(64).meta["episode_id"]) == {"o0", "o1"}


def test_pools_refresh_at_most_every_refresh_s():
    index = FrameIndex()
    index.add(make_entry("d0", "t", OFFLINE))
    sampler = BufferSampler(index, SamplerConfig(refresh_s=3600.0), encode=encode)
    sampler.sample(8)
    index.add(make_entry("d1", "t2", OFFLINE))
    assert sampler.tasks() == ["t"]            # not yet: the pools were refreshed just now
    sampler.refresh(force=True)
    assert sampler.tasks() == ["t", "t2"]
