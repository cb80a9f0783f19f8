"""Committed episodes are write-once (issue 22, "a robot may overwrite its own committed
episodes"): the store's put_new is a conditional PUT (If-None-Match: *) on S3 -- moto's server
here -- and an exclusive link on a local directory; the uploader writes every episode object that
way, so it never overwrites one, a re-upload after a crash still completes, and the AWS bucket
policy `fleetloop credentials issue` writes (every PUT under episodes/ must carry the header) can
be applied without breaking a single robot."""
from __future__ import annotations

import json
import uuid

import pytest

from fleetloop.actor.recorder import EpisodeRecorder
from fleetloop.actor.spool import Spool
from fleetloop.actor.uploader import Uploader
from fleetloop.buffer.codec import manifest_key, read_episode
from fleetloop.buffer.store import LocalStore, S3Store
from fleetloop.credentials import issue
from fleetloop import config
from fleetloop.proto.v1 import episode_pb2 as pb


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return LocalStore(tmp_path / "store")
    return S3Store(f"once-{uuid.uuid4().hex[:8]}", "fleet", request.getfixturevalue("s3_settings"))


def test_put_new_never_overwrites(store):
    assert store.put_new("episodes/robot-1/e1/chunk-00000.flc", b"committed")
    assert not store.put_new("episodes/robot-1/e1/chunk-00000.flc", b"rewritten")
    assert store.get("episodes/robot-1/e1/chunk-00000.flc") == b"committed"
    assert [k for k in store.list("episodes/") if "e1" in k] == ["episodes/robot-1/e1/chunk-00000.flc"]


def record(spool: Spool, robot: str = "robot-1") -> str:
    rec = EpisodeRecorder(spool, robot, chunk_steps=4)
    rec.start("reach-v3", "reach", "v000001")
    for t in range(10):
        rec.add_step(pb.Step(state=[float(t)], action=[0.1]))
    eid, _n = rec.end(pb.OUTCOME_SUCCESS, pb.LABEL_SOURCE_ROBOT, "")
    assert rec.flush()
    return eid


def test_the_uploader_never_overwrites_a_committed_episode(store, tmp_path, redis_client):
    spool = Spool(tmp_path / "spool")
    eid = record(spool)
    key = manifest_key("robot-1", eid)
    # Something is already committed under this episode's manifest key (an earlier upload cut
    # short after its commit point, or an attempt to replace it): the uploader keeps it.
    store.put_new(key, b"{}")
    assert Uploader(spool, store, redis_client).drain_once() == 1
    assert store.get(key) == b"{}"  # not overwritten
    (event,) = redis_client.xrange(config.EPISODE_STREAM)
    assert event[1][b"manifest_json"] == b"{}"  # the committed one is what was announced
    assert spool.sealed() == []

    # A normal episode: uploaded once; a second upload of the same objects changes nothing.
    eid2 = record(spool)
    assert Uploader(spool, store, redis_client).drain_once() == 1
    ep = read_episode(store, manifest_key("robot-1", eid2))
    chunk = ep.manifest.chunks[0].key
    before = store.get(chunk)
    assert not store.put_new(chunk, b"x" * len(before)) and store.get(chunk) == before


def test_issue_writes_the_write_once_bucket_policy(tmp_path):
    issue(tmp_path / "secrets", ["robot-1"], bucket="fleet", prefix="prod", keys=False)
    doc = json.loads((tmp_path / "secrets" / "s3" / "bucket-policy-episodes-write-once.json").read_text())
    (st,) = doc["Statement"]
    assert (st["Effect"], st["Action"], st["Resource"]) == ("Deny", "s3:PutObject", "arn:aws:s3:::fleet/prod/episodes/*")
    assert st["Condition"] == {"Null": {"s3:if-none-match": "true"}}


def test_an_episode_rewritten_after_ingest_is_refused_on_rebuild(tmp_path):
    """Where the store does not enforce write-once (MinIO without object lock, a file store), a
    robot can replace its committed episode. The first ingest recorded the episode's digest in a
    hash the robot's ACL cannot reach; a rebuilt index (a learner restart) refuses the rewrite."""
    import redis as redis_lib

    from fleetloop.buffer.consumer import DataConsumer
    from fleetloop.buffer.index import FrameIndex
    from fleetloop.buffer.ledger import LEDGER_KEY
    from fleetloop.buffer.reconcile import Reconciler
    from test_credentials import _redis_major, acl_redis_server
    if _redis_major() < 7:
        pytest.skip("ACL selectors need Redis >= 7")
    with acl_redis_server(tmp_path, ["robot-1"]) as (connect, _secrets):
        robot, learner = connect("robot-robot-1"), connect("learner")
        store = LocalStore(tmp_path / "store")
        spool = Spool(tmp_path / "spool")
        eid = record(spool)
        # the announcement goes through the write gate in production (robots cannot XADD); a trusted
        # client stands in for it here: what matters is the robot's own reach into the ledger below
        assert Uploader(spool, store, learner).drain_once() == 1
        index = FrameIndex()
        consumer = DataConsumer(store, learner, index)
        while consumer.poll_once(block_ms=50):
            pass
        assert index.get(eid).outcome == "success"

        # The robot replaces its committed manifest (a plain PUT its S3 policy allows): failure now.
        key = manifest_key("robot-1", eid)
        m = read_episode(store, key).manifest
        m.outcome = pb.OUTCOME_FAILURE
        from fleetloop.buffer.codec import manifest_to_bytes
        store.put(key, manifest_to_bytes(m))
        for attempt in (lambda: robot.hset(LEDGER_KEY, eid, "x"), lambda: robot.hdel(LEDGER_KEY, eid),
                        lambda: robot.delete(LEDGER_KEY)):
            with pytest.raises(redis_lib.exceptions.NoPermissionError):
                attempt()

        rebuilt = FrameIndex()  # the learner restarts: its index is rebuilt from the store
        rec = Reconciler(store, rebuilt, name="learner", client=learner)
        assert rec.scan("start") == 0 and rec.rejected_total == 1 and eid not in rebuilt
        assert Reconciler(store, FrameIndex()).scan("start") == 1  # without the ledger it would be taken
