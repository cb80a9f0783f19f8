"""The robot contract's last edges (issue 21): ids with a trailing newline, text that is not
UTF-8, GetSpec for the next episode's policy, the language cache's bound, decoded-image bounds,
the intervention-episode counter, control characters. A real daemon and gRPC server (raw bytes
through a real channel where a client library would refuse to send them), a real Redis, a
file:// store, the real policy registry and PolicySlot, the real language encoder."""
import json
import logging
import threading
import time

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient

from fleetloop.actor.contract import DecodeBudget, LinkLimits, Rejected, check_id
from fleetloop.actor.daemon import ActorDaemon, FixedPolicySource
from fleetloop.actor.link import RobotLinkClient
from fleetloop.actor.spool import Spool
from fleetloop.actor.weights import PolicySlot
from fleetloop.buffer import codec
from fleetloop.buffer.codec import encode_image
from fleetloop.buffer.store import LocalStore
from fleetloop.dashboard.app import build_app
from fleetloop.dashboard.auth import OPERATOR, TokenConfigError, TokenTable, load_tokens
from fleetloop.policy.backend import ObservationSpec
from fleetloop.release.registry import PolicyRegistry
from fleetloop.proto.v1 import episode_pb2 as pb
from fleetloop.proto.v1 import robot_link_pb2 as rl
from test_robot_contract import SpecPolicy, frame, good_obs, make_daemon, png_header_only, refused, step_req, \
    truncated_png


@pytest.fixture
def daemon(tmp_path, redis_client):
    d = make_daemon(tmp_path, redis_client, FixedPolicySource(SpecPolicy()))
    yield d
    d.stop()


class UnstatedPolicy:
    """A policy that does not describe itself: the daemon cannot tell which cameras it reads."""
    version = "v000004"
    horizon, action_dim = 4, 4

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s

    def act(self, obs, instruction, indicator=None):
        time.sleep(self.delay_s)
        return np.full((4, 4), 0.5, np.float32)


# ---- 1. ids: full matches ---------------------------------------------------------------------

@pytest.mark.parametrize("value", ["arm\n", "reach-v3.1\n"])
def test_ids_with_a_newline_are_refused(value):
    with pytest.raises(ValueError):
        codec.check_id("robot", value)
    with pytest.raises(Rejected):
        check_id("task_id", value, LinkLimits())
    with pytest.raises(TokenConfigError):  # the dashboard's operator names
        TokenTable().add(value, "a-long-operator-token", OPERATOR)


def test_a_task_id_with_a_trailing_newline_is_refused_at_the_door(daemon, tmp_path, redis_client):
    c = RobotLinkClient(daemon.address, "robot-1")
    details = refused(lambda: c.stub.StartEpisode(rl.StartEpisodeRequest(task_id="reach\n", instruction="reach"),
                                                  timeout=5))
    assert "task_id" in details
    eid = c.start_episode("reach", "reach")
    bad_camera = rl.Observation(images=[encode_image(frame(), "front"), encode_image(frame(), "wrist\n")],
                                state=list(np.arange(6, dtype=np.float32)))
    assert "camera name" in refused(lambda: c.stub.ReportStep(step_req(eid, bad_camera), timeout=5))
    with pytest.raises(ValueError):
        ActorDaemon("arm\n", LocalStore(tmp_path / "s"), redis_client, Spool(tmp_path / "sp"),
                    FixedPolicySource(SpecPolicy()), grpc_address="127.0.0.1:0")


# ---- 2. text that is not UTF-8 ------------------------------------------------------------------

def raw_call(daemon, method: str, response_cls):
    """A stub that sends bytes as they are: what a JS or C++ stack with a bad string puts on the wire."""
    channel = grpc.insecure_channel(daemon.address)
    return channel.unary_unary(f"/fleetloop.v1.RobotLink/{method}", request_serializer=lambda b: b,
                               response_deserializer=response_cls.FromString)


LONE_SURROGATE = "\ud800".encode("utf-8", "surrogatepass")  # b"\xed\xa0\x80": JS's lone surrogate


@pytest.mark.parametrize("bad", [b"\xff", LONE_SURROGATE], ids=["0xff", "lone-surrogate"])
def test_text_that_is_not_utf8_is_invalid_argument_naming_the_field(daemon, caplog, bad):
    start = raw_call(daemon, "StartEpisode", rl.StartEpisodeResponse)
    body = rl.StartEpisodeRequest(task_id="reach", instruction="reach the XXX goal").SerializeToString()
    body = body.replace(b"XXX", bad.ljust(3, b"a"))
    caplog.set_level(logging.WARNING)
    for _ in range(5):
        details = refused(lambda: start(body, timeout=5))
        assert details.startswith("instruction is not valid UTF-8"), details
    warnings = [r for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]  # once per robot per minute
    assert not [r for r in caplog.records if "Exception deserializing" in r.getMessage()]

    # nested: a camera name inside an observation inside ReportStep; the episode is untouched
    c = RobotLinkClient(daemon.address, "robot-1")
    eid = c.start_episode("reach", "reach")
    c.stub.ReportStep(step_req(eid, good_obs(0)), timeout=5)
    obs = rl.Observation(images=[encode_image(frame(), "front"), encode_image(frame(), "cYYY")],
                         state=list(np.arange(6, dtype=np.float32)))
    body = step_req(eid, obs).SerializeToString().replace(b"YYY", bad.ljust(3, b"a"))
    report = raw_call(daemon, "ReportStep", rl.ReportStepResponse)
    assert refused(lambda: report(body, timeout=5)).startswith("observation.images[1].camera is not valid UTF-8")
    assert c.stub.ReportStep(step_req(eid, good_obs(1)), timeout=5).steps_recorded == 2

    # bytes that are no message at all: also INVALID_ARGUMENT, not INTERNAL
    assert "not a valid fleetloop.v1.ReportStepRequest" in refused(lambda: report(b"\x0a\xff\xff\xff", timeout=5))


# ---- 3. GetSpec answers for the next episode's policy ------------------------------------------

class CameraPolicy:
    """A policy whose cameras come from its published config."""
    horizon, action_dim = 4, 4

    def __init__(self, cameras):
        self.spec = ObservationSpec(state_dim=6, action_dim=4, horizon=4, cameras=tuple(cameras), image_size=16)
        self.version = ""

    def act(self, obs, instruction, indicator=None):
        return np.zeros((4, 4), np.float32)


def test_get_spec_describes_the_policy_the_next_episode_starts_with(tmp_path, redis_client):
    store = LocalStore(tmp_path / "store")
    registry = PolicyRegistry(store, redis_client)
    slot = PolicySlot(PolicyRegistry(store, redis_client), "robot-1",
                      lambda config_json, weights: CameraPolicy(json.loads(config_json)["cameras"]),
                      poll_interval_s=0.2)
    d = make_daemon(tmp_path, redis_client, slot)
    try:
        c = RobotLinkClient(d.address, "robot-1")
        assert not c.get_spec().spec.known  # nothing published
        registry.publish(b"one", json.dumps({"cameras": ["front"]}))
        assert slot.wait_ready("v000001", timeout=10)
        r = c.get_spec()  # a fresh robot with v000001 pending: its spec, not "unknown"
        assert r.pending_version == "v000001"
        assert r.spec.known and r.spec.policy_version == "v000001" and list(r.spec.cameras) == ["front"]
        assert list(c.status().spec.cameras) == ["front"]

        eid = c.start_episode("reach", "reach")
        registry.publish(b"two", json.dumps({"cameras": ["wrist", "top"]}), parent_version="v000001")
        assert slot.wait_ready("v000002", timeout=10)
        r = c.get_spec()  # during the episode: the open episode's policy (the proto's promise)
        assert r.spec.policy_version == "v000001" and r.pending_version == "v000002"
        c.stub.EndEpisode(rl.EndEpisodeRequest(episode_id=eid, outcome=pb.OUTCOME_SUCCESS), timeout=5)
        r = c.get_spec()  # between episodes: what the next StartEpisode gets
        assert r.spec.policy_version == "v000002" and list(r.spec.cameras) == ["wrist", "top"]
        c.start_episode("reach", "reach")
        assert c.policy_version == "v000002"
    finally:
        d.stop()


# ---- 4. the language encoder's cache is bounded -------------------------------------------------

def test_language_cache_keeps_the_most_recent_instructions():
    from fleetloop.policy.language import CACHE_ENTRIES, LanguageEncoder, get_encoder
    enc = LanguageEncoder(max_cached=3)
    texts = [f"instruction number {i}" for i in range(5)]
    first = [enc.encode(t) for t in texts]
    assert list(enc.cache) == texts[2:]
    assert enc.encode(texts[3]) is first[3]  # cached
    enc.encode(texts[0])  # computed again, evicts the least recently used (texts[2])
    assert list(enc.cache) == [texts[4], texts[3], texts[0]]
    many = enc.encode_many(texts)  # more than the cache holds, in one call
    np.testing.assert_allclose(many, enc.embed(texts), atol=1e-6)
    assert len(enc.cache) == 3 and get_encoder().max_cached == CACHE_ENTRIES


# ---- 5. decoded image bytes are bounded ---------------------------------------------------------

def bomb_obs(cameras, size=2048, data=None):
    """Cameras of size x size RGBA whose PNG claims that size: what 115 KB of zeros decodes to."""
    images = [pb.Image(camera=cam, encoding="png", height=size, width=size, channels=4,
                       data=data if data is not None else png_header_only(size, size, color_type=6))
              for cam in cameras]
    return rl.Observation(images=images, state=list(np.arange(6, dtype=np.float32)))


def test_act_refuses_a_camera_the_policy_does_not_read_before_decoding_it(daemon):
    c = RobotLinkClient(daemon.address, "robot-1")
    eid = c.start_episode("reach", "reach")
    extra = good_obs()
    extra.images.append(pb.Image(camera="wrist", encoding="png", height=16, width=16, channels=3,
                                 data=truncated_png()))  # would be "does not decode" if it were decoded
    details = refused(lambda: c.stub.Act(rl.ActRequest(episode_id=eid, observation=extra), timeout=5))
    assert details.startswith("observation.images[1] (wrist): the policy does not read this camera"), details
    assert c.stub.Act(rl.ActRequest(episode_id=eid, observation=good_obs()), timeout=5).rows > 0


def test_one_call_may_decode_at_most_max_decoded_bytes_per_call(tmp_path, redis_client):
    d = make_daemon(tmp_path, redis_client, FixedPolicySource(UnstatedPolicy()))
    try:
        c = RobotLinkClient(d.address, "robot-1")
        eid = c.start_episode("reach", "reach")
        obs = bomb_obs([f"cam{i}" for i in range(8)])
        assert obs.ByteSize() < 200_000
        for call in (lambda: c.stub.Act(rl.ActRequest(episode_id=eid, observation=obs), timeout=5),
                     lambda: c.stub.ReportStep(step_req(eid, obs), timeout=5)):
            details = refused(call)  # the per-call size, before the (damaged) pixels are read
            assert details == (f"observation: the images decode to {8 * 2048 * 2048 * 4} bytes (height x width x "
                               f"channels, summed), the limit per call is {48 << 20}"), details
        assert c.get_spec().limits.max_decoded_bytes_per_call == 48 << 20
        assert c.get_spec().limits.max_decoded_bytes_in_flight == 128 << 20
    finally:
        d.stop()


def test_calls_share_a_daemon_wide_budget_of_decoded_bytes(tmp_path, redis_client):
    """Two Acts whose images each take the whole budget: the second waits for the first, and
    past its wait gets RESOURCE_EXHAUSTED; once the first is answered the budget is free again."""
    budget = 512 * 512 * 4
    limits = LinkLimits(max_decoded_bytes_per_call=budget, max_decoded_bytes_in_flight=budget)
    d = make_daemon(tmp_path, redis_client, FixedPolicySource(UnstatedPolicy(delay_s=3.0)), limits=limits,
                    inference="sync")
    try:
        c = RobotLinkClient(d.address, "robot-1")
        eid = c.start_episode("reach", "reach")
        obs = rl.Observation(images=[encode_image(np.zeros((512, 512, 4), np.uint8), "front")],
                             state=list(np.arange(6, dtype=np.float32)))
        first: dict = {}
        t = threading.Thread(target=lambda: first.setdefault(
            "r", c.stub.Act(rl.ActRequest(episode_id=eid, observation=obs), timeout=20)))
        t.start()
        deadline = time.monotonic() + 5
        while d.decode_budget.used == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d.decode_budget.used == budget  # held while the policy reads the images
        details = refused(lambda: c.stub.Act(rl.ActRequest(episode_id=eid, observation=obs), timeout=20),
                          grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "the daemon is decoding" in details
        t.join(20)
        assert first["r"].rows > 0 and d.decode_budget.used == 0
        assert c.stub.Act(rl.ActRequest(episode_id=eid, observation=obs), timeout=20).rows > 0
    finally:
        d.stop()


def test_decode_budget_lets_a_waiting_call_in_when_room_frees():
    budget = DecodeBudget(100, wait_s=5.0)
    got = []

    def take():
        with budget.hold(50):
            got.append(budget.used)

    with budget.hold(80):
        t = threading.Thread(target=take)
        t.start()
        time.sleep(0.2)
        assert not got and budget.used == 80
    t.join(5)
    assert got == [50] and budget.used == 0
    with pytest.raises(ValueError):
        LinkLimits(max_decoded_bytes_per_call=10, max_decoded_bytes_in_flight=5)


class CameraRecordingPolicy(SpecPolicy):
    def __init__(self):
        self.seen = []

    def act(self, obs, instruction, indicator=None):
        time.sleep(0.02)  # slower than inference_inline_below_ms: later chunks come from the background
        self.seen.append(sorted(obs.images))
        return super().act(obs, instruction, indicator)


def test_inference_decodes_only_the_cameras_the_policy_reads(tmp_path, redis_client):
    policy = CameraRecordingPolicy()
    d = make_daemon(tmp_path, redis_client, FixedPolicySource(policy))
    try:
        c = RobotLinkClient(d.address, "robot-1")
        eid = c.start_episode("reach", "reach")
        c.stub.Act(rl.ActRequest(episode_id=eid, observation=good_obs()), timeout=5)
        for t in range(12):  # recorded with a wrist camera the policy does not read
            obs = good_obs(t)
            obs.images.append(encode_image(frame(t, 24), "wrist"))
            c.stub.ReportStep(step_req(eid, obs), timeout=5)
            time.sleep(0.02)
        deadline = time.monotonic() + 5
        while len(policy.seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(policy.seen) >= 2  # background chunks from ReportStep's observations
        assert all(s == ["front"] for s in policy.seen), policy.seen
    finally:
        d.stop()


# ---- 6. intervention episodes are counted -------------------------------------------------------

def test_heartbeat_counts_episodes_with_an_intervention(daemon, redis_client):
    from fleetloop import config
    c = RobotLinkClient(daemon.address, "robot-1")
    for flagged, segment in ((True, False), (False, False), (False, True), (False, False)):
        eid = c.start_episode("reach", "reach")
        if segment:
            c.begin_intervention("alice", "drift")
        for t in range(3):
            c.stub.ReportStep(step_req(eid, good_obs(t), intervention=flagged and t == 1, operator="bob"), timeout=5)
        c.end_episode(pb.OUTCOME_SUCCESS)
    daemon.heartbeat()
    status = json.loads(redis_client.hget(config.HEARTBEAT_PREFIX + "robot-1", "status"))
    assert status["counters"]["episodes"] == 4
    assert status["counters"]["intervention_episodes"] == 2
    assert status["counters"]["intervention_steps"] == 4


# ---- 7. control characters ----------------------------------------------------------------------

CONTROLS = {"NUL": "\x00", "ESC": "\x1b[31m", "RLO": "\u202e", "LF": "\n", "CR": "\r", "DEL": "\x7f",
            "LSEP": "\u2028"}


@pytest.mark.parametrize("name", CONTROLS)
def test_control_characters_in_robot_text_are_refused(daemon, name):
    ch = CONTROLS[name]
    c = RobotLinkClient(daemon.address, "robot-1")
    details = refused(lambda: c.stub.StartEpisode(rl.StartEpisodeRequest(task_id="reach",
                                                                         instruction=f"reach{ch}the goal"), timeout=5))
    assert details.startswith(f"instruction has a control character (U+{ord(ch[0]):04X}) at character 5"), details
    eid = c.start_episode("reach", "reach the goal, then wave 👋 (Größe egal)")  # printable Unicode is fine
    assert "operator has a control character" in refused(
        lambda: c.stub.ReportStep(step_req(eid, intervention=True, operator=f"bob{ch}"), timeout=5))
    for field in ("operator", "reason"):
        req = rl.InterventionRequest(episode_id=eid, **{field: f"x{ch}"})
        assert f"{field} has a control character" in refused(lambda: c.stub.BeginIntervention(req, timeout=5))
    assert "labelled_by has a control character" in refused(lambda: c.stub.EndEpisode(
        rl.EndEpisodeRequest(episode_id=eid, outcome=pb.OUTCOME_SUCCESS, labelled_by=f"eve{ch}"), timeout=5))
    c.stub.ReportStep(step_req(eid), timeout=5)  # the episode is still open and takes good steps
    assert c.end_episode(pb.OUTCOME_SUCCESS).num_steps == 1


def test_control_characters_in_operator_names_and_reasons_are_refused(tmp_path, redis_client):
    for name in ("alice\n", "al\u202eice", "bob\x1b"):
        path = tmp_path / "tokens.json"
        path.write_text(json.dumps({"operators": {name: "a-long-operator-token"}}))
        with pytest.raises(TokenConfigError, match="bad token name"):
            load_tokens(str(path), environ={})
    table = TokenTable()
    table.add("alice", "alice-operator-token-0001", OPERATOR)
    app, _ = build_app(redis_client, LocalStore(tmp_path / "store"), table, offline_after_s=1.0)
    with TestClient(app) as client:
        r = client.post("/api/robots/robot-1/takeover", json={"reason": "drift\x1b[2J"},
                        headers={"Authorization": "Bearer alice-operator-token-0001"})
        assert r.status_code == 422 and "control character" in json.dumps(r.json()), r.text
