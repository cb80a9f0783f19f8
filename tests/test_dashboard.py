"""The operator dashboard's API against a real Redis, a file:// store, real actor daemons on the
gRPC robot link and the real policy registry: control commands reach the robot, an operator
takeover ends up as a recorded intervention segment, labels persist, steering moves the fleet;
every write needs an operator token and is audited; bad input gets a clear 4xx, never a 500."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from promtext import scrape

from fleetloop import config
from fleetloop.actor.daemon import ActorDaemon, FixedPolicySource
from fleetloop.actor.link import RobotLinkClient
from fleetloop.actor.spool import Spool
from fleetloop.buffer.codec import read_manifest
from fleetloop.buffer.consumer import DataConsumer
from fleetloop.buffer.index import FrameIndex
from fleetloop.buffer.store import LocalStore
from fleetloop.dashboard.app import build_app
from fleetloop.dashboard.auth import OPERATOR, VIEWER, TokenConfigError, TokenTable, load_tokens
from fleetloop.dashboard.service import Dashboard
from fleetloop.policy.interface import Observation
from fleetloop.release.registry import PolicyRegistry
from fleetloop.proto.v1 import episode_pb2 as pb
from fleetloop.services import free_port

OP_TOKEN = "alice-operator-token-0001"
VIEWER_TOKEN = "wall-viewer-token-0001"
OP = {"Authorization": f"Bearer {OP_TOKEN}"}
VIEW = {"Authorization": f"Bearer {VIEWER_TOKEN}"}


class ConstantPolicy:
    horizon, action_dim = 4, 4

    def __init__(self, version: str = "v000007"):
        self.version = version

    def act(self, obs, instruction, indicator=None):
        return np.full((4, 4), 0.25, np.float32)


def obs(t: int = 0) -> Observation:
    img = np.zeros((32, 48, 3), np.uint8)
    img[:, :, 0] = t * 10 % 255
    img[4:12, (t * 3) % 40:(t * 3) % 40 + 8] = 255
    return Observation(images={"front": img}, state=np.arange(6, dtype=np.float32) + t)


def tokens() -> TokenTable:
    t = TokenTable()
    t.add("alice", OP_TOKEN, OPERATOR)
    t.add("wall", VIEWER_TOKEN, VIEWER)
    return t


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def daemons(tmp_path, store, redis_client):
    """make(robot_id, version) -> a started ActorDaemon on the real robot link."""
    started = []

    def make(robot_id: str = "robot-1", version: str = "v000007") -> ActorDaemon:
        d = ActorDaemon(robot_id, store, redis_client, Spool(tmp_path / f"spool-{robot_id}"),
                        FixedPolicySource(ConstantPolicy(version)), grpc_address="127.0.0.1:0",
                        heartbeat_interval_s=0.2, episode_idle_timeout_s=30).start()
        started.append(d)
        channel = config.CONTROL_CHANNEL_PREFIX + robot_id  # commands need the daemon listening
        wait_for(lambda: redis_client.pubsub_numsub(channel)[0][1] >= 1, what=f"{robot_id} subscribed")
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def api(redis_client, store):
    app, dash = build_app(redis_client, store, tokens(), offline_after_s=1.0)
    with TestClient(app) as client:
        client.dash = dash
        yield client


def record_episode(link: RobotLinkClient, task: str = "reach-v3", steps: int = 6,
                   outcome=pb.OUTCOME_SUCCESS, intervene: tuple[int, int] | None = None) -> str:
    eid = link.start_episode(task, f"do {task}")
    for t in range(steps):
        if intervene and t == intervene[0]:
            link.begin_intervention("bob", "drift")
        if intervene and t == intervene[1]:
            link.end_intervention()
        human = bool(intervene) and intervene[0] <= t < intervene[1]
        chunk = link.act(obs(t))
        link.report_step(obs(t), [0.9, 0, 0, 0] if human else chunk[0], intervention=human, policy_chunk=chunk)
    link.end_episode(outcome)
    return eid


# ---- the flow that crosses the actor: operator takeover -> recorded intervention -------------

def test_operator_takeover_becomes_a_recorded_intervention_segment(api, daemons, redis_client, store):
    daemon = daemons("robot-1")
    link = RobotLinkClient(daemon.address, "robot-1")
    eid = link.start_episode("reach-v3", "reach the goal")
    for t in range(4):
        link.report_step(obs(t), link.act(obs(t))[0], intervention=False)
    assert not link.takeover_requested

    r = api.post("/api/robots/robot-1/takeover", headers=OP, json={"reason": "arm drifting"})
    assert r.status_code == 200, r.text
    assert r.json()["ack"] == "applied" and r.json()["receivers"] == 1
    assert daemon.takeover_requested

    # The robot stack learns of it on its next link call and hands control to a human.
    link.report_step(obs(4), link.act(obs(4))[0], intervention=False)
    assert link.takeover_requested
    link.begin_intervention("alice", "operator-request")
    for t in range(5, 9):
        link.report_step(obs(t), [0.5, 0, 0, 0], intervention=True)
    link.end_intervention()
    assert not daemon.takeover_requested  # the human handed back: request served
    for t in range(9, 11):
        link.report_step(obs(t), link.act(obs(t))[0], intervention=False)
    link.end_episode(pb.OUTCOME_SUCCESS)

    # The dashboard's own index (group "dashboard") shows the segment with who and why...
    assert api.dash.wait_indexed(eid, timeout=15)
    ep = api.get(f"/api/episodes/{eid}", headers=VIEW).json()
    assert ep["has_intervention"] and ep["intervention_steps"] == 4
    assert ep["segments"] == [{"start_step": 5, "end_step": 9, "operator": "alice", "reason": "operator-request"}]
    # ...and the learner's DataConsumer (its own group) gets the same episode and segment.
    index = FrameIndex()
    consumer = DataConsumer(store, redis_client, index, consumer_name="learner-test")
    wait_for(lambda: consumer.poll_once(block_ms=50) is not None and eid in index, what="learner index")
    entry = index.get(eid)
    assert entry.intervention.tolist() == [5 <= t < 9 for t in range(11)]
    segs = read_manifest(store, entry.manifest_key).interventions
    assert [(s.start_step, s.end_step, s.operator) for s in segs] == [(5, 9, "alice")]

    # The audit log says who did it, what, to which robot, and that the robot applied it.
    entries = api.get("/api/audit", headers=VIEW).json()["entries"]
    take = next(e for e in entries if e["action"] == "robot.takeover")
    assert take["who"] == "alice" and take["target"] == "robot-1" and take["status"] == 200
    assert take["result"] == "ok" and json.loads(take["detail"])["ack"] == "applied"
    assert take["params"] == {"reason": "arm drifting"}
    # The filter finds it.
    found = api.get("/api/episodes", headers=VIEW, params={"has_intervention": "true", "robot_id": "robot-1"}).json()
    assert [e["episode_id"] for e in found["episodes"]] == [eid]


def test_pause_resume_release_reach_the_robot(api, daemons):
    daemon = daemons("robot-1")
    link = RobotLinkClient(daemon.address, "robot-1")
    link.start_episode("push-v3", "push")
    for action, check in (("pause", lambda: daemon.paused), ("resume", lambda: not daemon.paused),
                          ("takeover", lambda: daemon.takeover_requested),
                          ("release", lambda: not daemon.takeover_requested)):
        r = api.post(f"/api/robots/robot-1/{action}", headers=OP)
        assert r.status_code == 200 and r.json()["ack"] == "applied", r.text
        assert check(), action
    api.post("/api/robots/robot-1/pause", headers=OP)
    link.act(obs())
    assert link.paused
    # The heartbeat (what the grid shows) follows.
    wait_for(lambda: api.get("/api/robots/robot-1", headers=VIEW).json()["paused"], what="paused in heartbeat")
    detail = api.get("/api/robots/robot-1", headers=VIEW).json()
    assert detail["last_command"]["action"] == "CONTROL_ACTION_PAUSE" and detail["last_command"]["operator"] == "alice"
    link.end_episode(pb.OUTCOME_FAILURE)


def test_command_to_an_offline_robot_is_a_clear_409(api, daemons):
    daemon = daemons("robot-1")
    daemon.stop()  # its heartbeat stays in Redis, nobody listens on the channel any more
    r = api.post("/api/robots/robot-1/takeover", headers=OP)
    assert r.status_code == 409 and "not listening" in r.json()["detail"]
    entry = api.get("/api/audit", headers=VIEW).json()["entries"][0]
    assert entry["result"] == "error" and entry["status"] == 409


# ---- robots, episodes, labels ---------------------------------------------------------------

def test_robots_online_offline_success_and_interventions(api, daemons):
    d1, d2 = daemons("robot-1", "v000001"), daemons("robot-2", "v000002")
    l1, l2 = RobotLinkClient(d1.address, "robot-1"), RobotLinkClient(d2.address, "robot-2")
    ids = [record_episode(l1, outcome=o) for o in (pb.OUTCOME_SUCCESS, pb.OUTCOME_SUCCESS, pb.OUTCOME_FAILURE)]
    ids.append(record_episode(l1, outcome=pb.OUTCOME_SUCCESS, intervene=(2, 4)))
    ids.append(record_episode(l2, task="push-v3", outcome=pb.OUTCOME_FAILURE))
    for eid in ids:
        assert api.dash.wait_indexed(eid, timeout=15)
    l2.start_episode("push-v3", "push")  # robot-2 is busy right now: its next heartbeat says so

    def robots():
        return {r["robot_id"]: r for r in api.get("/api/robots", headers=VIEW).json()["robots"]}

    wait_for(lambda: robots()["robot-2"]["task_id"], what="robot-2's heartbeat shows its task")
    r1, r2 = robots()["robot-1"], robots()["robot-2"]
    assert r1["online"] and r1["policy_version"] == "v000001" and r1["episodes"] == 4
    assert r1["success"]["k"] == 3 and r1["success"]["n"] == 4 and r1["success"]["rate"] == 0.75
    assert 0.0 < r1["success"]["lo"] < 0.75 < r1["success"]["hi"] <= 1.0  # Wilson 95%
    assert r1["intervention"]["k"] == 1 and r1["intervention"]["n"] == 4
    assert r2["task_id"] == "push-v3" and r2["episode_id"] and r2["success"]["n"] == 1
    assert r1["spool"]["episodes"] == 0

    tasks = {t["task_id"]: t for t in api.get("/api/tasks", headers=VIEW).json()["tasks"]}
    assert tasks["reach-v3"]["success"]["k"] == 3 and tasks["push-v3"]["success"]["k"] == 0
    series = api.get("/api/series", headers=VIEW).json()
    assert sum(p["episodes"] for p in series["tasks"]["reach-v3"]) == 4
    assert {v["version"] for v in series["versions"]} == {"v000001", "v000002"}

    detail = api.get("/api/robots/robot-1", headers=VIEW).json()
    assert detail["by_version"]["v000001"]["success"]["k"] == 3
    assert [e["episode_id"] for e in detail["recent_episodes"]] == ids[3::-1]
    assert detail["counters"]["episodes"] == 4

    d2.stop()  # heartbeats stop: offline after offline_after_s (1 s here); its open episode ends incomplete
    wait_for(lambda: not robots()["robot-2"]["online"], what="robot-2 offline")
    snap = api.get("/api/fleet", headers=VIEW).json()
    assert snap["fleet"]["robots"] == 2 and snap["fleet"]["online"] == 1
    wait_for(lambda: api.get("/api/episodes", headers=VIEW, params={"robot_id": "robot-2", "outcome": "unknown"})
             .json()["total"] == 1, what="the incomplete episode")
    assert robots()["robot-2"]["success"]["n"] == 1  # an unknown outcome is no evidence either way


def test_episode_list_filters_pagination_detail_and_thumbnails(api, daemons):
    link = RobotLinkClient(daemons("robot-1").address, "robot-1")
    ids = [record_episode(link, task="reach-v3" if i % 2 else "push-v3", steps=20,
                          outcome=pb.OUTCOME_SUCCESS if i % 3 else pb.OUTCOME_FAILURE,
                          intervene=(3, 6) if i == 4 else None) for i in range(7)]
    for eid in ids:
        assert api.dash.wait_indexed(eid, timeout=15)

    def listing(**params):
        return api.get("/api/episodes", headers=VIEW, params=params).json()

    everything = listing()
    assert everything["total"] == 7 and [e["episode_id"] for e in everything["episodes"]] == ids[::-1]
    page = listing(limit=3, offset=3)
    assert [e["episode_id"] for e in page["episodes"]] == ids[::-1][3:6] and page["total"] == 7
    assert {e["episode_id"] for e in listing(task_id="push-v3")["episodes"]} == set(ids[0::2])
    assert {e["episode_id"] for e in listing(outcome="failure")["episodes"]} == {ids[0], ids[3], ids[6]}
    assert [e["episode_id"] for e in listing(has_intervention="true")["episodes"]] == [ids[4]]
    assert listing(has_intervention="false")["total"] == 6
    assert listing(policy_version="v000007", robot_id="robot-1")["total"] == 7
    assert listing(robot_id="robot-9")["total"] == 0
    assert listing(source="offline")["total"] == 0

    ep = api.get(f"/api/episodes/{ids[4]}", headers=VIEW).json()
    assert ep["num_steps"] == 20 and ep["cameras"] == ["front"] and ep["has_images"]
    assert ep["segments"] == [{"start_step": 3, "end_step": 6, "operator": "bob", "reason": "drift"}]
    assert ep["thumbnail_steps"][0] == 0 and ep["thumbnail_steps"][-1] == 19 and len(ep["thumbnail_steps"]) == 12

    r = api.get(f"/api/episodes/{ids[4]}/frames/5.png", headers=VIEW, params={"size": 24})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert max(img.size) == 24 and img.size == (24, 16)  # 48x32 scaled, aspect kept
    full = np.asarray(Image.open(io.BytesIO(api.get(f"/api/episodes/{ids[4]}/frames/5.png", headers=VIEW,
                                                    params={"size": 64, "camera": "front"}).content)))
    assert np.array_equal(full, obs(5).images["front"])  # the recorded frame itself (smaller than 64: as is)
    for bad, status in ((f"/api/episodes/{ids[4]}/frames/20.png", 404),
                        (f"/api/episodes/{ids[4]}/frames/1.png?camera=wrist", 404),
                        ("/api/episodes/nope/frames/1.png", 404),
                        (f"/api/episodes/{ids[4]}/frames/-1.png", 422),
                        (f"/api/episodes/{ids[4]}/frames/1.png?size=5000", 422)):
        assert api.get(bad, headers=VIEW).status_code == status, bad


def test_tampered_frames_are_refused_not_served(api, daemons, store):
    link = RobotLinkClient(daemons("robot-1").address, "robot-1")
    eid = record_episode(link, steps=4)
    assert api.dash.wait_indexed(eid, timeout=15)
    ref = api.dash.entry(eid).chunks[0]
    path = store.root / ref.key
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip a byte in the image section, after ingest verified the steps
    path.write_bytes(bytes(data))
    r = api.get(f"/api/episodes/{eid}/frames/1.png", headers=VIEW)
    assert r.status_code == 502 and "checksum-mismatch" in r.json()["detail"]


def test_label_goes_to_stream_and_store_and_survives_a_rebuilt_index(api, daemons, redis_client, store):
    link = RobotLinkClient(daemons("robot-1").address, "robot-1")
    eid = record_episode(link, outcome=pb.OUTCOME_FAILURE)
    assert api.dash.wait_indexed(eid, timeout=15)

    r = api.post(f"/api/episodes/{eid}/label", headers=OP, json={"outcome": "success"})
    assert r.status_code == 200, r.text
    assert r.json()["previous"] == "failure" and r.json()["episode"]["outcome"] == "success"
    # For the learner: one LABEL_STREAM entry {episode_id, outcome, by}.
    (_id, fields), = redis_client.xrange(config.LABEL_STREAM)
    f = {k.decode(): v.decode() for k, v in fields.items()}
    assert (f["episode_id"], f["outcome"], f["by"]) == (eid, "success", "alice")
    # For any rebuilt index: labels/<episode_id>.json in the store.
    stored = json.loads(store.get(f"labels/{eid}.json"))
    assert (stored["outcome"], stored["by"], stored["previous"]) == ("success", "alice", "failure")
    # The dashboard's own index and everything derived from it.
    ep = api.get(f"/api/episodes/{eid}", headers=VIEW).json()
    assert ep["outcome"] == "success" and ep["outcome_source"] == "LABEL_SOURCE_OPERATOR" and ep["labelled_by"] == "alice"
    assert api.get("/api/robots/robot-1", headers=VIEW).json()["success"]["k"] == 1

    # A new dashboard process rebuilds its index from the stream; even with the label stream
    # gone (trimmed, Redis without persistence) the store's copy keeps the label.
    redis_client.delete(config.LABEL_STREAM)
    app2, dash2 = build_app(redis_client, store, tokens(), group="dashboard-2")
    with TestClient(app2) as api2:
        assert dash2.wait_indexed(eid, timeout=15)
        wait_for(lambda: api2.get(f"/api/episodes/{eid}", headers=VIEW).json()["outcome"] == "success",
                 what="label applied from the store")
    # The first dashboard, restarted in place, rewinds its group and rebuilds too.
    fresh = Dashboard(redis_client, store).start()
    try:
        assert fresh.wait_indexed(eid, timeout=15)
        wait_for(lambda: fresh.entry(eid).outcome == "success", what="label after restart")
    finally:
        fresh.stop()

    audit = api.get("/api/audit", headers=VIEW).json()["entries"]
    assert any(e["action"] == "episode.label" and e["target"] == eid and json.loads(e["detail"]) ==
               {"from": "failure", "to": "success"} for e in audit)


# ---- policies --------------------------------------------------------------------------------

def publish(registry: PolicyRegistry, n: int):
    return [registry.publish(f"weights-{i}".encode() * 100, json.dumps({"i": i}), learner_step=100 * i,
                             algorithm="hg-dagger", metrics={"loss": 1.0 / i}).version for i in range(1, n + 1)]


def test_policy_versions_promote_pin_rollback_canary(api, daemons, store, redis_client):
    registry = PolicyRegistry(store, redis_client)
    v1, v2, v3 = publish(registry, 3)
    d1 = daemons("robot-1", v2)
    daemons("robot-2", v3)
    eid = record_episode(RobotLinkClient(d1.address, "robot-1"), outcome=pb.OUTCOME_SUCCESS)
    assert api.dash.wait_indexed(eid, timeout=15)

    p = api.get("/api/policies", headers=VIEW).json()
    assert [v["version"] for v in p["versions"]] == [v3, v2, v1] and p["pointer"]["version"] == v3
    by = {v["version"]: v for v in p["versions"]}
    assert by[v3]["current"] and by[v3]["metrics"]["loss"] == pytest.approx(1 / 3) and by[v3]["learner_step"] == 300
    assert by[v2]["on_robot"]["success"]["k"] == 1 and by[v2]["robots_running"] == 1
    one = api.get(f"/api/policies/{v2}", headers=VIEW).json()
    assert one["config"] == {"i": 2} and one["by_task"]["reach-v3"]["success"]["k"] == 1 and one["registered"]

    assert api.post(f"/api/policies/{v1}/promote", headers=OP).json()["pointer"]["version"] == v1
    r = api.post("/api/policies/rollback", headers=OP, json={"pin": False}).json()
    assert r["rolled_back_to"] == v3 and r["pointer"]["version"] == v3

    r = api.post("/api/fleet/pin", headers=OP, json={"version": v2}).json()
    assert r["pointer"] == {**r["pointer"], "version": v2, "pinned": True}
    publish(registry, 1)  # a pinned fleet does not follow publishes
    assert registry.pointer()["version"] == v2
    r = api.delete("/api/fleet/pin", headers=OP).json()
    assert not r["pointer"]["pinned"] and r["pointer"]["version"] == registry.latest_version()

    r = api.post("/api/robots/robot-1/pin", headers=OP, json={"version": v1}).json()
    assert r["robot_pins"] == {"robot-1": v1} and registry.target_version("robot-1") == v1
    robots = {x["robot_id"]: x for x in api.get("/api/robots", headers=VIEW).json()["robots"]}
    assert (robots["robot-1"]["target_version"], robots["robot-1"]["target_source"]) == (v1, "robot_pin")
    assert api.delete("/api/robots/robot-1/pin", headers=OP).json()["robot_pins"] == {}

    r = api.put("/api/canary", headers=OP, json={"version": v3, "robot_ids": ["robot-2"], "fraction": 0.1}).json()
    assert r["canary"]["version"] == v3 and r["canary"]["robots"] == ["robot-2"]
    assert registry.target_version("robot-2") == v3
    robots = {x["robot_id"]: x for x in api.get("/api/robots", headers=VIEW).json()["robots"]}
    assert robots["robot-2"]["target_source"] == "canary"
    assert api.delete("/api/canary", headers=OP).json()["canary"] is None

    history = api.get("/api/policies", headers=VIEW).json()["history"]
    assert {"promote", "rollback", "pin_fleet", "unpin_fleet", "pin_robot", "set_canary"} <= {h["action"] for h in history}
    assert all(h["by"] == "alice" for h in history if h["action"] != "publish")

    # Versions robots ran that the registry does not know still show their on-robot success.
    d3 = daemons("robot-3", "v000077")
    eid = record_episode(RobotLinkClient(d3.address, "robot-3"), outcome=pb.OUTCOME_FAILURE)
    assert api.dash.wait_indexed(eid, timeout=15)
    legacy = api.get("/api/policies/v000077", headers=VIEW).json()
    assert not legacy["registered"] and legacy["on_robot"]["success"]["n"] == 1


def test_steering_errors_are_404_409_422(api, daemons, store, redis_client):
    daemons("robot-1")
    r = api.post("/api/policies/rollback", headers=OP)
    assert r.status_code == 409 and "nothing to roll back" in r.json()["detail"]
    v1, = publish(PolicyRegistry(store, redis_client), 1)
    cases = [
        ("post", "/api/policies/v999999/promote", None, 404),
        ("post", "/api/policies/banana/promote", None, 404),
        ("post", "/api/fleet/pin", {"version": "v999999"}, 404),
        ("post", "/api/robots/robot-1/pin", {"version": "v999999"}, 404),
        ("post", "/api/robots/robot-9/pin", {"version": v1}, 404),
        ("delete", "/api/robots/robot-9/pin", None, 404),
        ("put", "/api/canary", {"version": "v999999", "fraction": 0.5}, 404),
        ("put", "/api/canary", {"version": v1, "robot_ids": ["robot-9"]}, 404),
        ("put", "/api/canary", {"version": v1}, 422),  # neither robots nor a fraction
        ("put", "/api/canary", {"version": v1, "fraction": 1.5}, 422),
        ("put", "/api/canary", {"version": v1, "fraction": "half"}, 422),
        ("post", "/api/policies/rollback", {"pin": "yes"}, 422),
    ]
    for method, path, body, status in cases:
        r = getattr(api, method)(path, headers=OP, **({"json": body} if body is not None else {}))
        assert r.status_code == status, (method, path, body, r.text)
        assert r.json()["detail"], r.text
    assert api.get("/api/policies/v999999", headers=VIEW).status_code == 404
    reg = PolicyRegistry(store, redis_client)  # none of that changed anything
    assert reg.pointer()["version"] == v1 and reg.canary() is None and reg.robot_pins() == {}


# ---- learner, metrics, live stream -----------------------------------------------------------

def test_learner_stats_metrics_and_queue_lag(api, daemons, redis_client):
    stats = {"step": 1200, "samples_per_s": 512.5, "losses": {"bc": 0.25, "value": 0.5},
             "buffer": {"online": 40, "offline": 1000}, "staleness": {"mean": 1.5}, "w_on": 0.5,
             "versions": {"published": "v000003"}}
    redis_client.hset(config.LEARNER_STATS_KEY, mapping={k: json.dumps(v) for k, v in stats.items()})
    from fleetloop.buffer.queue import EpisodeQueueConsumer
    EpisodeQueueConsumer(redis_client)  # a learner group that has not consumed anything yet
    link = RobotLinkClient(daemons("robot-1").address, "robot-1")
    eid = record_episode(link)
    assert api.dash.wait_indexed(eid, timeout=15)

    learner = api.get("/api/learner", headers=VIEW).json()
    assert learner["available"] and learner["step"] == 1200 and learner["samples_per_s"] == 512.5
    assert learner["stats"]["losses"] == {"bc": 0.25, "value": 0.5}
    groups = {g["group"]: g for g in learner["queue"]["groups"]}
    assert groups["dashboard"]["lag"] == 0 and groups["learner"]["lag"] == 1  # nobody consumed for the learner
    time.sleep(1.1)
    redis_client.hset(config.LEARNER_STATS_KEY, "step", json.dumps(1300))
    assert api.get("/api/learner", headers=VIEW).json()["step_rate"] > 0

    r = api.get("/metrics", headers=VIEW)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = scrape(r.text)
    assert values["fleetloop_learner_step"] == 1300
    assert values['fleetloop_queue_lag_messages{group="learner"}'] == 1
    assert values['fleetloop_queue_pending_messages{group="dashboard"}'] == 0
    assert values['fleetloop_learner_stat{key="losses.bc"}'] == 0.25
    assert values['fleetloop_task_episodes_total{outcome="success",task_id="reach-v3"}'] == 1
    assert values['fleetloop_task_success_rate{task_id="reach-v3"}'] == 1.0
    assert values['fleetloop_robot_online{robot_id="robot-1"}'] == 1
    assert values["fleetloop_ingest_episodes_per_second"] > 0
    assert "fleetloop_learner_step_rate" in values and "fleetloop_weight_swap_seconds" in r.text


def test_learner_own_step_rate_and_staleness(api, redis_client):
    stale_ns = time.time_ns() - int(120e9)
    redis_client.hset(config.LEARNER_STATS_KEY, mapping={"step": "50", "steps_per_s": "2.5", "updated_ns": str(stale_ns)})
    learner = api.get("/api/learner", headers=VIEW).json()
    assert learner["step_rate"] == 2.5 and not learner["fresh"] and learner["age_s"] >= 119
    values = scrape(api.get("/metrics", headers=VIEW).text)
    assert values["fleetloop_learner_up"] == 0 and values["fleetloop_learner_step_rate"] == 2.5
    redis_client.hset(config.LEARNER_STATS_KEY, "updated_ns", str(time.time_ns()))
    assert scrape(api.get("/metrics", headers=VIEW).text)["fleetloop_learner_up"] == 1


def test_weight_swap_latency_from_heartbeats_in_metrics(api, redis_client):
    status = {"robot_id": "robot-5", "last_seen_ns": time.time_ns(), "policy_version": "v000002",
              "swap": {"publish_to_loaded_s": {"n": 3, "last": 0.4, "p50": 0.35, "max": 0.9},
                       "loaded_to_swapped_s": {"n": 2, "last": 2.0, "p50": 1.5, "max": 2.5}}}
    redis_client.hset(config.HEARTBEAT_PREFIX + "robot-5", "status", json.dumps(status))
    redis_client.sadd(config.HEARTBEAT_PREFIX + "all", "robot-5")
    values = scrape(api.get("/metrics", headers=VIEW).text)
    assert values['fleetloop_weight_swap_seconds{phase="publish_to_loaded",robot_id="robot-5",stat="p50"}'] == 0.35
    assert values['fleetloop_weight_swap_seconds{phase="loaded_to_swapped",robot_id="robot-5",stat="max"}'] == 2.5


def test_event_stream_sends_fleet_snapshots(api, daemons):
    daemons("robot-1")
    with api.stream("GET", "/api/events", headers={**VIEW, "Accept": "text/event-stream"},
                    params={"max_events": 2, "interval_s": 0.2}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = [block for block in text.split("\n\n") if block.startswith("event: fleet")]
    assert len(events) == 2
    # A client that does not ask for a stream (curl, an API tester) gets one event, never an endless body.
    text = api.get("/api/events", headers=VIEW, params={"interval_s": 60}).text
    assert text.count("event: fleet") == 1
    snap = json.loads(events[-1].split("data: ", 1)[1])
    assert snap["fleet"]["robots"] == 1 and snap["robots"][0]["robot_id"] == "robot-1" and snap["robots"][0]["online"]
    assert api.get("/api/events", params={"max_events": 1}).status_code == 401


# ---- access control --------------------------------------------------------------------------

# Every write route, with a valid body: the test below fails if a route is added without a row.
WRITE_ROUTES = [
    ("POST", "/api/robots/{robot_id}/takeover", None),
    ("POST", "/api/robots/{robot_id}/release", None),
    ("POST", "/api/robots/{robot_id}/pause", None),
    ("POST", "/api/robots/{robot_id}/resume", None),
    ("POST", "/api/robots/{robot_id}/pin", {"version": "v000001"}),
    ("DELETE", "/api/robots/{robot_id}/pin", None),
    ("POST", "/api/episodes/{episode_id}/label", {"outcome": "success"}),
    ("POST", "/api/policies/rollback", None),
    ("POST", "/api/policies/{version}/promote", None),
    ("POST", "/api/fleet/pin", {"version": "v000001"}),
    ("DELETE", "/api/fleet/pin", None),
    ("PUT", "/api/canary", {"version": "v000001", "fraction": 0.5}),
    ("DELETE", "/api/canary", None),
    ("POST", "/api/rollout/promote", {"version": "v000001"}),
    ("POST", "/api/rollout/reject", {"version": "v000001"}),
    ("PUT", "/api/rollout/enabled", {"enabled": False}),
]


def test_the_write_route_table_is_complete(api):
    routes = {(m, r.path) for r in api.app.routes for m in getattr(r, "methods", ()) or ()
              if m not in ("GET", "HEAD")}
    assert routes == {(m, p) for m, p, _b in WRITE_ROUTES}


@pytest.mark.parametrize("method,path,body", WRITE_ROUTES, ids=[f"{m} {p}" for m, p, _b in WRITE_ROUTES])
@pytest.mark.parametrize("auth,status", [(None, 401), ("Bearer not-a-real-token-123", 401), ("Basic YWxpY2U6eA==", 401),
                                         (f"Bearer {VIEWER_TOKEN}", 403)], ids=["missing", "invalid", "not-bearer", "viewer"])
def test_every_write_needs_an_operator_token(api, redis_client, method, path, body, auth, status):
    redis_client.sadd(config.HEARTBEAT_PREFIX + "all", "robot-1")
    watcher = redis_client.pubsub(ignore_subscribe_messages=True)
    watcher.psubscribe(config.CONTROL_CHANNEL_PREFIX + "*", config.POLICY_CHANNEL)
    url = path.format(robot_id="robot-1", episode_id="20260101T000000-robot-1-abc", version="v000001")
    r = api.request(method, url, headers={"Authorization": auth} if auth else {}, json=body)
    assert r.status_code == status, r.text
    assert r.json()["detail"] and (status != 401 or r.headers["www-authenticate"] == "Bearer")
    assert watcher.get_message(timeout=0.3) is None  # no command to a robot, no policy notice
    watcher.close()
    assert not redis_client.exists(config.LABEL_STREAM, config.POLICY_POINTER)
    denied = api.get("/api/audit", headers=VIEW).json()["entries"][0]  # refusals are audited too
    assert (denied["path"], denied["method"], denied["status"], denied["result"]) == (url, method, status, "denied")
    assert denied["who"] == ("wall" if status == 403 else "anonymous")


def test_refusal_comes_before_body_validation(api):
    # A malformed body from someone without a token is a 401, not a 422: nothing is parsed first.
    r = api.post("/api/episodes/x/label", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401


def test_reads_need_a_token_unless_open_read(redis_client, store):
    app, _dash = build_app(redis_client, store, tokens())
    with TestClient(app) as api:
        for path in ("/api/robots", "/api/episodes", "/api/policies", "/api/learner", "/api/audit", "/metrics",
                     "/api/fleet", "/api/whoami"):
            assert api.get(path).status_code == 401, path
            assert api.get(path, headers={"Authorization": "Bearer wrong-token-xyz"}).status_code == 401, path
            assert api.get(path, headers=VIEW).status_code == 200, path
        for public in ("/", "/static/app.js", "/static/style.css", "/openapi.json", "/api/health"):
            assert api.get(public).status_code == 200, public
        assert api.get("/api/whoami", headers=VIEW).json() == {"name": "wall", "role": "viewer", "open_read": False}
    app, _dash = build_app(redis_client, store, tokens(), open_read=True)
    with TestClient(app) as api:
        assert api.get("/api/robots").status_code == 200
        assert api.get("/api/whoami").json() == {"name": "anonymous", "role": "viewer", "open_read": True}
        assert api.get("/api/robots", headers={"Authorization": "Bearer wrong-token-xyz"}).status_code == 401
        assert api.post("/api/policies/rollback").status_code == 401  # writes never open


def test_openapi_documents_every_route_and_the_bearer_scheme(api):
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    for method, path, _b in WRITE_ROUTES:
        assert method.lower() in paths[path], (method, path)
    for path in ("/api/robots", "/api/robots/{robot_id}", "/api/episodes", "/api/episodes/{episode_id}",
                 "/api/episodes/{episode_id}/frames/{step}.png", "/api/policies", "/api/policies/{version}",
                 "/api/learner", "/api/events", "/api/audit", "/api/series", "/api/tasks", "/metrics"):
        assert "get" in paths[path], path
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,kwargs", [
    ("POST", "/api/episodes/{eid}/label", {"json": {"outcome": "great"}}),
    ("POST", "/api/episodes/{eid}/label", {"json": {}}),
    ("POST", "/api/episodes/{eid}/label", {"json": {"outcome": "success", "extra": 1}}),
    ("POST", "/api/episodes/{eid}/label", {"json": ["success"]}),
    ("POST", "/api/episodes/{eid}/label", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ("POST", "/api/robots/robot-1/takeover", {"json": {"reason": "x" * 201}}),
    ("POST", "/api/robots/robot-1/takeover", {"json": {"reason": 5}}),
    ("POST", "/api/robots/robot-1/pin", {"json": {}}),
    ("POST", "/api/robots/robot-1/pin", {"json": {"version": ""}}),
    ("POST", "/api/fleet/pin", {"json": {"version": 12}}),
    ("PUT", "/api/canary", {"json": {"version": "v000001", "robot_ids": "robot-1"}}),
    ("PUT", "/api/canary", {"json": {"version": "v000001", "fraction": -0.1}}),
    ("GET", "/api/episodes?limit=0", {}),
    ("GET", "/api/episodes?limit=100000", {}),
    ("GET", "/api/episodes?offset=-1", {}),
    ("GET", "/api/episodes?outcome=great", {}),
    ("GET", "/api/episodes?has_intervention=maybe", {}),
    ("GET", "/api/audit?before=drop-table", {}),
    ("GET", "/api/audit?limit=0", {}),
    ("GET", "/api/series?bucket_s=0", {}),
    ("GET", "/api/events?interval_s=0.01", {}),
])
def test_malformed_requests_get_a_clear_422(api, daemons, method, path, kwargs):
    daemon = daemons("robot-1")
    eid = record_episode(RobotLinkClient(daemon.address, "robot-1")) if "{eid}" in path else ""
    if eid:
        assert api.dash.wait_indexed(eid, timeout=15)
    headers = {**OP, **kwargs.pop("headers", {})}
    r = api.request(method, path.format(eid=eid), headers=headers, **kwargs)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/api/robots/robot-9", None),
    ("POST", "/api/robots/robot-9/takeover", None),
    ("POST", "/api/robots/robot-9/release", None),
    ("POST", "/api/robots/robot-9/pause", None),
    ("POST", "/api/robots/robot-9/resume", None),
    ("GET", "/api/episodes/no-such-episode", None),
    ("GET", "/api/episodes/no-such-episode/frames/0.png", None),
    ("POST", "/api/episodes/no-such-episode/label", {"outcome": "failure"}),
    ("GET", "/api/policies/v000404", None),
    ("POST", "/api/policies/v000404/promote", None),
    ("GET", "/api/series?task_id=no-such-task", None),
    ("GET", "/api/robots/robot%20with%20spaces", None),
])
def test_unknown_things_are_404_not_500(api, method, path, body):
    r = api.request(method, path, headers=OP, json=body)
    assert r.status_code == 404, r.text
    assert r.json()["detail"].startswith("unknown ")


# ---- issue 12: nothing a request carries can break the API or its audit log -------------------

def _last_audit(api):
    r = api.get("/api/audit", headers=VIEW)
    assert r.status_code == 200, r.text
    return r.json()["entries"][0]


@pytest.mark.parametrize("raw", [b'{"version": "v000001", "fraction": NaN}',
                                 b'{"version": "v000001", "fraction": Infinity}',
                                 b'{"version": "v000001", "fraction": -Infinity}',
                                 b'{"version": "v000001", "fraction": 1e309}'])
def test_non_finite_numbers_are_a_422_and_audited(api, redis_client, raw):
    r = api.put("/api/canary", content=raw, headers={**OP, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "finite" in r.json()["detail"]
    entry = _last_audit(api)  # recorded, and the listing still works afterwards
    assert (entry["path"], entry["status"], entry["result"], entry["who"]) == ("/api/canary", 422, "error", "alice")
    assert not redis_client.exists("fleetloop:policy:canary")
    r = api.get("/api/events", headers=VIEW, params={"interval_s": "NaN"})
    assert r.status_code == 422


def test_deep_oversized_and_undecodable_bodies_are_refused_and_audited(api):
    deep = b"[" * 100_000 + b"]" * 100_000  # deeper than any JSON parser's recursion
    for body, status in ((deep[:30_000] + deep[-30_000:], 422), (b'{"reason": ' + b"[" * 40 + b"]" * 40 + b"}", 422),
                         (b"\xff\xfe{", 422), (b"x" * 70_000, 413), (deep, 413)):
        r = api.post("/api/robots/robot-1/takeover", content=body, headers={**OP, "content-type": "application/json"})
        assert r.status_code == status, (len(body), r.text)
        assert len(r.content) < 300  # bounded: never an echo of the body
        entry = _last_audit(api)
        assert (entry["path"], entry["status"], entry["who"]) == ("/api/robots/robot-1/takeover", status, "alice")
        assert entry["params"].startswith(f"<body of {len(body)} bytes not recorded")


def test_validation_errors_are_bounded_and_never_echo_the_request(api):
    big = "x" * 60_000
    r = api.post("/api/fleet/pin", headers=OP, json={"version": big})
    assert r.status_code == 422 and len(r.content) < 2000 and big[:100] not in r.text
    body = r.json()
    assert isinstance(body["detail"], str) and body["errors"][0]["loc"] == ["body", "version"]
    assert set(body["errors"][0]) == {"loc", "msg", "type"}
    r = api.get(f"/api/robots/{'r' * 5000}", headers=VIEW)
    assert r.status_code == 422 and len(r.content) < 2000


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/api/robots/all", None),
    ("GET", "/api/robots/acks", None),
    ("POST", "/api/robots/all/pin", {"version": "v000001"}),
    ("DELETE", "/api/robots/all/pin", None),
    ("POST", "/api/robots/all/takeover", None),
    ("PUT", "/api/canary", {"version": "v000001", "robot_ids": ["all"]}),
])
def test_reserved_robot_ids_are_not_robots(api, daemons, store, redis_client, method, path, body):
    daemons("robot-1")  # the robot set (fleetloop:robot:all) exists
    publish(PolicyRegistry(store, redis_client), 1)
    r = api.request(method, path, headers=OP, json=body)
    assert r.status_code == 404, r.text
    assert "reserved" in r.json()["detail"]
    assert PolicyRegistry(store, redis_client).robot_pins() == {}


def test_audit_listing_survives_bad_entries(api, redis_client):
    api.post("/api/policies/rollback", headers=OP)  # one good entry
    for fields in ({"params": "NaN", "status": "Infinity", "ts_ns": "not json"},
                   {"params": "[" * 5000 + "]" * 5000},
                   {"params": '{"fraction": NaN}', "who": "x" * 10_000},
                   {"\xff": b"\xff\xfe\x00"}):
        redis_client.xadd(config.AUDIT_STREAM, fields)
    api.post("/api/policies/rollback", headers=OP)
    r = api.get("/api/audit", headers=VIEW, params={"limit": 10})
    assert r.status_code == 200, r.text
    entries = r.json()["entries"]
    assert len(entries) == 6 and entries[0]["action"] == "policy.rollback" and entries[-1]["action"] == "policy.rollback"
    assert entries[2]["params"] == {"fraction": None} and len(entries[2]["who"]) <= 4096
    assert api.get("/api/audit", headers=VIEW, params={"before": "0-0"}).json()["entries"] == []


def test_openapi_documents_error_models_and_status_codes(api):
    spec = api.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    err = spec["components"]["schemas"]["ErrorBody"]
    assert err["properties"]["detail"]["type"] == "string"
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            if path == "/api/health":
                continue
            assert {"401", "422", "503"} <= codes, (method, path, codes)
            if method in ("post", "put", "delete"):
                assert {"403", "413"} <= codes, (method, path, codes)
            if "{" in path:
                assert "404" in codes, (method, path, codes)
            for code, resp in op["responses"].items():
                if code != "200":
                    assert resp["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}


# ---- token configuration ---------------------------------------------------------------------

def test_tokens_from_env_json_and_toml(tmp_path):
    env = {"FLEETLOOP_OPERATOR_TOKENS": "alice:aaaaaaaaaaaaaaaa, bob:bbbbbbbbbbbbbbbb",
           "FLEETLOOP_VIEWER_TOKENS": "wall:cccccccccccccccc"}
    t = load_tokens(environ=env)
    assert t.lookup("bbbbbbbbbbbbbbbb").name == "bob" and t.lookup("bbbbbbbbbbbbbbbb").role == OPERATOR
    assert t.lookup("cccccccccccccccc").role == VIEWER and t.lookup("nope") is None and t.lookup("") is None
    j = tmp_path / "tokens.json"
    j.write_text(json.dumps({"operators": {"carol": "dddddddddddddddd"}, "viewers": {"tv": "eeeeeeeeeeeeeeee"}}))
    t = load_tokens(str(j), environ=env)
    assert t.lookup("dddddddddddddddd").name == "carol" and t.lookup("aaaaaaaaaaaaaaaa").name == "alice"
    toml = tmp_path / "tokens.toml"
    toml.write_text('[operators]\ndave = "ffffffffffffffff"\n[viewers]\nkiosk = "gggggggggggggggg"\n')
    t = load_tokens(environ={"FLEETLOOP_TOKENS_FILE": str(toml)})
    assert t.lookup("gggggggggggggggg").name == "kiosk" and t.names() == {OPERATOR: ["dave"], VIEWER: ["kiosk"]}


@pytest.mark.parametrize("env,message", [
    ({"FLEETLOOP_OPERATOR_TOKENS": "alice:short"}, "at least 12"),
    ({"FLEETLOOP_OPERATOR_TOKENS": "alice"}, "name:token"),
    ({"FLEETLOOP_OPERATOR_TOKENS": "alice:aaaaaaaaaaaaaaaa", "FLEETLOOP_VIEWER_TOKENS": "wall:aaaaaaaaaaaaaaaa"},
     "already used"),
    ({"FLEETLOOP_OPERATOR_TOKENS": "alice:aaaaaaaaaaaaaaaa,alice:bbbbbbbbbbbbbbbb"}, "twice"),
    ({"FLEETLOOP_OPERATOR_TOKENS": "al ice:aaaaaaaaaaaaaaaa"}, "bad token name"),
])
def test_bad_token_configuration_is_refused_with_a_reason(env, message):
    with pytest.raises(TokenConfigError, match=message):
        load_tokens(environ=env)


def test_bad_token_file_is_refused(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('{"admins": {"x": "aaaaaaaaaaaaaaaa"}}')
    with pytest.raises(TokenConfigError, match="operators"):
        load_tokens(str(p), environ={})
    p.write_text("{oops")
    with pytest.raises(TokenConfigError, match="cannot parse"):
        load_tokens(str(p), environ={})
    with pytest.raises(TokenConfigError, match="cannot read"):
        load_tokens(str(tmp_path / "missing.json"), environ={})


# ---- the command -----------------------------------------------------------------------------

def test_cli_comes_up_on_embedded_defaults(tmp_path):
    """`fleetloop dashboard` with no configuration: private Redis, local file store, a generated
    operator token printed with the page URL; SIGTERM stops it and its Redis."""
    import httpx
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETLOOP_")}
    env.update(FLEETLOOP_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fleetloop.cli", "dashboard", "--port", str(port), "--access-log"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        token, lines = None, []
        deadline = time.monotonic() + 60
        while token is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"#token=(\S+)", line)
            token = m.group(1) if m else None
        assert token, "".join(lines)
        assert any("private Redis" in line for line in lines)
        base = f"http://127.0.0.1:{port}"
        r = wait_for(lambda: _get(httpx, f"{base}/api/whoami", token), timeout=30, what="dashboard up")
        assert r.json() == {"name": "local-operator", "role": "operator", "open_read": False}
        assert httpx.get(f"{base}/openapi.json").json()["info"]["title"] == "fleetloop dashboard"
        assert httpx.get(f"{base}/api/robots").status_code == 401
        assert (tmp_path / "home" / "store").is_dir()  # the default file store
        assert httpx.get(f"{base}/?token={token}").status_code == 200  # a pasted page URL: logged, redacted
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
    access = [line for line in ("".join(lines) + rest).splitlines() if '"GET /' in line]
    assert any('"GET /?token=[redacted] HTTP' in line for line in access), access
    assert not any(token in line for line in access), access


def _get(httpx, url, token):
    try:
        r = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=2)
        return r if r.status_code == 200 else None
    except httpx.HTTPError:
        return None
