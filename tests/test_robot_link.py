"""The robot link: a real gRPC server (the actor daemon) and client, real Redis, a file:// store."""
import time

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from fleetloop import config
from fleetloop.actor.daemon import ActorDaemon, FixedPolicySource
from fleetloop.actor.link import RobotLinkClient
from fleetloop.actor.spool import Spool
from fleetloop.buffer.consumer import DataConsumer
from fleetloop.buffer.index import FrameIndex
from fleetloop.buffer.store import LocalStore
from fleetloop.policy.interface import Observation
from fleetloop.proto.v1 import episode_pb2 as pb
from fleetloop.proto.v1 import policy_pb2


class ConstantPolicy:
    version = "v000007"
    horizon = 4
    action_dim = 4

    def act(self, obs, instruction, indicator=None):
        if obs.state.shape != (6,):
            raise ValueError(f"expected a 6-d state, got {obs.state.shape}")
        return np.full((4, 4), 0.25, np.float32)


@pytest.fixture
def daemon(tmp_path, redis_client):
    store = LocalStore(tmp_path / "store")
    d = ActorDaemon("robot-1", store, redis_client, Spool(tmp_path / "spool"), FixedPolicySource(ConstantPolicy()),
                    grpc_address="127.0.0.1:0", episode_idle_timeout_s=1.0, heartbeat_interval_s=0.2).start()
    yield d
    d.stop()


def obs(t=0):
    return Observation(images={"front": np.full((16, 16, 3), t % 255, np.uint8)}, state=np.arange(6, dtype=np.float32) + t)


def consume_all(store, redis_client, n, timeout=10.0):
    index = FrameIndex()
    consumer = DataConsumer(store, redis_client, index)
    deadline = time.monotonic() + timeout
    while len(index) < n and time.monotonic() < deadline:
        consumer.poll_once(block_ms=50)
    return index


def test_whole_episode_with_intervention_reaches_the_index(daemon, redis_client):
    c = RobotLinkClient(daemon.address, "robot-1")
    eid = c.start_episode("reach-v3", "reach the goal")
    assert c.policy_version == "v000007"
    for t in range(20):
        if t == 8:
            c.begin_intervention("alice", "drift")
        if t == 14:
            c.end_intervention()
        chunk = c.act(obs(t))
        assert chunk.shape == (4, 4)
        c.report_step(obs(t), chunk[0] if not 8 <= t < 14 else [0.9, 0, 0, 0], intervention=8 <= t < 14,
                      policy_chunk=chunk)
    r = c.end_episode(pb.OUTCOME_SUCCESS)
    assert r.num_steps == 20 and r.spooled
    index = consume_all(daemon.store, redis_client, 1)
    e = index.get(eid)
    assert e.policy_version == "v000007" and e.outcome == "success" and e.num_steps == 20
    assert e.intervention.tolist() == [8 <= t < 14 for t in range(20)]
    from fleetloop.buffer.codec import read_manifest
    m = read_manifest(daemon.store, e.manifest_key)
    assert [(s.start_step, s.end_step, s.operator, s.reason) for s in m.interventions] == [(8, 14, "alice", "drift")]
    assert np.allclose(e.actions[8], [0.9, 0, 0, 0])


def test_bad_calls_get_clear_status_codes(daemon):
    c = RobotLinkClient(daemon.address, "robot-1")
    with pytest.raises(grpc.RpcError) as e:
        c.stub.Act(__import__("fleetloop.proto.v1.robot_link_pb2", fromlist=["x"]).ActRequest(episode_id="nope"), timeout=2)
    # out of order (no episode open): FAILED_PRECONDITION, as the service's docstring says
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "StartEpisode" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        c.start_episode("bad task/../id", "x")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    other = RobotLinkClient(daemon.address, "robot-2")
    with pytest.raises(grpc.RpcError) as e:
        other.start_episode("reach-v3", "x")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "robot-1" in e.value.details()
    c.start_episode("reach-v3", "reach")
    with pytest.raises(grpc.RpcError) as e:
        c.report_step(obs(), [float("nan"), 0, 0, 0], intervention=False)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # an id this robot never had open: NOT_FOUND
        c.stub.Act(__import__("fleetloop.proto.v1.robot_link_pb2", fromlist=["x"]).ActRequest(episode_id="nope"), timeout=2)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "not open" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # the policy expects 6-d state
        c.act(Observation(images={}, state=np.zeros(3, np.float32)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "6-d" in e.value.details()
    # the episode is still usable after bad calls: nothing else was lost
    c.report_step(obs(), [0, 0, 0, 0], intervention=False)
    assert c.end_episode(pb.OUTCOME_FAILURE).num_steps == 1


def test_deadline_when_daemon_is_gone():
    from fleetloop.services import free_port
    c = RobotLinkClient(f"127.0.0.1:{free_port()}", "robot-1", timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        c.start_episode("reach-v3", "x")
    assert time.monotonic() - t0 < 3.0
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_robot_disconnect_leaves_incomplete_episode(daemon, redis_client):
    c = RobotLinkClient(daemon.address, "robot-1")
    eid = c.start_episode("push-v3", "push")
    for t in range(5):
        c.report_step(obs(t), [0.1, 0, 0, 0], intervention=False)
    c.close()  # the robot vanishes without EndEpisode
    index = consume_all(daemon.store, redis_client, 1, timeout=10)
    e = index.get(eid)
    assert e.incomplete and e.outcome == "unknown" and e.num_steps == 5


def test_operator_takeover_reaches_the_robot(daemon, redis_client):
    c = RobotLinkClient(daemon.address, "robot-1")
    c.start_episode("reach-v3", "reach")
    c.report_step(obs(), [0, 0, 0, 0], intervention=False)
    assert not c.takeover_requested
    cmd = policy_pb2.ControlCommand(command_id="c1", robot_id="robot-1", action=policy_pb2.CONTROL_ACTION_TAKEOVER,
                                    operator="alice")
    deadline = time.monotonic() + 5
    while not daemon.takeover_requested and time.monotonic() < deadline:
        redis_client.publish(config.CONTROL_CHANNEL_PREFIX + "robot-1", json_format.MessageToJson(cmd))
        time.sleep(0.1)
    c.report_step(obs(1), [0, 0, 0, 0], intervention=False)
    assert c.takeover_requested
    c.begin_intervention("alice", "operator-request")
    c.report_step(obs(2), [0.5, 0, 0, 0], intervention=True)
    c.end_intervention()
    assert not daemon.takeover_requested
    # the heartbeat shows the fleet what this robot is doing
    import json
    status = json.loads(redis_client.hget(config.HEARTBEAT_PREFIX + "robot-1", "status"))
    assert status["robot_id"] == "robot-1" and status["policy_version"] == "v000007"
    c.end_episode(pb.OUTCOME_SUCCESS)
