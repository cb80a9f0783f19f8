"""The episode path, robot to index: recorder -> spool -> store -> Redis stream -> consumer."""
import threading
import time

import numpy as np
import pytest

from fleetloop.actor.recorder import EpisodeRecorder
from fleetloop.actor.spool import Spool
from fleetloop.actor.synthetic import SyntheticActor
from fleetloop.actor.uploader import Uploader
from fleetloop.buffer.codec import EncodedChunk, EpisodeRejected, Limits, commit_episode, encode_chunk, encode_image, manifest_key
from fleetloop.buffer.consumer import DataConsumer
from fleetloop.buffer.index import FrameIndex, PayloadCache
from fleetloop.buffer.queue import EpisodeAnnouncer
from fleetloop.buffer.store import LocalStore, S3Store
from fleetloop import config
from fleetloop.proto.v1 import episode_pb2 as pb


def drain(consumer, until, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until():
        consumer.poll_once(block_ms=50)
    return until()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_episodes_arrive_indexed_once(backend, tmp_path, redis_server, redis_client, request):
    if backend == "local":
        store_uri = (tmp_path / "store").as_uri()
    else:
        s3 = request.getfixturevalue("s3_server")
        for k, v in s3.env().items():
            request.getfixturevalue("monkeypatch").setenv(k, v)
        store_uri = "s3://ingest-test/fleet"
    actor = SyntheticActor("robot-a", store_uri, redis_server.url, str(tmp_path / "spool"))
    ids = actor.record(5, 64 * 1024)
    assert actor.wait_drained(30)
    actor.close()
    from fleetloop.buffer.store import open_store
    index = FrameIndex()
    consumer = DataConsumer(open_store(store_uri), redis_client, index)
    assert drain(consumer, lambda: len(index) == 5)
    assert sorted(e.episode_id for e in index.episodes()) == sorted(ids)
    e = index.get(ids[0])
    assert e.num_steps == 50 and e.intervention[10:15].all() and not e.intervention[:10].any()
    assert e.policy_version == "v000000" and e.outcome == "success" and e.source == "online"
    # payloads are lazy: images come from the store on demand, through a bounded cache
    cache = PayloadCache(open_store(store_uri), max_bytes=100 * 1024)
    img = cache.images(e, 37)["front"]
    assert img.ndim == 3 and img.dtype == np.uint8
    assert cache.bytes <= 100 * 1024 or len(cache._chunks) == 1
    # a redelivered event (at-least-once) is absorbed: indexed exactly once
    EpisodeAnnouncer(redis_client).announce(pb.EpisodeEvent(episode_id=ids[0], manifest_key=e.manifest_key))
    consumer.poll_once(block_ms=200)
    assert len(index) == 5 and consumer.stats.duplicates == 1


def test_intervention_segments_in_manifest(tmp_path, redis_client):
    spool = Spool(tmp_path / "spool")
    rec = EpisodeRecorder(spool, "robot-b", chunk_steps=7)
    rec.start("reach-v3", "reach", "v1")
    for t in range(30):
        if t == 5:
            rec.annotate_intervention("alice", "operator-request")
        rec.add_step(pb.Step(state=[0.0], action=[0.1], intervention=5 <= t < 12 or t >= 25))
    eid, n = rec.end(pb.OUTCOME_FAILURE, pb.LABEL_SOURCE_OPERATOR, "alice")
    assert rec.flush()
    store = LocalStore(tmp_path / "store")
    Uploader(spool, store, redis_client).drain_once()
    from fleetloop.buffer.codec import read_episode
    ep = read_episode(store, manifest_key("robot-b", eid))
    segs = [(s.start_step, s.end_step, s.operator, s.reason) for s in ep.manifest.interventions]
    assert segs == [(5, 12, "alice", "operator-request"), (25, 30, "", "")]
    assert len(ep.manifest.chunks) == 5 and ep.manifest.outcome == pb.OUTCOME_FAILURE


# ---- bad input: each gets a clear reason on the dead-letter stream, nothing else is lost ----

def _good_episode(store, robot, eid, steps=12, action=None, images=False):
    m = pb.EpisodeManifest(episode_id=eid, robot_id=robot, task_id="t", instruction="i", policy_version="v1",
                           kind=pb.EPISODE_KIND_ROLLOUT, num_steps=steps)
    img = [encode_image(np.full((8, 8, 3), 7, np.uint8))] if images else []
    chunk = [pb.Step(index=i, state=[0.0, 1.0], action=action if action is not None else [0.5, -0.5], images=img)
             for i in range(steps)]
    return commit_episode(store, m, [(encode_chunk(eid, 0, chunk[:6]), 6), (encode_chunk(eid, 1, chunk[6:]), steps - 6)])


def test_bad_inputs_dead_lettered_with_reason(tmp_path, redis_client):
    store = LocalStore(tmp_path / "store")
    ann = EpisodeAnnouncer(redis_client)
    keys = {}
    keys["good-1"] = _good_episode(store, "r", "good-1")
    # corrupt chunk: bytes replaced (checksum no longer matches)
    keys["corrupt"] = _good_episode(store, "r", "corrupt")
    store.put("episodes/r/corrupt/chunk-00001.flc", b"\xff\xfe garbage")
    # wrong checksum in the manifest
    keys["badsum"] = _good_episode(store, "r", "badsum")
    raw = store.get(keys["badsum"]).replace(b'"steps_sha256": "', b'"steps_sha256": "0', 1)
    store.put(keys["badsum"], raw)
    # unknown schema version
    keys["schema"] = _good_episode(store, "r", "schema")
    store.put(keys["schema"], store.get(keys["schema"]).replace(b'"schema_version": 1', b'"schema_version": 99'))
    # NaN in actions
    keys["nan"] = _good_episode(store, "r", "nan", action=[float("nan"), 0.0])
    # oversized
    keys["big"] = _good_episode(store, "r", "big", steps=300)
    # manifest pointing at a missing chunk
    keys["missing"] = _good_episode(store, "r", "missing")
    store.delete("episodes/r/missing/chunk-00000.flc")
    # an image chunk cut short (size no longer matches the manifest)
    keys["truncated"] = _good_episode(store, "r", "truncated", images=True)
    store.put("episodes/r/truncated/chunk-00001.flc", store.get("episodes/r/truncated/chunk-00001.flc")[:-7])
    # a manifest that is not JSON at all
    store.put("episodes/r/notjson/manifest.json", b"\x00\x01 not json")
    keys["notjson"] = "episodes/r/notjson/manifest.json"
    keys["good-2"] = _good_episode(store, "r", "good-2")
    for eid, key in keys.items():
        ann.announce(pb.EpisodeEvent(episode_id=eid, manifest_key=key, robot_id="r", task_id="t"))
    redis_client.xadd(config.EPISODE_STREAM, {"garbage": "1"})  # malformed event

    index = FrameIndex()
    consumer = DataConsumer(store, redis_client, index, limits=Limits(max_steps=200))
    drain(consumer, lambda: consumer.stats.indexed + consumer.stats.dead_lettered >= len(keys) + 1)
    assert sorted(e.episode_id for e in index.episodes()) == ["good-1", "good-2"]
    dead = {f[b"episode_id"].decode() if b"episode_id" in f else "event": f[b"dead_reason"].decode()
            for _id, f in redis_client.xrange(config.DEAD_LETTER_STREAM)}
    assert dead == {"corrupt": "checksum-mismatch", "badsum": "checksum-mismatch", "schema": "unknown-schema-version",
                    "nan": "non-finite", "big": "oversized", "missing": "missing-chunk", "notjson": "bad-manifest",
                    "truncated": "checksum-mismatch",
                    "event": "bad-event"}
    details = [f[b"dead_detail"].decode() for _id, f in redis_client.xrange(config.DEAD_LETTER_STREAM)]
    assert all(len(d) > 10 for d in details)  # a human-readable reason, not just a code
    # everything was acked: nothing left pending, nothing redelivered
    assert consumer.queue.lag()["pending"] == 0


def test_corrupt_chunk_bytes_that_still_match_manifest(tmp_path, redis_client):
    """A chunk whose sha matches but does not parse (writer bug) is 'corrupt-chunk'."""
    store = LocalStore(tmp_path / "store")
    m = pb.EpisodeManifest(episode_id="weird", robot_id="r", task_id="t", num_steps=1, kind=pb.EPISODE_KIND_ROLLOUT)
    key = commit_episode(store, m, [(EncodedChunk(b"\x0a\xff\xff\xff", b""), 1)])
    EpisodeAnnouncer(redis_client).announce(pb.EpisodeEvent(episode_id="weird", manifest_key=key))
    index = FrameIndex()
    consumer = DataConsumer(store, redis_client, index)
    drain(consumer, lambda: consumer.stats.dead_lettered == 1)
    assert consumer.stats.dead_reasons == {"corrupt-chunk": 1}


def test_spool_full_drop_new_keeps_waiting_episodes(tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=150_000, on_full="drop-new")
    rec = EpisodeRecorder(spool, "r", chunk_steps=10)
    for k in range(3):
        rec.start("t", "i", "v1")
        for _ in range(20):
            rec.add_step(pb.Step(state=[0.0], action=[0.0], images=[pb.Image(camera="c", encoding="raw", data=b"x" * 3000)]))
        rec.end()
        rec.flush()
    assert len(spool.sealed()) == 2 and spool.dropped_episodes == 1
    assert spool.bytes <= spool.max_bytes


def test_spool_full_drop_oldest_keeps_recording(tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=150_000, on_full="drop-oldest")
    rec = EpisodeRecorder(spool, "r", chunk_steps=10)
    ids = []
    for k in range(3):
        ids.append(rec.start("t", "i", "v1"))
        for _ in range(20):
            rec.add_step(pb.Step(state=[0.0], action=[0.0], images=[pb.Image(camera="c", encoding="raw", data=b"x" * 3000)]))
        rec.end()
        rec.flush()
    assert spool.sealed() == ids[1:] and spool.dropped_episodes == 1


def test_spool_rejects_bad_config(tmp_path):
    with pytest.raises(ValueError, match="on_full"):
        Spool(tmp_path, on_full="explode")
    with pytest.raises(ValueError, match="max_bytes"):
        Spool(tmp_path, max_bytes=0)


def test_image_chunk_bitflip_caught_on_first_read(tmp_path, redis_client):
    """Images are verified lazily: same-size corruption is caught when first read, as a clear
    EpisodeRejected the sampler can act on."""
    store = LocalStore(tmp_path / "store")
    key = _good_episode(store, "r", "flip", images=True)
    raw = bytearray(store.get("episodes/r/flip/chunk-00000.flc"))
    raw[-5] ^= 0xFF  # inside the image section
    store.put("episodes/r/flip/chunk-00000.flc", bytes(raw))
    EpisodeAnnouncer(redis_client).announce(pb.EpisodeEvent(episode_id="flip", manifest_key=key))
    index = FrameIndex()
    consumer = DataConsumer(store, redis_client, index)
    drain(consumer, lambda: len(index) == 1)
    cache = PayloadCache(store)
    assert cache.images(index.get("flip"), 8)["front"].shape == (8, 8, 3)  # second chunk is intact
    with pytest.raises(EpisodeRejected, match="checksum-mismatch"):
        cache.images(index.get("flip"), 2)


def test_recovery_drops_a_chunk_cut_short_by_a_crash(tmp_path, redis_client):
    from fleetloop.actor.uploader import recover_unsealed
    spool = Spool(tmp_path / "spool")
    rec = EpisodeRecorder(spool, "robot-x", chunk_steps=5)
    eid = rec.start("t", "i", "v1")
    for t in range(12):  # two full chunks reach the disk, two steps stay in memory
        rec.add_step(pb.Step(state=[float(t)], action=[0.0], intervention=t >= 8))
    assert rec.flush()
    chunk1 = spool.path(eid) / "chunk-00001.flc"
    chunk1.write_bytes(chunk1.read_bytes()[:-3])  # the crash hit while chunk 1 was being written
    # (the process dies here: no end.json)
    assert recover_unsealed(spool) == [eid]
    store = LocalStore(tmp_path / "store")
    Uploader(spool, store, redis_client).drain_once()
    from fleetloop.buffer.codec import read_episode
    ep = read_episode(store, manifest_key("robot-x", eid))
    assert ep.manifest.incomplete and ep.manifest.num_steps == 5 and ep.states[:, 0].tolist() == [0, 1, 2, 3, 4]
