"""Issue 13: ingest scales out. Two consumers in one group (two replay shards) split the stream:
each episode is indexed by exactly one of them, none is lost, and when one consumer dies with
messages in flight the other claims them (XAUTOCLAIM). Real Redis, real S3 (moto over HTTP)."""
from __future__ import annotations

import time

import numpy as np

from fleetloop.buffer.codec import commit_episode, encode_chunk
from fleetloop.buffer.consumer import DataConsumer
from fleetloop.buffer.index import FrameIndex
from fleetloop.buffer.queue import EpisodeAnnouncer
from fleetloop.buffer.store import S3Store
from fleetloop.proto.v1 import episode_pb2 as pb


def commit(store, eid):
    st = np.random.default_rng(len(eid)).standard_normal((10, 4)).astype(np.float32)
    msgs = [pb.Step(index=t, state=st[t], action=st[t, :2]) for t in range(10)]
    m = pb.EpisodeManifest(episode_id=eid, robot_id="r1", task_id="t", instruction="x", kind=pb.EPISODE_KIND_ROLLOUT,
                           num_steps=10, state_dim=4, action_dim=2, policy_version="v000001")
    return commit_episode(store, m, [(encode_chunk(eid, 0, msgs), 10)])


def test_two_consumers_split_the_stream_and_take_over(s3_settings, redis_client):
    store = S3Store("two-consumers", "fleet", s3_settings)
    announcer = EpisodeAnnouncer(redis_client)
    ids = [f"ep{k:03d}" for k in range(60)]
    for eid in ids:
        announcer.announce(pb.EpisodeEvent(episode_id=eid, manifest_key=commit(store, eid)))
    shards = [FrameIndex(), FrameIndex()]
    consumers = [DataConsumer(store, redis_client, shards[i], consumer_name=f"shard-{i}", claim_idle_ms=300)
                 for i in range(2)]
    # both read in turn, small batches: the group hands each message to one of them
    for _ in range(10):
        for c in consumers:
            c.poll_once(block_ms=20, count=4)
    # shard-1 dies holding messages it read but never acked
    consumers[1].queue.poll(count=5, block_ms=20)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(len(s) for s in shards) < len(ids):
        consumers[0].poll_once(block_ms=50, count=8)
    a = {e.episode_id for e in shards[0].episodes()}
    b = {e.episode_id for e in shards[1].episodes()}
    assert a | b == set(ids)              # none lost
    assert not a & b                      # each indexed by exactly one shard
    assert len(b) > 0 and len(a) > len(b) # both took part; shard-0 took over shard-1's pending ones
    assert consumers[0].queue.lag()["pending"] == 0
