"""Issue 22, items 1-5: one robot's own credentials cannot deny the fleet service.

A real redis-server runs the ACL file `fleetloop credentials issue` writes; the write gate
(`fleetloop ingest`, fleetloop/ingest.py) and the dashboard are real HTTP servers. Each item is
attempted with a robot's own credentials, both ways it has: straight at Redis (refused: its user
has no write command) and through the gate (refused, or harmless). Readers are then given junk
written into Redis by a privileged identity (as an older robot build could have written it) and
answer 200, quickly.
"""
from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
import redis

from fleetloop import config
from fleetloop.buffer.queue import DEAD_FIELD_MAX, EpisodeQueueConsumer
from fleetloop.buffer.store import LocalStore
from fleetloop.dashboard.app import DashboardServer, build_app
from fleetloop.dashboard.auth import VIEWER, TokenTable
from fleetloop.ingest import (MAX_EVENT_BYTES, MAX_HEARTBEAT_BYTES, RATES, GatewayWrites, RedisAuth, Refused,
                              RobotGate, Throttled, make_app)

from test_credentials import _redis_major, acl_redis_server

pytestmark = [pytest.mark.skipif(_redis_major() < 7, reason="ACL selectors need Redis >= 7"),
              pytest.mark.timeout(180)]

MAX_ID = "18446744073709551615-18446744073709551615"
VIEW_TOKEN = "wall-viewer-token-0001"
VIEW = {"Authorization": f"Bearer {VIEW_TOKEN}"}


@pytest.fixture
def fleet(tmp_path):
    """(connect(user), passwords, gate_url): Redis with the issued ACL file and the write gate
    running on its own `ingest` identity."""
    with acl_redis_server(tmp_path, ["arm-1", "arm-2"]) as (connect, secrets_dir):
        passwords = json.loads((secrets_dir / "passwords.json").read_text())
        port = connect("ingest").connection_pool.connection_kwargs["port"]
        app = make_app(RobotGate(connect("ingest")), RedisAuth(f"redis://127.0.0.1:{port}/0"))
        with DashboardServer(app) as server:
            yield connect, passwords, server.url


def gateway(fleet, robot: str) -> GatewayWrites:
    _connect, passwords, url = fleet
    return GatewayWrites(url, robot, f"robot-{robot}", passwords[f"robot-{robot}"])


def event(robot: str, n: int) -> dict:
    eid = f"20260101T000000-{robot}-{n:06d}"
    return {"episode_id": eid, "manifest_key": f"episodes/{robot}/{eid}/manifest.json", "robot_id": robot,
            "task_id": "reach-v3", "ended_ns": str(time.time_ns()), "schema_version": "1"}


def status(robot: str, **over) -> dict:
    return {"robot_id": robot, "last_seen_ns": time.time_ns(), "task_id": "reach-v3", "policy_version": "v000001",
            "spool": {"episodes": 0, "bytes": 0}, **over}


def test_robot_user_has_no_write_command(fleet):
    """Items 1, 2, 4 straight at Redis: the max id, MAXLEN 0, XTRIM and SADD are all refused."""
    connect, _pw, _url = fleet
    robot, learner = connect("robot-arm-1"), connect("learner")
    for n in range(5):
        learner.xadd(config.EPISODE_STREAM, event("arm-2", n))
    learner.xadd(config.CONTROL_CHANNEL_PREFIX + "acks", {"robot_id": "arm-2", "command_id": "c", "result": "ok"})
    attempts = {
        "XADD the largest id to the episode stream": lambda: robot.xadd(config.EPISODE_STREAM, {"a": "b"}, id=MAX_ID),
        "XADD the largest id to the ack stream": lambda: robot.xadd(config.CONTROL_CHANNEL_PREFIX + "acks", {"a": "b"},
                                                                     id=MAX_ID),
        "XADD MAXLEN 0 on the episode stream": lambda: robot.xadd(config.EPISODE_STREAM, {"a": "b"}, maxlen=0),
        "XADD MAXLEN 0 on the ack stream": lambda: robot.xadd(config.CONTROL_CHANNEL_PREFIX + "acks", {"a": "b"},
                                                               maxlen=0),
        "XTRIM the episode stream": lambda: robot.xtrim(config.EPISODE_STREAM, maxlen=0),
        "a 1 MB XADD": lambda: robot.xadd(config.EPISODE_STREAM, {"manifest_json": "x" * (1 << 20)}),
        "SADD junk to the robot set": lambda: robot.sadd(config.HEARTBEAT_PREFIX + "all", *[f"fake-{i}" for i in range(100)]),
        "HSET its own heartbeat raw": lambda: robot.hset(config.HEARTBEAT_PREFIX + "arm-1", "status", "{}"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
        print(f"refused: {what}")
    assert learner.xlen(config.EPISODE_STREAM) == 5            # nothing emptied
    assert learner.xlen(config.CONTROL_CHANNEL_PREFIX + "acks") == 1
    assert not learner.exists(config.HEARTBEAT_PREFIX + "all")
    assert learner.xadd(config.EPISODE_STREAM, event("arm-2", 9))  # the stream still takes events


def test_gate_generates_ids_and_never_trims(fleet):
    """Items 1 and 2 through the gate: a robot cannot pick the id or a cap; every announce works."""
    connect, passwords, url = fleet
    learner, arm = connect("learner"), gateway(fleet, "arm-1")
    for n in range(5):
        learner.xadd(config.EPISODE_STREAM, event("arm-2", n))
    for extra in ({"id": MAX_ID}, {"maxlen": "0"}, {"MAXLEN": "0"}):
        with pytest.raises(Refused) as e:
            arm.episode({**event("arm-1", 0), **extra})
        assert e.value.status == 422 and "unknown event fields" in e.value.detail
    ids = [arm.episode(event("arm-1", n)) for n in range(3)]
    assert learner.xlen(config.EPISODE_STREAM) == 8
    assert all(int(i.split("-")[0]) <= time.time() * 1000 + 1000 for i in ids)  # Redis's clock, not a robot's
    assert arm.ack("c-1", "applied") and learner.xlen(config.CONTROL_CHANNEL_PREFIX + "acks") == 1


def test_gate_checks_identity(fleet):
    connect, passwords, url = fleet
    arm1 = gateway(fleet, "arm-1")
    with pytest.raises(Refused) as e:   # another robot's episode
        arm1.episode(event("arm-2", 0))
    assert e.value.status == 403
    with pytest.raises(Refused) as e:   # its own id, someone else's prefix
        arm1.episode({**event("arm-1", 0), "manifest_key": "episodes/arm-2/x/manifest.json"})
    assert e.value.status == 403
    # its own credentials on another robot's route, and a wrong password: 401, nothing written
    for user, pw, robot in (("robot-arm-1", passwords["robot-arm-1"], "arm-2"), ("robot-arm-1", "guess", "arm-1")):
        r = httpx.put(f"{url}/v1/robots/{robot}/heartbeat", json=status(robot),
                      headers={"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()})
        assert r.status_code == 401, r.text
    r = httpx.put(f"{url}/v1/robots/arm-1/heartbeat", json=status("arm-1"))
    assert r.status_code == 401
    assert not connect("learner").exists(config.HEARTBEAT_PREFIX + "arm-2", config.HEARTBEAT_PREFIX + "all")


def test_gate_bounds_size_and_rate(fleet):
    """Item 3: a 100 MB event is refused before it is read; an event over MAX_EVENT_BYTES is
    refused; a robot's burst beyond its bucket gets 429 and adds nothing."""
    connect, passwords, url = fleet
    learner, arm = connect("learner"), gateway(fleet, "arm-1")
    auth = {"Authorization": "Basic " + base64.b64encode(f"robot-arm-1:{passwords['robot-arm-1']}".encode()).decode(),
            "Content-Type": "application/json"}
    big = b'{"manifest_json": "' + b"x" * (100 << 20) + b'"}'
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/robots/arm-1/episodes", content=big, headers=auth, timeout=60)
    took = time.perf_counter() - t0
    assert r.status_code == 413, r.text
    print(f"100 MB event refused in {took:.2f}s")

    def chunks():  # the same without a Content-Length: counted while read, cut at the limit
        yield b'{"manifest_json": "'
        for _ in range(100):
            yield b"x" * (1 << 20)
        yield b'"}'
    r = httpx.post(f"{url}/v1/robots/arm-1/episodes", content=chunks(), headers=auth, timeout=60)
    assert r.status_code == 413, r.text
    with pytest.raises(Refused) as e:
        arm._call("POST", "episodes", {**event("arm-1", 0), "manifest_json": "x" * MAX_EVENT_BYTES})
    assert e.value.status == 413
    # the uploader's path leaves the manifest copy out instead (fit_event): accepted
    assert arm.episode({**event("arm-1", 1), "manifest_json": "x" * MAX_EVENT_BYTES})
    with pytest.raises(Refused):
        arm.heartbeat(status("arm-1", upload_error="x" * MAX_HEARTBEAT_BYTES))
    assert learner.xlen(config.EPISODE_STREAM) == 1

    rate, burst = RATES["episode"]
    accepted, throttled = 1, 0
    t0 = time.perf_counter()
    for n in range(2, burst + 100):
        try:
            arm.episode(event("arm-1", n))
            accepted += 1
        except Throttled:
            throttled += 1
    elapsed = time.perf_counter() - t0
    # at most the bucket (burst, less the one taken above) plus what refilled meanwhile
    assert accepted <= burst + rate * elapsed + 1 and throttled > 0, (accepted, throttled, elapsed)
    assert learner.xlen(config.EPISODE_STREAM) == accepted
    print(f"{accepted} accepted, {throttled} throttled in {elapsed:.2f}s")
    # another robot is not throttled by arm-1's flood
    assert gateway(fleet, "arm-2").episode(event("arm-2", 0))


def test_dead_letter_keeps_a_bounded_copy(redis_client):
    """Item 3: an oversized event (written by anyone able to) is dead-lettered, not copied whole."""
    big = "x" * (8 << 20)
    redis_client.xadd(config.EPISODE_STREAM, {"episode_id": "e", "manifest_key": "k", "manifest_json": big})
    q = EpisodeQueueConsumer(redis_client, consumer="c")
    (d,) = q.poll(count=1, block_ms=100)
    q.dead_letter(d, "bad-event", "too big")
    ((_id, fields),) = redis_client.xrange(config.DEAD_LETTER_STREAM)
    assert len(fields[b"manifest_json"]) == DEAD_FIELD_MAX
    assert fields[b"dead_truncated"] == f"manifest_json:{len(big)}".encode()
    assert sum(len(v) for v in fields.values()) < 3 * DEAD_FIELD_MAX
    assert q.lag()["pending"] == 0


@pytest.fixture
def dashboard(fleet, tmp_path):
    connect, _pw, _url = fleet
    tokens = TokenTable()
    tokens.add("wall", VIEW_TOKEN, VIEWER)
    app, _dash = build_app(connect("dashboard"), LocalStore(tmp_path / "store"), tokens, offline_after_s=5.0)
    with DashboardServer(app) as server:
        yield server.url


READS = ("/api/robots", "/api/fleet", "/metrics", "/api/robots/arm-1")


def test_untrusted_heartbeats_never_break_a_reader(fleet, dashboard):
    """Item 5: through the gate such heartbeats are refused (422); written straight into Redis by
    a privileged identity, every reader still answers 200 and shows the robot offline."""
    connect, _pw, _url = fleet
    arm = gateway(fleet, "arm-1")
    arm.heartbeat(status("arm-1"))
    bad = {"lone surrogate in task_id": status("arm-1", task_id="\ud800"),
           "lone surrogate in policy_version": status("arm-1", policy_version="\udfff"),
           'last_seen_ns "soon"': status("arm-1", last_seen_ns="soon"),
           "Infinity in a swap figure": status("arm-1", swap={"publish_to_loaded_s": {"p50": float("inf")}})}
    for what, hb in bad.items():
        with pytest.raises(Refused) as e:
            arm._call("PUT", "heartbeat", hb)
        assert e.value.status == 422, what
    admin = connect("fleetloop-admin")
    raw = {what: json.dumps(hb) for what, hb in bad.items()}  # json.dumps writes \ud800 and Infinity
    raw.update({"not JSON": "{", "a list": "[1]", "a string count": json.dumps(status("arm-1", spool={"episodes": "x"})),
                "a huge nesting": "[" * 5000 + "]" * 5000, "last_seen_ns 1e400": '{"last_seen_ns": 1e400}',
                "a swap phase that is text": json.dumps(status("arm-1", swap={"publish_to_loaded_s": "fast"})),
                "a spool that is a list": json.dumps(status("arm-1", spool=[1, 2]))})
    fresh = {"lone surrogate in task_id", "lone surrogate in policy_version", "Infinity in a swap figure",
             "a string count", "a swap phase that is text", "a spool that is a list"}  # the rest show offline
    for what, text in raw.items():
        admin.hset(config.HEARTBEAT_PREFIX + "arm-1", "status", text)
        for path in READS:
            r = httpx.get(dashboard + path, headers=VIEW, timeout=30)
            assert r.status_code == 200, (what, path, r.text[:300])
        robots = httpx.get(dashboard + "/api/robots", headers=VIEW, timeout=60).json()["robots"]
        assert [(x["robot_id"], x["online"]) for x in robots] == [("arm-1", what in fresh)], what


def test_robot_detail_shows_the_guidance_its_heartbeat_reports(fleet, dashboard):
    """The heartbeat's `guidance` (what the robot's policy runs with) survives the validated reader:
    the robot's detail shows it; one that is not an object shows as null."""
    connect, _pw, _url = fleet
    arm = gateway(fleet, "arm-1")
    guidance = {"indicator": "positive", "beta": 1.5}
    arm.heartbeat(status("arm-1", guidance=guidance))
    r = httpx.get(dashboard + "/api/robots/arm-1", headers=VIEW, timeout=30)
    assert r.status_code == 200 and r.json()["guidance"] == guidance, r.text[:300]
    arm.heartbeat(status("arm-1", guidance="fast"))
    assert httpx.get(dashboard + "/api/robots/arm-1", headers=VIEW, timeout=30).json()["guidance"] is None


def test_junk_robot_set_keeps_readers_fast(fleet, dashboard):
    """Item 4: 50,000 junk members in the robot set (the robot itself can no longer SADD them:
    test_robot_user_has_no_write_command) cost the readers little: invalid ids are ignored, only
    robots with a heartbeat are listed."""
    connect, _pw, _url = fleet
    gateway(fleet, "arm-1").heartbeat(status("arm-1"))
    admin = connect("fleetloop-admin")
    junk = [f"fake-{i:05d}" for i in range(25_000)] + [f"bad id {i}\ud800".encode("utf-8", "surrogatepass")
                                                      for i in range(25_000)]
    for i in range(0, len(junk), 5000):
        admin.sadd(config.HEARTBEAT_PREFIX + "all", *junk[i:i + 5000])
    for path in READS:
        t0 = time.perf_counter()
        r = httpx.get(dashboard + path, headers=VIEW, timeout=60)
        took = time.perf_counter() - t0
        print(f"{path}: {took:.2f}s, {len(r.content)} bytes")
        assert r.status_code == 200 and took < 5.0 and len(r.content) < 200_000, (path, took, len(r.content))
    assert [x["robot_id"] for x in httpx.get(dashboard + "/api/robots", headers=VIEW, timeout=60).json()["robots"]] == ["arm-1"]


def _record(spool, robot: str, steps: int, chunk_steps: int) -> str:
    from fleetloop.actor.recorder import EpisodeRecorder
    from fleetloop.proto.v1 import episode_pb2 as pb
    rec = EpisodeRecorder(spool, robot, chunk_steps=chunk_steps)
    rec.start("reach-v3", "reach", "v1")
    for _ in range(steps):
        rec.add_step(pb.Step(state=[0.0], action=[0.1]))
    eid, _n = rec.end(pb.OUTCOME_SUCCESS)
    assert rec.flush()
    return eid


def test_long_episode_is_announced_without_its_manifest_copy(tmp_path, redis_client):
    """The 64 KiB event limit never loses an episode: a manifest too long to ride along stays
    out of the event and the consumer reads the stored one."""
    from fleetloop.actor.spool import Spool
    from fleetloop.actor.uploader import Uploader
    from fleetloop.buffer.consumer import DataConsumer
    from fleetloop.buffer.index import FrameIndex
    spool, store = Spool(tmp_path / "spool"), LocalStore(tmp_path / "store")
    eid = _record(spool, "robot-long", steps=400, chunk_steps=1)  # 400 chunk refs: a ~100 KB manifest
    Uploader(spool, store, redis_client).drain_once()
    ((_id, fields),) = redis_client.xrange(config.EPISODE_STREAM)
    assert b"manifest_json" not in fields and sum(len(v) for v in fields.values()) < MAX_EVENT_BYTES
    index = FrameIndex()
    consumer = DataConsumer(store, redis_client, index, consumer_name="c")
    deadline = time.monotonic() + 20
    while eid not in index and time.monotonic() < deadline:
        consumer.poll_once(block_ms=100)
    assert index.get(eid).num_steps == 400


def test_an_event_the_gate_refuses_is_set_aside_not_retried_forever(tmp_path, redis_client):
    """A write the gate will never take (here: an entry recorded under another robot's id than the
    daemon's) puts that spool entry aside; the next one uploads."""
    from fleetloop.actor.spool import Spool
    from fleetloop.actor.uploader import Uploader
    from fleetloop.ingest import LocalWrites
    spool, store = Spool(tmp_path / "spool"), LocalStore(tmp_path / "store")
    foreign = _record(spool, "robot-other", steps=3, chunk_steps=8)
    uploader = Uploader(spool, store, redis_client, writes=LocalWrites(redis_client, "robot-me"))
    assert uploader.drain_once() == 0
    assert foreign not in spool.sealed() and spool.backlog()["damaged_episodes"] == 1
    own = _record(spool, "robot-me", steps=3, chunk_steps=8)
    assert uploader.drain_once() == 1 and redis_client.xlen(config.EPISODE_STREAM) == 1
    assert spool.sealed() == [] and own
