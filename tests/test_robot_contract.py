"""The robot contract (issue 11): validation at the door, discovery of the policy's spec and the
limits, demonstrations before any policy, bounded memory from robot input. A real daemon and
gRPC server, a real Redis, a file:// store, the real consumer."""
import io
import struct
import time
import zlib

import grpc
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from fleetloop import config
from fleetloop.actor.contract import LinkLimits
from fleetloop.actor.daemon import ActorDaemon, FixedPolicySource
from fleetloop.actor.link import RobotLinkClient
from fleetloop.actor.spool import Spool
from fleetloop.buffer.codec import encode_image, read_manifest
from fleetloop.buffer.consumer import DataConsumer
from fleetloop.buffer.index import FrameIndex
from fleetloop.buffer.store import LocalStore
from fleetloop.policy.backend import ObservationSpec, PolicyModel
from fleetloop.proto.v1 import episode_pb2 as pb
from fleetloop.proto.v1 import robot_link_pb2 as rl

SPEC = ObservationSpec(state_dim=6, action_dim=4, horizon=4, cameras=("front",), image_size=16)


class SpecPolicy:
    """A policy that states what it expects, as every fleetloop backend does (PolicyRuntime.spec)."""
    version = "v000003"
    horizon, action_dim = 4, 4
    spec = SPEC

    def act(self, obs, instruction, indicator=None):
        return np.full((4, 4), 0.5, np.float32)


class NoPolicySource:
    """A robot before anything is published: begin_episode raises like PolicySlot does."""

    def begin_episode(self):
        from fleetloop.actor.weights import NoPolicyYet
        raise NoPolicyYet("robot robot-1: no policy loaded yet (nothing published?)")

    def status(self):
        return {"current_version": None, "pending_version": None}

    def start(self):
        pass

    def stop(self):
        pass


def make_daemon(tmp_path, redis_client, source, **kw):
    store = LocalStore(tmp_path / "store")
    return ActorDaemon("robot-1", store, redis_client, Spool(tmp_path / "spool"), source,
                       grpc_address="127.0.0.1:0", episode_idle_timeout_s=30.0, heartbeat_interval_s=0.2,
                       **kw).start()


@pytest.fixture
def daemon(tmp_path, redis_client):
    d = make_daemon(tmp_path, redis_client, FixedPolicySource(SpecPolicy()))
    yield d
    d.stop()


def frame(t=0, size=16):
    return np.full((size, size, 3), t % 255, np.uint8)


def good_obs(t=0):
    return rl.Observation(images=[encode_image(frame(t), "front")], state=list(np.arange(6, dtype=np.float32) + t))


def step_req(eid, obs=None, action=(0.1, 0, 0, 0), **kw):
    return rl.ReportStepRequest(episode_id=eid, observation=obs if obs is not None else good_obs(),
                                action=list(action), **kw)


def png_header_only(width, height, color_type=2):
    """A PNG whose header claims width x height and whose pixel data is a few bytes: what a
    decompression bomb looks like to a reader that trusts the header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def truncated_png():
    """A PNG of the right size whose pixel data stops half-way (a torn camera buffer)."""
    noise = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    data = encode_image(noise, "front").data
    return data[:len(data) // 2]


def refused(call, code=grpc.StatusCode.INVALID_ARGUMENT):
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, (e.value.code(), e.value.details())
    details = e.value.details()
    assert len(details) < 300 and "object at 0x" not in details, details
    return details


def consume(store, redis_client, n, timeout=15.0):
    index = FrameIndex()
    consumer = DataConsumer(store, redis_client, index)
    deadline = time.monotonic() + timeout
    while len(index) < n and time.monotonic() < deadline:
        consumer.poll_once(block_ms=50)
    return index, consumer


# ---- 1. validation at the door ----------------------------------------------------------------

def test_bad_steps_are_refused_with_their_reason_and_good_steps_kept(daemon, redis_client):
    c = RobotLinkClient(daemon.address, "robot-1")
    eid = c.start_episode("reach-v3", "reach the goal")
    s = c.stub
    good = 0
    for t in range(3):
        s.ReportStep(step_req(eid, good_obs(t)), timeout=5)
        good += 1

    def bad(obs=None, action=(0.1, 0, 0, 0), **kw):
        return lambda: s.ReportStep(step_req(eid, obs, action, **kw), timeout=5)

    def with_image(**fields):
        img = encode_image(frame(), "front")
        for k, v in fields.items():
            setattr(img, k, v)
        return rl.Observation(images=[img], state=list(np.arange(6, dtype=np.float32)))

    cases = {
        "action has 5 values, the policy's actions have 4": bad(action=(0, 0, 0, 0, 0)),
        "action is required": bad(action=()),
        "action[2] is NaN": bad(action=(0, 0, float("nan"), 0)),
        "state has 7 values, the policy expects 6": bad(rl.Observation(images=good_obs().images, state=[0.0] * 7)),
        "state[1] is NaN": bad(rl.Observation(images=good_obs().images, state=[0, float("inf"), 0, 0, 0, 0])),
        "reward is NaN": bad(reward=float("nan")),
        "policy_chunk[0] is NaN": bad(policy_chunk=[float("nan")] * 4),
        "not a multiple of the action's 4": bad(policy_chunk=[0.0] * 6),
        "raw data has 10 bytes, height x width x channels is 768":
            bad(with_image(encoding="raw", data=b"0123456789")),
        "the PNG does not decode": bad(with_image(data=truncated_png())),
        "the PNG has no header": bad(with_image(data=b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)),
        "is not a PNG": bad(with_image(data=b"GIF89a....")),
        "9000x9000 is 81000000 pixels, the limit is 4194304":
            bad(with_image(height=9000, width=9000, data=png_header_only(9000, 9000))),
        "the PNG is 30000x30000, the message declares 16x16": bad(with_image(data=png_header_only(30000, 30000))),
        "the PNG has 3 channels, the message declares 4": bad(with_image(channels=4)),
        "encoding 'jpeg' is not one of png, raw": bad(with_image(encoding="jpeg")),
        "the policy expects 16x16x3": bad(rl.Observation(images=[encode_image(frame(0, 32), "front")],
                                                         state=[0.0] * 6)),
        "camera 'front' is missing": bad(rl.Observation(images=[encode_image(frame(), "wrist")], state=[0.0] * 6)),
        "appears twice": bad(rl.Observation(images=[encode_image(frame(), "front")] * 2, state=[0.0] * 6)),
        "cameras ['front', 'wrist'], this episode's steps have ['front']":
            bad(rl.Observation(images=[encode_image(frame(), "front"), encode_image(frame(), "wrist")],
                               state=[0.0] * 6)),
        "operator is 200 bytes": bad(operator="x" * 200, intervention=True),
    }
    for expected, call in cases.items():
        details = refused(call)
        assert expected in details, (expected, details)
        # the episode stays open and keeps its good steps: a good step still lands after each refusal
        s.ReportStep(step_req(eid, good_obs(good)), timeout=5)
        good += 1
    r = c.end_episode(pb.OUTCOME_SUCCESS)
    assert r.num_steps == good and r.spooled
    index, consumer = consume(daemon.store, redis_client, 1)
    e = index.get(eid)
    assert e is not None and e.num_steps == good and consumer.stats.dead_lettered == 0
    assert np.allclose(e.actions, [[0.1, 0, 0, 0]] * good)


def test_episode_shape_is_fixed_by_its_first_step(tmp_path, redis_client):
    """A policy that does not state its spec: the first step sets the dims and camera sizes."""
    from test_robot_link import ConstantPolicy
    d = make_daemon(tmp_path, redis_client, FixedPolicySource(ConstantPolicy()))
    try:
        c = RobotLinkClient(d.address, "robot-1")
        eid = c.start_episode("reach-v3", "reach")
        c.stub.ReportStep(step_req(eid, rl.Observation(images=[encode_image(frame(0, 16), "front")],
                                                       state=[0.0] * 6)), timeout=5)
        assert "state has 5 values, this episode's steps have 6" in refused(lambda: c.stub.ReportStep(
            step_req(eid, rl.Observation(images=[encode_image(frame(0, 16), "front")], state=[0.0] * 5)), timeout=5))
        assert "camera front is 32x32x3, this episode's steps have 16x16x3" in refused(lambda: c.stub.ReportStep(
            step_req(eid, rl.Observation(images=[encode_image(frame(0, 32), "front")], state=[0.0] * 6)), timeout=5))
        # Act's observation is checked the same way before the policy sees it
        assert "this episode's steps have 6" in refused(lambda: c.stub.Act(rl.ActRequest(
            episode_id=eid, observation=rl.Observation(state=[0.0] * 3)), timeout=5))
        assert c.end_episode(pb.OUTCOME_FAILURE).num_steps == 1
    finally:
        d.stop()


def test_act_refuses_a_decompression_bomb_and_a_corrupt_png(daemon):
    c = RobotLinkClient(daemon.address, "robot-1")
    eid = c.start_episode("reach-v3", "reach")
    bomb = pb.Image(camera="front", encoding="png", height=16, width=16, channels=3, data=png_header_only(30000, 30000))
    details = refused(lambda: c.stub.Act(rl.ActRequest(episode_id=eid, observation=rl.Observation(
        images=[bomb], state=[0.0] * 6)), timeout=5))  # was UNKNOWN (PIL's DecompressionBombError)
    assert "30000x30000" in details
    corrupt = pb.Image(camera="front", encoding="png", height=16, width=16, channels=3, data=truncated_png())
    details = refused(lambda: c.stub.Act(rl.ActRequest(episode_id=eid, observation=rl.Observation(
        images=[corrupt], state=[0.0] * 6)), timeout=5))
    assert "does not decode" in details and "BytesIO" not in details
    r = c.stub.Act(rl.ActRequest(episode_id=eid, observation=good_obs()), timeout=5)
    assert r.action_dim == 4 and r.rows >= 1


def test_calls_out_of_order_and_long_inputs_get_short_messages(daemon):
    c = RobotLinkClient(daemon.address, "robot-1")
    s = c.stub
    # no episode open: FAILED_PRECONDITION (the docstring's promise), not NOT_FOUND
    assert "call StartEpisode first" in refused(lambda: s.ReportStep(step_req("20260101-x"), timeout=5),
                                                grpc.StatusCode.FAILED_PRECONDITION)
    eid = c.start_episode("reach-v3", "reach")
    s.ReportStep(step_req(eid), timeout=5)
    c.end_episode(pb.OUTCOME_SUCCESS)
    assert f"episode {eid} has ended" in refused(lambda: s.ReportStep(step_req(eid), timeout=5),
                                                 grpc.StatusCode.FAILED_PRECONDITION)
    assert "has ended" in refused(lambda: s.EndEpisode(rl.EndEpisodeRequest(episode_id=eid), timeout=5),
                                  grpc.StatusCode.FAILED_PRECONDITION)
    eid2 = c.start_episode("reach-v3", "reach")
    refused(lambda: s.ReportStep(step_req("not-this-one"), timeout=5), grpc.StatusCode.NOT_FOUND)
    # a 1 MB id or instruction: refused with a short message (the whole input echoed back would
    # overflow gRPC's metadata limit and the robot would see a transport error instead)
    huge = "a" * (1 << 20)
    assert "episode_id is 1048576 bytes, the limit is 128" in refused(
        lambda: s.ReportStep(step_req(huge), timeout=5))
    assert "task_id is 1048576 bytes" in refused(lambda: c.start_episode(huge, "x"))
    assert "robot_id is 1048576 bytes" in refused(lambda: s.StartEpisode(rl.StartEpisodeRequest(
        robot_id=huge, task_id="reach-v3"), timeout=5))
    assert "invalid task_id 'bad task/../id'" in refused(lambda: c.start_episode("bad task/../id", "x"))
    assert "instruction is 1048576 bytes, the limit is 1024" in refused(lambda: c.start_episode("reach-v3", huge))
    assert "kind 7 is not an EpisodeKind" in refused(lambda: s.StartEpisode(rl.StartEpisodeRequest(
        task_id="reach-v3", kind=7), timeout=5))
    assert "outcome 9" in refused(lambda: s.EndEpisode(rl.EndEpisodeRequest(episode_id=daemon.open_episode.episode_id,
                                                                            outcome=9), timeout=5))
    # the refused StartEpisodes left the open episode alone (the refusals happen before anything changes)
    assert daemon.open_episode is not None and daemon.open_episode.episode_id == eid2


def test_message_over_the_limit_is_refused_and_the_service_answers(tmp_path, redis_client):
    d = make_daemon(tmp_path, redis_client, FixedPolicySource(SpecPolicy()),
                    limits=LinkLimits(max_message_bytes=1 << 20))
    try:
        c = RobotLinkClient(d.address, "robot-1")
        eid = c.start_episode("reach-v3", "reach")
        big = pb.Image(camera="front", encoding="raw", height=1024, width=1024, channels=3, data=b"\0" * (3 << 20))
        refused(lambda: c.stub.ReportStep(step_req(eid, rl.Observation(images=[big], state=[0.0] * 6)), timeout=5),
                grpc.StatusCode.RESOURCE_EXHAUSTED)
        c.stub.ReportStep(step_req(eid), timeout=5)
        assert c.end_episode(pb.OUTCOME_SUCCESS).num_steps == 1
    finally:
        d.stop()


def test_full_episode_is_out_of_range(tmp_path, redis_client):
    d = make_daemon(tmp_path, redis_client, FixedPolicySource(SpecPolicy()),
                    limits=LinkLimits(max_steps_per_episode=5))
    try:
        c = RobotLinkClient(d.address, "robot-1")
        eid = c.start_episode("reach-v3", "reach")
        for _ in range(5):
            c.stub.ReportStep(step_req(eid), timeout=5)
        assert "end it and start another" in refused(lambda: c.stub.ReportStep(step_req(eid), timeout=5),
                                                     grpc.StatusCode.OUT_OF_RANGE)
        assert c.end_episode(pb.OUTCOME_SUCCESS).num_steps == 5
    finally:
        d.stop()


# ---- 2. discovery -------------------------------------------------------------------------------

def test_get_spec_and_status_say_what_to_send(daemon):
    c = RobotLinkClient(daemon.address, "robot-1")
    r = c.stub.GetSpec(rl.GetSpecRequest(), timeout=5)
    s = r.spec
    assert s.known and s.policy_version == "v000003"
    assert (s.state_dim, s.action_dim, s.horizon) == (6, 4, 4)
    assert list(s.cameras) == ["front"] and (s.image_height, s.image_width, s.image_channels) == (16, 16, 3)
    assert list(s.image_encodings) == ["png", "raw"]
    lim = r.limits
    assert lim.max_instruction_bytes == 1024 and lim.max_image_pixels == 2048 * 2048
    assert lim.max_steps_per_episode == 20_000 and lim.max_message_bytes == 32 << 20 and lim.max_id_bytes == 128
    assert lim.episode_idle_timeout_s == 30.0
    st = c.status()
    assert st.spec == s and st.limits == lim


def test_spec_of_a_real_policy_runtime(tmp_path, redis_client):
    """PolicyRuntime.spec (the seam every backend implements) is what GetSpec reports."""
    from fleetloop.release.runtime import PolicyRuntime
    runtime = PolicyRuntime(TinyModel(), version="v000009")
    d = make_daemon(tmp_path, redis_client, FixedPolicySource(runtime))
    try:
        s = RobotLinkClient(d.address, "robot-1").stub.GetSpec(rl.GetSpecRequest(), timeout=5).spec
        assert s.known and (s.state_dim, s.action_dim, s.horizon) == (5, 3, 2) and list(s.cameras) == []
        assert s.image_height == 0
    finally:
        d.stop()


# ---- 3. demonstrations without a policy ---------------------------------------------------------

def test_demonstrations_before_any_policy_is_published(tmp_path, redis_client):
    d = make_daemon(tmp_path, redis_client, NoPolicySource())
    try:
        c = RobotLinkClient(d.address, "robot-1")
        assert not c.stub.GetSpec(rl.GetSpecRequest(), timeout=5).spec.known
        assert "demonstrations can be recorded" in refused(lambda: c.start_episode("reach-v3", "reach"),
                                                           grpc.StatusCode.UNAVAILABLE)
        eid = c.start_episode("reach-v3", "reach the goal", kind=pb.EPISODE_KIND_DEMONSTRATION)
        assert c.policy_version == ""
        assert "no actions to serve" in refused(lambda: c.stub.Act(rl.ActRequest(episode_id=eid, observation=good_obs()),
                                                                   timeout=5), grpc.StatusCode.FAILED_PRECONDITION)
        for t in range(6):
            c.stub.ReportStep(step_req(eid, good_obs(t), intervention=True, operator="teleop-alice"), timeout=5)
        # the door still holds without a spec: the first step fixes the episode's shape
        assert "this episode's steps have 6" in refused(lambda: c.stub.ReportStep(
            step_req(eid, rl.Observation(images=good_obs().images, state=[0.0] * 2)), timeout=5))
        assert c.end_episode(pb.OUTCOME_SUCCESS).num_steps == 6
        index, _ = consume(d.store, redis_client, 1)
        e = index.get(eid)
        m = read_manifest(d.store, e.manifest_key)
        assert m.kind == pb.EPISODE_KIND_DEMONSTRATION and m.policy_version == "" and m.num_steps == 6
        assert [(s.start_step, s.end_step, s.operator) for s in m.interventions] == [(0, 6, "teleop-alice")]
    finally:
        d.stop()


def test_a_demonstration_records_no_policy_version_even_with_a_policy(daemon, redis_client):
    c = RobotLinkClient(daemon.address, "robot-1")
    eid = c.start_episode("reach-v3", "reach", kind=pb.EPISODE_KIND_DEMONSTRATION)
    c.stub.ReportStep(step_req(eid, intervention=True), timeout=5)
    c.end_episode(pb.OUTCOME_SUCCESS)
    index, _ = consume(daemon.store, redis_client, 1)
    m = read_manifest(daemon.store, index.get(eid).manifest_key)
    assert m.policy_version == "" and m.kind == pb.EPISODE_KIND_DEMONSTRATION  # was the policy's version


# ---- 5. the smaller defects ---------------------------------------------------------------------

def test_flag_only_intervention_segments_name_the_operator(daemon, redis_client):
    c = RobotLinkClient(daemon.address, "robot-1")
    eid = c.start_episode("reach-v3", "reach")
    for t in range(9):
        flagged = 2 <= t < 5 or t >= 7
        c.stub.ReportStep(step_req(eid, good_obs(t), intervention=flagged,
                                   operator="bob" if 2 <= t < 5 else ""), timeout=5)
    c.end_episode(pb.OUTCOME_SUCCESS)
    index, _ = consume(daemon.store, redis_client, 1)
    m = read_manifest(daemon.store, index.get(eid).manifest_key)
    assert [(s.start_step, s.end_step, s.operator, s.reason) for s in m.interventions] == [
        (2, 5, "bob", "unspecified"), (7, 9, "unknown", "unspecified")]


def test_daemon_manifests_carry_action_and_state_dims(daemon, redis_client):
    c = RobotLinkClient(daemon.address, "robot-1")
    eid = c.start_episode("reach-v3", "reach")
    c.stub.ReportStep(step_req(eid), timeout=5)
    c.end_episode(pb.OUTCOME_SUCCESS)
    index, _ = consume(daemon.store, redis_client, 1)
    m = read_manifest(daemon.store, index.get(eid).manifest_key)
    assert (m.action_dim, m.state_dim, list(m.cameras)) == (4, 6, ["front"])


# ---- 6. bounded memory --------------------------------------------------------------------------

class TinyModel(PolicyModel):
    """The smallest PolicyModel: lets the real PolicyRuntime (its instruction cache, its spec) run
    without loading a language model."""
    backend = "test-tiny"

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 6)
        self.featurized = 0

    @property
    def spec(self):
        return ObservationSpec(state_dim=5, action_dim=3, horizon=2)

    def featurize_instruction(self, instruction):
        self.featurized += 1
        return np.zeros(8, np.float32)

    def sample_actions(self, inputs, beta=1.0):
        return self.lin(inputs["state"]).reshape(1, 2, 3)


def test_instruction_cache_stays_bounded_over_many_distinct_instructions(tmp_path, redis_client):
    from fleetloop.release.runtime import INSTRUCTION_CACHE_SIZE, PolicyRuntime
    runtime = PolicyRuntime(TinyModel(), version="v000001")
    d = make_daemon(tmp_path, redis_client, FixedPolicySource(runtime), inference="sync")
    try:
        c = RobotLinkClient(d.address, "robot-1")
        n = INSTRUCTION_CACHE_SIZE + 60
        for i in range(n):
            eid = c.start_episode("reach-v3", f"instruction {i} " + "x" * 900)
            c.stub.Act(rl.ActRequest(episode_id=eid, observation=rl.Observation(state=[0.0] * 5)), timeout=5)
            c.stub.EndEpisode(rl.EndEpisodeRequest(episode_id=eid), timeout=5)
        assert runtime.model.featurized == n
        assert len(runtime._lang) <= INSTRUCTION_CACHE_SIZE
        assert c.status().robot_id == "robot-1"  # still answering
    finally:
        d.stop(drain_timeout_s=30)


def test_redis_grows_by_a_bounded_amount_per_episode(tmp_path, redis_client):
    """Every episode event carries the manifest (with the instruction): the instruction limit
    bounds what one episode adds to Redis."""
    d = make_daemon(tmp_path, redis_client, FixedPolicySource(SpecPolicy()))
    try:
        c = RobotLinkClient(d.address, "robot-1")
        refused(lambda: c.start_episode("reach-v3", "y" * (1 << 20)))
        n = 20
        for i in range(n):
            eid = c.start_episode("reach-v3", "x" * d.limits.max_instruction_bytes)
            c.stub.ReportStep(step_req(eid), timeout=5)
            c.end_episode(pb.OUTCOME_SUCCESS)
        deadline = time.monotonic() + 30
        while redis_client.xlen(config.EPISODE_STREAM) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert redis_client.xlen(config.EPISODE_STREAM) == n
        per_episode = redis_client.memory_usage(config.EPISODE_STREAM) / n
        assert per_episode < 8 * 1024, per_episode  # was ~1 MB per episode with a 1 MB instruction
    finally:
        d.stop()


def test_a_huge_frame_is_refused_unread_and_the_service_answers(daemon):
    """A 9000x9000 frame (what took the dashboard 5 s and ~700 MB to thumbnail) never reaches the
    store: the pixel limit is checked on the declared size and the PNG header, before decoding."""
    c = RobotLinkClient(daemon.address, "robot-1")
    eid = c.start_episode("reach-v3", "reach")
    buf = io.BytesIO()
    PILImage.new("RGB", (9000, 9000)).save(buf, format="PNG", compress_level=9)
    img = pb.Image(camera="front", encoding="png", height=9000, width=9000, channels=3, data=buf.getvalue())
    assert "the limit is 4194304" in refused(lambda: c.stub.ReportStep(
        step_req(eid, rl.Observation(images=[img], state=[0.0] * 6)), timeout=30))
    c.stub.ReportStep(step_req(eid), timeout=5)
    assert c.end_episode(pb.OUTCOME_SUCCESS).num_steps == 1
