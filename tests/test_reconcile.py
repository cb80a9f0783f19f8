"""Issue 13: the store is the record of truth. A reconciler finds committed episodes an index
lacks (Redis lost its data, an event was lost, a fresh Redis in front of an old store) for the
learner and the dashboard; the online buffer is bounded with oldest-first eviction; learner
stats say "stale" when the learner stops reporting. Real Redis, real file store."""
from __future__ import annotations

import json
import logging
import re
import threading
import time

import numpy as np
import pytest

from fleetloop import config
from fleetloop.buffer.codec import commit_episode, encode_chunk
from fleetloop.buffer.consumer import DataConsumer
from fleetloop.buffer.index import BufferLimits, FrameIndex
from fleetloop.buffer.queue import EpisodeAnnouncer
from fleetloop.buffer.reconcile import Reconciler
from fleetloop.buffer.sampler import BufferSampler, SamplerConfig
from fleetloop.buffer.store import LocalStore
from fleetloop.proto.v1 import episode_pb2 as pb

S, A = 6, 3


def commit(store, eid: str, ended_ns: int, steps: int = 20, kind=pb.EPISODE_KIND_ROLLOUT, task="t") -> str:
    rng = np.random.default_rng(abs(hash(eid)) % 2**32)
    st = rng.standard_normal((steps, S)).astype(np.float32)
    msgs = [pb.Step(index=t, state=st[t], action=np.tanh(st[t, :A])) for t in range(steps)]
    m = pb.EpisodeManifest(episode_id=eid, robot_id="r0", task_id=task, instruction="do t", kind=kind,
                           outcome=pb.OUTCOME_SUCCESS, num_steps=steps, action_dim=A, state_dim=S,
                           policy_version="v000001", ended_ns=ended_ns)
    return commit_episode(store, m, [(encode_chunk(eid, 0, msgs), steps)])


def announce(client, eid, key, ended_ns=0):
    EpisodeAnnouncer(client).announce(pb.EpisodeEvent(episode_id=eid, manifest_key=key, robot_id="r0",
                                                      task_id="t", ended_ns=ended_ns))


def wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.02)
    return cond()


def alerts(caplog) -> list[int]:
    return [int(m.group(1)) for r in list(caplog.records)
            if (m := re.search(r"ALERT reconcile: (\d+) committed episodes", r.getMessage()))]


def test_reconciler_heals_the_index_after_redis_data_loss(tmp_path, redis_client, caplog):
    store = LocalStore(tmp_path / "store")
    index = FrameIndex()
    consumer = DataConsumer(store, redis_client, index)
    now = time.time_ns()
    for k in range(3):
        announce(redis_client, f"a{k}", commit(store, f"a{k}", now + k), now + k)
    while consumer.poll_once(block_ms=50):
        pass
    assert len(index) == 3
    rec = Reconciler(store, index, name="learner", client=redis_client, check_s=0.05, interval_s=3600,
                     group=config.CONSUMER_GROUP)
    stop = threading.Event()
    rec.start_thread(stop, initial=False)
    try:
        time.sleep(0.3)                 # it has seen Redis as it was
        for k in range(4):              # robots committed these; their events will be gone
            commit(store, f"b{k}", now + 10 + k)
        redis_client.flushall()         # Redis loses everything: the stream, the group, the events
        assert wait(lambda: len(index) == 7), rec.stats()
        # a scan adds to the index first, then records its counts, then logs its alert: wait for
        # the alert lines (one per scan that found something; under load the four may come in
        # two scans), the last thing a scan does
        assert wait(lambda: sum(alerts(caplog)) == 4), (alerts(caplog), rec.stats())
    finally:
        stop.set()
    s = rec.stats()
    assert s["found_total"] == 4 and s["last_trigger"] in ("episode stream shrank", "consumer group gone")
    # a lost event with no sign in Redis at all: the periodic scan finds it
    commit(store, "c0", now + 20)
    assert rec.scan("periodic") == 1 and "c0" in index and rec.scan() == 0


def test_dashboard_on_an_old_store_with_an_empty_redis_shows_its_episodes(tmp_path, redis_client, caplog):
    from fleetloop.dashboard.service import Dashboard
    caplog.set_level(logging.INFO, logger="fleetloop.buffer.reconcile")
    store = LocalStore(tmp_path / "store")
    for k in range(6):                  # a finished run's store; Redis is new and empty
        commit(store, f"old{k}", time.time_ns())
    dash = Dashboard(redis_client, store).start()
    try:
        assert wait(lambda: len(dash.index) == 6)
        assert dash.snapshot(max_age_s=0)["episodes"]["indexed"] == 6
        assert wait(lambda: dash.reconciler.stats()["rebuilt_total"] == 6)
        # rebuilding a view at start is what the scan is for, not a lost event: no alert
        assert alerts(caplog) == [] and dash.reconciler.stats()["found_total"] == 0
        assert any("index rebuilt from the store: 6 committed episodes" in r.getMessage() for r in caplog.records)
    finally:
        dash.stop()


def test_bounded_online_buffer_evicts_oldest_and_keeps_demonstrations(tmp_path, redis_client):
    store = LocalStore(tmp_path / "store")
    index = FrameIndex(BufferLimits(max_frames=200, low_water=0.9))  # 10 episodes of 20 frames
    consumer = DataConsumer(store, redis_client, index)
    t0 = time.time_ns()
    for k in range(3):
        announce(redis_client, f"demo{k}", commit(store, f"demo{k}", t0, kind=pb.EPISODE_KIND_DEMONSTRATION))
    for k in range(40):                 # 800 online frames pass through
        announce(redis_client, f"on{k:02d}", commit(store, f"on{k:02d}", t0 + k * 10**9), t0 + k * 10**9)
    while consumer.poll_once(block_ms=50):
        pass
    st = index.stats()
    assert st["online_frames"] <= 200 and index.evicted >= 30
    kept = sorted(e.episode_id for e in index.episodes(source="online"))
    assert kept == [f"on{k:02d}" for k in range(40 - len(kept), 40)]  # the newest, contiguous
    assert len(index.episodes(source="offline")) == 3                   # never evicted
    # memory follows what is kept: the same as an unbounded index of only the kept episodes
    assert st["online_bytes"] < 12 * (st["online_bytes"] / max(1, len(kept)))
    # the sampler draws only from what is kept
    sampler = BufferSampler(index, SamplerConfig(), encode=lambda s: np.zeros(8, np.float32))
    batch = sampler.sample(256)
    assert set(batch.meta["episode_id"]) <= set(kept) | {"demo0", "demo1", "demo2"}
    # more arrive: the pools follow the eviction
    for k in range(40, 60):
        announce(redis_client, f"on{k:02d}", commit(store, f"on{k:02d}", t0 + k * 10**9), t0 + k * 10**9)
    while consumer.poll_once(block_ms=50):
        pass
    sampler.refresh(force=True)
    assert "on00" not in index and set(sampler.sample(256).meta["episode_id"]) <= {
        e.episode_id for e in index.episodes()}
    # the reconciler does not drag evicted episodes back from the store
    assert Reconciler(store, index).scan() == 0
    # an age limit
    aged = FrameIndex(BufferLimits(max_age_s=5))
    rec = Reconciler(store, aged)
    rec.scan()
    assert aged.enforce(now_ns=t0 + 60 * 10**9) > 0
    assert all(e.ended_ns >= t0 + 55 * 10**9 for e in aged.episodes(source="online"))


def test_learner_stats_say_stale_when_the_learner_stops_reporting(tmp_path, redis_client):
    from fleetloop.dashboard.service import Dashboard
    from fleetloop.learner import status
    old = time.time_ns() - int(60e9)
    redis_client.hset(config.LEARNER_STATS_KEY, mapping={
        "status": json.dumps("training"), "step": "1200", "updated_ns": str(old), "stale_after_s": "10"})
    s = status.read(redis_client)
    assert s["status"] == "stale" and s["reported_status"] == "training" and s["age_s"] >= 59
    dash = Dashboard(redis_client, LocalStore(tmp_path / "store"))
    learner = dash.learner()
    assert learner["stats"]["status"] == "stale" and not learner["fresh"]
    # a learner that reports keeps its status; a final one is kept as written
    redis_client.hset(config.LEARNER_STATS_KEY, "updated_ns", str(time.time_ns()))
    assert status.read(redis_client)["status"] == "training"
    assert dash.learner()["stats"]["status"] == "training"
    redis_client.hset(config.LEARNER_STATS_KEY, mapping={"status": json.dumps("stopped"), "updated_ns": str(old)})
    assert status.read(redis_client)["status"] == "stopped"
