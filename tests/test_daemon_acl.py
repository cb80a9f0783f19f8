"""Least privilege at the daemon level (issue 12, item 2): a full ActorDaemon whose only Redis
credentials are its robot's own ACL user (from `fleetloop credentials issue`, loaded into a real
redis-server with --aclfile; its writes go through the write gate, `fleetloop ingest`, with the
same user and password) records and uploads an episode, heartbeats, follows the policy
channel (a new version arrives by notice, not by polling), hears its own control channel and acks
a command -- and with those same credentials cannot publish a policy notice, move the fleet
pointer, pin, set a canary or roll back. The learner's own ACL user then ingests the episode."""
from __future__ import annotations

import json

import numpy as np
import pytest
import redis

from fleetloop import config
from fleetloop.actor.daemon import ActorDaemon
from fleetloop.actor.link import RobotLinkClient
from fleetloop.actor.spool import Spool
from fleetloop.actor.weights import PolicySlot
from fleetloop.buffer.codec import manifest_key, read_manifest
from fleetloop.buffer.store import LocalStore
from fleetloop.dashboard.app import DashboardServer
from fleetloop.ingest import GatewayWrites, RedisAuth, RobotGate, make_app
from fleetloop.policy.interface import Observation
from fleetloop.release.registry import PolicyRegistry
from fleetloop.proto.v1 import episode_pb2 as pb
from fleetloop.proto.v1 import policy_pb2
from google.protobuf import json_format

from polling import wait_until
from test_credentials import _redis_major, acl_redis_server
from test_robot_contract import SPEC, consume

pytestmark = [pytest.mark.skipif(_redis_major() < 7, reason="ACL selectors need Redis >= 7"),
              pytest.mark.timeout(120)]


class LoadedPolicy:
    spec = SPEC
    horizon, action_dim = 4, 4

    def __init__(self, version: str, value: float):
        self.version, self.value = version, value

    def act(self, obs, instruction, indicator=None):
        return np.full((4, 4), self.value, np.float32)


def load_fn(config_json: str, weights: bytes, version: str):
    return LoadedPolicy(version, json.loads(config_json)["value"])


@pytest.fixture
def acl_redis(tmp_path):
    """(connect(user), the robot's writes): Redis on the issued ACL file, and the write gate
    (`fleetloop ingest`) on its own identity, which the robot reaches with its own credentials."""
    with acl_redis_server(tmp_path, ["arm-1", "arm-2"]) as (connect, secrets_dir):
        passwords = json.loads((secrets_dir / "passwords.json").read_text())
        port = connect("ingest").connection_pool.connection_kwargs["port"]
        app = make_app(RobotGate(connect("ingest")), RedisAuth(f"redis://127.0.0.1:{port}/0"))
        with DashboardServer(app) as gate:
            yield connect, GatewayWrites(gate.url, "arm-1", "robot-arm-1", passwords["robot-arm-1"])


def test_daemon_on_robot_credentials(acl_redis, tmp_path):
    connect, writes = acl_redis
    learner, dashboard, robot = connect("learner"), connect("dashboard"), connect("robot-arm-1")
    store = LocalStore(tmp_path / "store")
    learner_reg = PolicyRegistry(store, learner)
    v1 = learner_reg.publish(b"w1", json.dumps({"value": 0.25}), learner_step=1).version

    # notices only: a poll interval far longer than the test, so v2 can only arrive by the channel
    slot = PolicySlot(PolicyRegistry(store, robot), "arm-1", load_fn, poll_interval_s=600.0)
    d = ActorDaemon("arm-1", store, robot, Spool(tmp_path / "spool"), slot, grpc_address="127.0.0.1:0",
                    heartbeat_interval_s=0.2, writes=writes).start()
    try:
        assert slot.wait_ready(v1, timeout=15)
        link = RobotLinkClient(d.address, "arm-1", timeout_s=10)

        # -- one episode, recorded and uploaded with the robot's own credentials ------------
        rng = np.random.default_rng(0)
        eid = link.start_episode("reach-v3", "reach")
        assert link.policy_version == v1
        for _ in range(5):
            obs = Observation(images={"front": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)},
                              state=rng.standard_normal(6).astype(np.float32))
            chunk = link.act(obs)
            assert np.allclose(chunk, 0.25)
            link.report_step(obs, chunk[0], intervention=False)
        end = link.end_episode(pb.OUTCOME_SUCCESS)
        assert end.num_steps == 5 and end.spooled
        key = manifest_key("arm-1", eid)
        wait_until("the manifest in the store", lambda: store.exists(key))
        assert read_manifest(store, key).policy_version == v1
        wait_until("the episode event in the stream", lambda: learner.xlen(config.EPISODE_STREAM) >= 1)
        assert d.uploader.failures == 0, d.uploader.last_error
        # the learner's own user ingests it
        index, _consumer = consume(store, learner, 1)
        assert index.get(eid) is not None

        # -- heartbeat: the dashboard's user reads what the robot's user wrote -------------------
        status = wait_until("a heartbeat", lambda: dashboard.hget(config.HEARTBEAT_PREFIX + "arm-1", "status"))
        assert json.loads(status)["robot_id"] == "arm-1"
        assert b"arm-1" in dashboard.smembers(config.HEARTBEAT_PREFIX + "all")

        # -- the policy channel: a new version arrives by notice and swaps in at the next episode --
        v2 = learner_reg.publish(b"w2", json.dumps({"value": 0.75}), parent_version=v1, learner_step=2).version
        assert slot.wait_ready(v2, timeout=15), slot.status()
        link.start_episode("reach-v3", "reach")
        assert link.policy_version == v2
        link.end_episode(pb.OUTCOME_FAILURE)

        # -- its own control channel: an operator's takeover is applied and acknowledged ----------
        cmd = policy_pb2.ControlCommand(command_id="c-1", robot_id="arm-1", operator="alice",
                                        action=policy_pb2.CONTROL_ACTION_TAKEOVER)
        wait_until("the daemon to listen on its control channel",
             lambda: dashboard.publish(config.CONTROL_CHANNEL_PREFIX + "arm-1", json_format.MessageToJson(cmd)) >= 1)
        wait_until("the takeover", lambda: d.takeover_requested)
        acks = wait_until("the ack", lambda: dashboard.xrange(config.CONTROL_CHANNEL_PREFIX + "acks"))
        assert acks[-1][1][b"command_id"] == b"c-1" and acks[-1][1][b"robot_id"] == b"arm-1"
        link.close()

        # -- with the daemon's credentials nothing moves the fleet's policy -------------------------
        robot_reg = PolicyRegistry(store, robot)
        attempts = {
            "publish a version": lambda: robot_reg.publish(b"evil", json.dumps({"value": 9.0}), learner_step=99),
            "publish a notice": lambda: robot.publish(config.POLICY_CHANNEL, json.dumps({"version": "v000999"})),
            "move the pointer": lambda: robot.hset(config.POLICY_POINTER, "version", v1),
            "promote": lambda: robot_reg.promote(v1, by="arm-1"),
            "roll back": lambda: robot_reg.rollback(by="arm-1"),
            "pin a robot": lambda: robot_reg.pin_robot("arm-2", v1, by="arm-1"),
            "set a canary": lambda: robot_reg.set_canary(v1, ["arm-2"], fraction=None),
            "command another robot": lambda: robot.publish(config.CONTROL_CHANNEL_PREFIX + "arm-2", "{}"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
        assert learner_reg.pointer()["version"] == v2, "the pointer moved"
        assert learner_reg.resolve("arm-2").version == v2
        assert not learner.hgetall(f"{config.POLICY_POINTER.rsplit(':', 1)[0]}:canary")
        assert learner_reg.latest_version() == v2
        assert d.uploader.failures == 0
    finally:
        d.stop()
