"""The rollout gate (docs/rollout.md) against a real Redis, a file:// store and the real policy
registry: the sequential test, the evidence (operator labels override outcomes), the state machine
on the registry's steering (the fleet is held, candidates only reach canaries, batching), the
dashboard's view and manual decisions (audited), an episode through the real episode path
(gRPC robot link -> daemon -> spool -> uploader -> stream), and the simulation of issue 14: a
learner publishing a sign-flipped version among good ones to a fleet of simulated robots."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from promtext import scrape
from fastapi.testclient import TestClient

from fleetloop import config
from fleetloop.buffer.store import LocalStore
from fleetloop.dashboard.app import build_app
from fleetloop.dashboard.auth import OPERATOR, VIEWER, TokenTable
from fleetloop.release.registry import PolicyRegistry
from fleetloop.release.evidence import EpisodeRecord, EvidenceBook, EvidenceFollower, Tally, sprt
from fleetloop.release.rollout import DECIDED_KEY, GateService, RolloutGate, RolloutSettings

OP_TOKEN = "alice-operator-token-0001"
VIEWER_TOKEN = "wall-viewer-token-0001"
OP = {"Authorization": f"Bearer {OP_TOKEN}"}
VIEW = {"Authorization": f"Bearer {VIEWER_TOKEN}"}


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETLOOP_HOME", str(tmp_path / "home"))  # keys etc. stay in this test


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def registry(store, redis_client):
    return PolicyRegistry(store, redis_client)


def publish(registry, i: int) -> str:
    return registry.publish(f"weights-{i}".encode() * 50, json.dumps({"i": i}), learner_step=i).version


def tally(k: int, n: int) -> Tally:
    return Tally(episodes=n, known=n, autonomous=k)


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def add(book: EvidenceBook, version: str, task: str, successes: int, failures: int, robot: str = "r",
        intervened_failures: bool = False) -> None:
    start = len(book)
    for i in range(successes + failures):
        ok = i < successes
        book.add(EpisodeRecord(f"{version}-{task}-{start + i}", version, task, robot, "success" if ok else "failure",
                               intervened=intervened_failures and not ok, steps=50, ended_ns=time.time_ns()))


# ---- the test statistic -------------------------------------------------------------------------

def test_sprt_refuses_a_broken_version_after_min_episodes_and_promotes_an_equal_one():
    s = RolloutSettings()
    refs = {"a": 0.8, "b": 0.6}
    # four failures are not enough (min_episodes = 5), the fifth is
    assert sprt({"a": tally(0, 4)}, refs, s)["decision"] == "continue"
    out = sprt({"a": tally(0, 3), "b": tally(0, 2)}, refs, s)
    assert out["decision"] == "refuse" and out["n"] == 5 and out["llr"] <= s.lower
    # as good as the reference on both tasks: promoted once the evidence adds up
    assert sprt({"a": tally(8, 10), "b": tally(6, 10)}, refs, s)["decision"] == "continue"
    assert sprt({"a": tally(40, 50), "b": tally(30, 50)}, refs, s)["decision"] == "promote"
    # much better on one task cannot buy a task on which it is shown worse
    out = sprt({"a": tally(50, 50), "b": tally(0, 8)}, refs, s)
    assert out["llr"] > s.upper and out["decision"] == "refuse" and out["worse_tasks"] == ["b"]
    # a task without a reference contributes nothing
    out = sprt({"c": tally(0, 50)}, refs, s)
    assert out["decision"] == "continue" and out["n"] == 0 and out["per_task"]["c"]["reference"] is None


def test_sprt_error_rates_hold_when_checked_after_every_episode():
    """Monte Carlo: checking after every episode, a version `margin` worse is promoted at most
    about alpha of the time, and an equal one refused at most about beta (Wald's bounds)."""
    s = RolloutSettings()
    rng = np.random.default_rng(0)

    def run(p: float) -> str:
        k = n = 0
        for _ in range(s.max_episodes):
            k += rng.random() < p
            n += 1
            d = sprt({"t": tally(k, n)}, {"t": 0.8}, s)["decision"]
            if d != "continue":
                return d
        return "expire"
    worse = [run(0.8 - s.margin) for _ in range(300)]
    equal = [run(0.8) for _ in range(300)]
    assert worse.count("promote") / 300 <= s.alpha + 0.03
    assert equal.count("refuse") / 300 <= s.beta + 0.04
    assert equal.count("promote") / 300 >= 0.8


def test_settings_from_env_and_validation():
    s = RolloutSettings.from_env({"FLEETLOOP_ROLLOUT_MARGIN": "0.1", "FLEETLOOP_ROLLOUT_CANARY_ROBOTS": "a,b",
                                  "FLEETLOOP_ROLLOUT_MIN_EPISODES": "8", "FLEETLOOP_ROLLOUT_ENABLED": "off"})
    assert (s.margin, s.canary_robots, s.min_episodes, s.enabled) == (0.1, ("a", "b"), 8, False)
    for bad in ({"margin": 0}, {"alpha": 0.7}, {"canary_fraction": 1.0}, {"min_episodes": 0}):
        with pytest.raises(ValueError):
            RolloutSettings(**bad)


# ---- evidence ----------------------------------------------------------------------------------

def test_evidence_autonomous_success_and_operator_labels():
    book = EvidenceBook()
    book.label("e2", "success", "alice", labelled_ns=5)  # a label that arrives before its episode
    for eid, outcome, intervened in (("e1", "success", False), ("e2", "failure", False), ("e3", "success", True),
                                     ("e4", "unknown", False)):
        assert book.add(EpisodeRecord(eid, "v000002", "t", "r1", outcome, intervened, 10, 1))
    assert not book.add(EpisodeRecord("e1", "v000002", "t", "r1", "failure", False, 10, 1))  # redelivery
    t = book.tally("v000002", "t")
    # e1 and e2 (labelled success) are autonomous successes; e3 needed a human; e4 is unknown
    assert (t.episodes, t.known, t.autonomous, t.intervened) == (4, 3, 2, 1)
    book.label("e1", "failure", "bob", labelled_ns=10)   # after its episode
    book.label("e1", "success", "carol", labelled_ns=7)  # older: ignored
    assert book.tally("v000002").autonomous == 1
    d = book.tally("v000002").as_dict()
    assert d["intervention_rate"] == 0.25 and d["mean_steps"] == 10 and d["known"] == 3


# ---- the gate's state machine ------------------------------------------------------------------

def test_gate_holds_the_fleet_canaries_candidates_and_batches(registry, redis_client):
    book = EvidenceBook()
    gate = RolloutGate(registry, RolloutSettings(canary_robots=("r9",)), book)
    v1 = publish(registry, 1)
    gate.tick()
    assert registry.pointer()["pinned"] and registry.pointer()["version"] == v1
    v2 = publish(registry, 2)
    assert registry.pointer()["version"] == v1  # the publish did not move the held fleet
    d = gate.tick()
    assert d["decision"] == "canary" and d["version"] == v2 and d["robots"] == ["r9"]
    assert registry.resolve("r9").version == v2 and registry.resolve("r1").version == v1
    v3, v4 = publish(registry, 3), publish(registry, 4)  # published while v2 is under test
    add(book, v1, "t", 16, 4)                            # reference 0.77 (smoothed)
    add(book, v2, "t", 1, 5, robot="r9", intervened_failures=True)
    d = gate.tick()
    assert d["decision"] == "refuse" and d["version"] == v2 and d["by"] == "rollout-gate"
    assert d["evidence"]["n"] == 6 and d["evidence"]["per_task"]["t"]["reference"] == pytest.approx(17 / 22, abs=1e-3)
    assert registry.canary() is None and registry.resolve("r9").version == v1
    d = gate.tick()  # batching: the newest version, v3 is skipped
    assert d["decision"] == "canary" and d["version"] == v4
    add(book, v4, "t", 45, 5, robot="r9")
    d = gate.tick()
    assert d["decision"] == "promote" and d["version"] == v4
    assert registry.pointer() | {"published_ns": 0} == registry.pointer() | {"published_ns": 0, "version": v4,
                                                                               "pinned": True}
    assert gate.tick() is None  # nothing newer than v4
    assert v3 not in gate.decided() and gate.decided() == {v2: "refuse", v4: "promote"}
    assert gate.status()["baseline"] == v4


def test_gate_expires_an_inconclusive_candidate_and_respects_operator_moves(registry, redis_client):
    book = EvidenceBook()
    gate = RolloutGate(registry, RolloutSettings(canary_robots=("r9",), max_episodes=20), book)
    v1 = publish(registry, 1)
    gate.tick()
    v2 = publish(registry, 2)
    gate.tick()
    add(book, v1, "t", 10, 10)
    add(book, v2, "t", 8, 12, robot="r9")  # between the hypotheses: no decision within 20 episodes
    d = gate.tick()
    assert d["decision"] == "expire" and registry.canary() is None and registry.pointer()["version"] == v1
    # an operator promotes by hand through the policies API: the gate takes it as the reference
    v3 = publish(registry, 3)
    assert gate.tick()["version"] == v3
    registry.promote(v3, by="alice")
    gate.tick()
    assert gate.state()["baseline"] == v3 and gate.state()["candidate"] is None and registry.canary() is None
    # an operator's own canary pauses the gate until it is cleared
    v4 = publish(registry, 4)
    registry.set_canary(v2, robot_ids=["r1"], by="alice")
    assert gate.tick() is None and "operator canary" in gate.state()["note"]
    registry.clear_canary(by="alice")
    assert gate.tick()["version"] == v4
    # switched off: the canary goes, the fleet is unpinned and follows publishes again (SOP)
    gate.set_enabled(False, by="alice")
    assert registry.canary() is None and not registry.pointer()["pinned"]
    v5 = publish(registry, 5)
    assert registry.pointer()["version"] == v5 and gate.tick() is None
    gate.set_enabled(True, by="alice")
    gate.tick()
    assert registry.pointer()["pinned"] and registry.pointer()["version"] == v5


def test_online_robots_survive_robot_written_garbage(registry, redis_client):
    """Heartbeats are robot-written: a last_seen_ns of "soon", a list, not JSON, a stale one or a
    junk member of the robot set make those robots offline; they never crash the canary choice."""
    now = time.time_ns()
    beats = {"fresh": json.dumps({"robot_id": "fresh", "last_seen_ns": now}),
             "soon": json.dumps({"robot_id": "soon", "last_seen_ns": "soon"}),
             "a-list": "[1, 2]", "not-json": "{", "huge": json.dumps({"last_seen_ns": 1e400}),
             "stale": json.dumps({"robot_id": "stale", "last_seen_ns": now - 60 * 10 ** 9})}
    for rid, raw in beats.items():
        redis_client.hset(config.HEARTBEAT_PREFIX + rid, "status", raw)
    redis_client.sadd(config.HEARTBEAT_PREFIX + "all", *beats, "no heartbeat", "bad id \u00e9")
    gate = RolloutGate(registry, RolloutSettings())
    assert gate.online_robots() == ["fresh"]
    assert gate.choose_canaries() == (["fresh"], 0.0)


# ---- the dashboard ------------------------------------------------------------------------------

def tokens() -> TokenTable:
    t = TokenTable()
    t.add("alice", OP_TOKEN, OPERATOR)
    t.add("wall", VIEWER_TOKEN, VIEWER)
    return t


@pytest.fixture
def api(redis_client, store):
    app, dash = build_app(redis_client, store, tokens(), offline_after_s=1.0)
    with TestClient(app) as client:
        yield client


def test_dashboard_shows_the_gate_and_audits_manual_decisions(api, registry, redis_client, store):
    svc = GateService(registry, RolloutSettings(canary_robots=("r9",), min_baseline=3), store=store)
    gate, book = svc.gate, svc.book
    v1 = publish(registry, 1)
    gate.tick()
    v2 = publish(registry, 2)
    gate.tick()
    add(book, v1, "t", 8, 2)
    add(book, v2, "t", 3, 0, robot="r9")
    assert gate.tick() is None  # 3 episodes: under min_episodes
    r = api.get("/api/rollout", headers=VIEW)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["enabled"] and body["baseline"] == v1 and body["candidate"] == v2 and body["canary_robots"] == ["r9"]
    ev = body["evidence"]
    assert ev["test"]["per_task"]["t"]["autonomous_success"] == 3 and ev["baseline_evidence"]["t"]["known"] == 10
    assert body["decisions"][0]["decision"] == "canary"
    # a viewer cannot decide; an operator can, and the audit log says who
    assert api.post("/api/rollout/promote", headers=VIEW, json={"version": v2}).status_code == 403
    assert api.post("/api/rollout/promote", headers=OP, json={"version": "v999999"}).status_code == 404
    assert api.post("/api/rollout/reject", headers=OP, json={"version": v1}).status_code == 409  # current
    r = api.post("/api/rollout/promote", headers=OP, json={"version": v2, "reason": "looks fine on camera"})
    assert r.status_code == 200, r.text
    d = r.json()["decision"]
    assert (d["decision"], d["version"], d["by"], d["reason"]) == ("promote", v2, "alice", "looks fine on camera")
    assert d["evidence"]["test"]["n"] == 3
    assert registry.pointer()["version"] == v2 and registry.canary() is None
    audit = api.get("/api/audit", headers=VIEW).json()["entries"][0]
    assert (audit["action"], audit["target"], audit["who"], audit["status"]) == ("rollout.promote", v2, "alice", 200)
    v3 = publish(registry, 3)
    assert api.post("/api/rollout/reject", headers=OP, json={"version": v3}).status_code == 200
    assert gate.tick() is None and redis_client.hget(DECIDED_KEY, v3) == b"refuse" and registry.canary() is None
    assert api.put("/api/rollout/enabled", headers=OP, json={"enabled": "no"}).status_code == 422
    r = api.put("/api/rollout/enabled", headers=OP, json={"enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False and not registry.pointer()["pinned"]
    values = scrape(api.get("/metrics/rollout", headers=VIEW).text)
    assert values['fleetloop_rollout_decisions_total{by="operator",decision="promote"}'] == 1
    assert values['fleetloop_rollout_decisions_total{by="operator",decision="refuse"}'] == 1
    assert values["fleetloop_rollout_enabled"] == 0
    assert api.get("/metrics/rollout").status_code == 401
    assert [e["decision"] for e in api.get("/api/rollout/decisions", headers=VIEW).json()["decisions"]][:3] == \
        ["disable", "refuse", "promote"]


# ---- an episode through the real episode path ------------------------------------------------

def test_gate_reads_episodes_recorded_by_a_real_daemon_and_labels_from_the_dashboard(
        api, tmp_path, store, redis_client, registry):
    from fleetloop.actor.daemon import ActorDaemon, FixedPolicySource
    from fleetloop.actor.link import RobotLinkClient
    from fleetloop.actor.spool import Spool
    from fleetloop.proto.v1 import episode_pb2 as pb

    class Constant:
        horizon, action_dim, version = 4, 4, "v000002"

        def act(self, obs, instruction, indicator=None):
            return np.full((4, 4), 0.25, np.float32)

    from fleetloop.policy.interface import Observation
    book = EvidenceBook()
    follower = EvidenceFollower(redis_client, book, store=store)
    daemon = ActorDaemon("robot-1", store, redis_client, Spool(tmp_path / "spool"), FixedPolicySource(Constant()),
                         grpc_address="127.0.0.1:0", heartbeat_interval_s=0.2, episode_idle_timeout_s=30).start()
    try:
        link = RobotLinkClient(daemon.address, "robot-1")
        ids = []
        for k, (outcome, human) in enumerate(((pb.OUTCOME_SUCCESS, False), (pb.OUTCOME_SUCCESS, True),
                                              (pb.OUTCOME_FAILURE, False))):
            ids.append(link.start_episode("reach-v3", "reach"))
            for t in range(6):
                if human and t == 2:
                    link.begin_intervention("bob", "drift")
                obs = Observation(images={}, state=np.arange(6, dtype=np.float32) + t)
                chunk = link.act(obs)
                link.report_step(obs, chunk[0], intervention=human and t >= 2, policy_chunk=chunk)
            link.end_episode(outcome)

        def counted():
            follower.poll(block_ms=100)
            return book.tally("v000002").episodes == 3
        wait_for(counted, what="the gate to read 3 episodes from the stream")
        t = book.tally("v000002", "reach-v3")
        assert (t.known, t.autonomous, t.intervened, t.steps) == (3, 1, 1, 18)
        # the operator relabels the failed one through the dashboard: the gate counts the label
        wait_for(lambda: api.get(f"/api/episodes/{ids[2]}", headers=VIEW).status_code == 200, what="dashboard index")
        assert api.post(f"/api/episodes/{ids[2]}/label", headers=OP, json={"outcome": "success"}).status_code == 200
        follower.poll(block_ms=100)
        assert book.tally("v000002").autonomous == 2
    finally:
        daemon.stop()


# ---- issue 14's simulation --------------------------------------------------------------------

def test_simulated_fleet_broken_version_stays_on_canaries_and_a_good_one_is_promoted(tmp_path, redis_client):
    """A learner stand-in publishes a sign-flipped (broken) version among good ones; six simulated
    robots follow the real registry through real PolicySlots and announce every episode on the
    real episode stream; the gate runs as its thread. Bounded by episodes, never by time."""
    from fleetloop.bench.rollout import scenario_gate
    # beta = 0.01: the good version is exactly as good as the fleet's, so by design the test
    # refuses it with probability <= beta; 1% keeps this test from failing one CI run in ten.
    out = scenario_gate(redis_client, str(tmp_path / "sim"), robots=6, episode_s=0.01,
                        settings=RolloutSettings(tick_s=0.05, beta=0.01), timeout=45)
    assert len(out["canaries"]) == 2  # ceil(0.25 * 6)
    assert out["broken_decision"] == "refuse"
    assert out["broken_reached_non_canary"] == 0 and set(out["broken_robots"]) <= set(out["canaries"])
    assert out["broken_episodes_before_rollback"] < 20
    # the rest of the fleet ran only the fleet's version during the incident, at its usual success
    assert out["fleet_versions_during_incident"] == [out["v1"]]
    during, before = out["fleet_success_during_incident"], out["fleet_success_before"]
    assert during["n"] > 0 and during["ci95"][1] >= before["rate"]
    assert out["good_promoted"] and out["good_decision"] == "promote", out["decisions"]
    # batching: a version published while another was under test is skipped for the newest
    assert not out["skipped_was_candidate"] and out["newest_decision"] in ("promote", "refuse")


# ---- the watch after a promotion ------------------------------------------------------------------

def test_watch_rolls_back_a_promoted_version_the_fleet_shows_worse(registry, redis_client):
    from fleetloop.dashboard.rollout_api import render_metrics
    book = EvidenceBook()
    gate = RolloutGate(registry, RolloutSettings(canary_robots=("r9",)), book)
    v1 = publish(registry, 1)
    gate.tick()
    add(book, v1, "t", 16, 4)                        # reference 17/22 = 0.77
    v2 = publish(registry, 2)
    assert gate.tick()["decision"] == "canary"
    add(book, v2, "t", 45, 5, robot="r9")            # lucky on the canary
    d = gate.tick()
    assert d["decision"] == "promote" and d["watched_against"] == v1
    assert gate.state()["watch"] == v2 and gate.state()["watch_prev"] == v1
    v3 = publish(registry, 3)
    assert gate.tick()["version"] == v3              # the next test runs while v2 is watched
    assert gate.tick() is None                       # the canary episodes of v2 do not count again
    add(book, v2, "t", 2, 10, robot="r1")            # the whole fleet says otherwise
    assert 'fleetloop_rollout_watch{replaced="v000001",version="v000002"} 1' in render_metrics(gate)
    d = gate.tick()
    assert d["decision"] == "rollback" and d["version"] == v2 and d["to"] == v1 and d["by"] == "rollout-gate"
    assert d["evidence"]["n"] == 12 and d["evidence"]["per_task"]["t"]["reference"] == pytest.approx(17 / 22, abs=1e-3)
    assert registry.pointer()["version"] == v1 and registry.pointer()["pinned"]
    assert registry.resolve("r1").version == v1 and registry.canary() is None
    assert gate.decided()[v2] == "rollback" and gate.decided()[v3] == "abandon"
    assert gate.state()["baseline"] == v1 and gate.state()["watch"] is None and gate.state()["candidate"] is None
    assert [x["decision"] for x in gate.decisions(3)] == ["rollback", "abandon", "canary"]
    assert gate.tick() is None                       # v3 was abandoned: wait for the next version
    v4 = publish(registry, 4)
    assert gate.tick()["version"] == v4 and gate.state()["baseline"] == v1
    assert 'fleetloop_rollout_decisions_total{by="gate",decision="rollback"} 1' in render_metrics(gate)


def test_watch_confirms_settles_and_leaves_operator_moves_alone(registry, redis_client):
    book = EvidenceBook()
    gate = RolloutGate(registry, RolloutSettings(canary_robots=("r9",), max_episodes=30), book)
    v1 = publish(registry, 1)
    gate.tick()
    add(book, v1, "t", 16, 4)
    v2 = publish(registry, 2)
    gate.tick()
    d = gate.manual_promote(v2, by="alice", reason="ship it")   # an operator's promotion is watched too
    assert d["watched_against"] == v1 and gate.state()["watch"] == v2
    add(book, v2, "t", 40, 2, robot="r1")
    d = gate.tick()
    assert d["decision"] == "confirm" and d["version"] == v2 and gate.state()["watch"] is None
    assert registry.pointer()["version"] == v2 and gate.decided()[v2] == "promote"
    # between the hypotheses for max_episodes: the watch ends and the version stays
    add(book, v2, "t", 60, 0, robot="r1")                       # v2's reference: 101/104
    v3 = publish(registry, 3)
    gate.tick()
    gate.manual_promote(v3, by="alice")
    add(book, v3, "t", 27, 3, robot="r1")                       # 0.90: neither 0.97 nor 0.82
    d = gate.tick()
    assert d["decision"] == "settle" and registry.pointer()["version"] == v3 and gate.state()["watch"] is None
    # an operator who moves the fleet by hand ends the watch; a move back is not watched
    v4 = publish(registry, 4)
    gate.tick()
    gate.manual_promote(v4, by="alice")
    registry.pin_fleet(v3, by="bob")
    gate.tick()
    assert gate.state()["watch"] is None and gate.state()["baseline"] == v3
    gate.manual_promote(v2, by="alice", reason="back to a known good one")
    assert gate.state()["watch"] is None
    # switched off in the settings: nothing is watched
    quiet = RolloutGate(registry, RolloutSettings(canary_robots=("r9",), watch=False), book)
    v5 = publish(registry, 5)
    assert "watched_against" not in quiet.manual_promote(v5, by="alice") and quiet.state()["watch"] is None


def test_simulated_fleet_rolls_back_a_broken_version_promoted_by_hand(tmp_path, redis_client):
    """Six simulated robots on the real registry, the gate as its thread: an operator promotes a
    sign-flipped version; every robot runs it until the watch rolls the fleet back."""
    from fleetloop.bench.rollout import scenario_watch
    out = scenario_watch(redis_client, str(tmp_path / "sim"), robots=6, episode_s=0.01,
                         settings=RolloutSettings(tick_s=0.05), timeout=45)
    assert out["decision"] == "rollback" and out["rolled_back_to"] == out["v1"] and out["pointer"] == out["v1"]
    assert out["broken_success"]["rate"] < 0.2
    assert out["episodes_counted"] < 20 and out["broken_episodes"] < 60, out
