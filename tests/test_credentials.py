"""Least privilege (issue 12, item 2) against a real redis-server running the ACL file that
`fleetloop credentials issue` writes: a robot's own credentials do what a robot does in Redis (hear
policy notices and its own commands, resolve its target; its writes go through the write gate,
tests/test_robot_writes.py) and cannot move
the fleet's policy in any way, nor listen to another robot. Plus the consumer's check that an
episode's robot id is the robot that wrote it."""
from __future__ import annotations

import contextlib
import json
import subprocess
import time

import pytest
import redis

from fleetloop import config
from fleetloop.buffer.store import LocalStore
from fleetloop.credentials import issue, s3_policy
from fleetloop.release.registry import PolicyRegistry
from fleetloop.services import _wait_port, free_port, redis_server_binary


def _redis_major() -> int:
    out = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True).stdout
    try:
        return int(out.split("v=")[1].split(".")[0])
    except (IndexError, ValueError):
        return 0


pytestmark = pytest.mark.skipif(_redis_major() < 7, reason="ACL selectors need Redis >= 7")


@contextlib.contextmanager
def acl_redis_server(tmp_path, robots):
    """A real redis-server running the ACL file `fleetloop credentials issue` wrote for `robots`;
    yields (connect(user) -> client, the secrets dir)."""
    secrets_dir = tmp_path / "secrets"
    passwords = issue(secrets_dir, robots, redis_host="127.0.0.1:0")
    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--aclfile", str(secrets_dir / "redis" / "users.acl"),
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc, "redis-server")

        def connect(user: str) -> redis.Redis:
            return redis.Redis(port=port, username=user, password=passwords[user], socket_timeout=5,
                               socket_connect_timeout=3)
        yield connect, secrets_dir
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def acl_redis(tmp_path):
    with acl_redis_server(tmp_path, ["robot-1", "robot-2"]) as server:
        yield server


def test_robot_credentials_cannot_move_the_fleet(acl_redis, tmp_path):
    connect, secrets_dir = acl_redis
    learner, robot, other = connect("learner"), connect("robot-robot-1"), connect("robot-robot-2")
    with pytest.raises(redis.AuthenticationError):  # no client can be the default user
        redis.Redis(port=robot.connection_pool.connection_kwargs["port"]).ping()

    # The learner publishes a (signed) version: pointer, index, notice.
    store = LocalStore(tmp_path / "store")
    reg = PolicyRegistry(store, learner)
    v1 = reg.publish(b"weights" * 10, json.dumps({}), learner_step=1).version

    # What a robot does works (its writes go through the write gate: tests/test_robot_writes.py).
    assert PolicyRegistry(store, robot).resolve("robot-1").version == v1  # reads its target
    ps = robot.pubsub()
    ps.subscribe(config.POLICY_CHANNEL, config.CONTROL_CHANNEL_PREFIX + "robot-1")
    time.sleep(0.1)
    learner.publish(config.POLICY_CHANNEL, "hello")
    msgs = [ps.get_message(timeout=1) for _ in range(3)]
    assert any(m and m["type"] == "message" and m["data"] == b"hello" for m in msgs)
    ps.close()

    # What would move the fleet, or spy on another robot, is refused by Redis itself.
    ns = config.POLICY_POINTER.rsplit(":", 1)[0]
    refused = [
        lambda: robot.publish(config.POLICY_CHANNEL, '{"version": "v999999"}'),       # a policy notice
        lambda: robot.hset(config.POLICY_POINTER, "version", "v999999"),              # the fleet pointer
        lambda: robot.hset(f"{ns}:robot_pins", "robot-2", '{"version": "v1"}'),       # a pin
        lambda: robot.hset(f"{ns}:canary", "version", "v999999"),                     # a canary
        lambda: robot.rpush(f"{ns}:stack", "v999999"),                                # the rollback stack
        lambda: robot.incr(f"{ns}:seq"),                                              # version numbers
        lambda: robot.delete(config.POLICY_POINTER),
        lambda: robot.hset(config.HEARTBEAT_PREFIX + "robot-2", "status", "{}"),       # another's heartbeat
        lambda: robot.publish(config.CONTROL_CHANNEL_PREFIX + "robot-2", "takeover"),  # another's commands
        lambda: robot.xread({config.EPISODE_STREAM: "0"}),                            # reading the fleet's data
        lambda: robot.xadd(config.AUDIT_STREAM, {"who": "robot"}),                    # forging the audit log
        lambda: robot.xadd(config.LABEL_STREAM, {"episode_id": "e", "outcome": "success"}),
        lambda: robot.flushall(),
        lambda: robot.config_set("requirepass", "x"),
        lambda: robot.execute_command("ACL", "SETUSER", "robot-robot-1", "+@all"),
    ]
    for i, attempt in enumerate(refused):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    ps = robot.pubsub()
    with pytest.raises(redis.exceptions.NoPermissionError):  # another robot's control channel
        ps.subscribe(config.CONTROL_CHANNEL_PREFIX + "robot-2")
        ps.get_message(timeout=1)
    ps.close()
    ps = robot.pubsub()
    with pytest.raises(redis.exceptions.NoPermissionError):  # every robot's commands at once
        ps.psubscribe(config.CONTROL_CHANNEL_PREFIX + "*")
        ps.get_message(timeout=1)
    ps.close()
    assert PolicyRegistry(store, learner).pointer()["version"] == v1  # nothing moved
    with pytest.raises(redis.exceptions.NoPermissionError):  # not even its own heartbeat: only the gate writes
        other.hset(config.HEARTBEAT_PREFIX + "robot-2", "status", "{}")
    assert connect("ingest").hset(config.HEARTBEAT_PREFIX + "robot-2", "status", "{}") == 1

    # The dashboard steers (signed) and commands robots; the learner may not command robots.
    dash = connect("dashboard")
    PolicyRegistry(store, dash).pin_robot("robot-1", v1, by="alice")
    assert dash.publish(config.CONTROL_CHANNEL_PREFIX + "robot-1", "{}") == 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        learner.publish(config.CONTROL_CHANNEL_PREFIX + "robot-1", "{}")
    with pytest.raises(redis.exceptions.NoPermissionError):
        learner.flushall()

    # The generated files: env per identity (0600), MinIO policies, signing keys.
    env = (secrets_dir / "env" / "robot-robot-1.env").read_text()
    assert "FLEETLOOP_TRUSTED_KEYS" in env and (secrets_dir / "env" / "robot-robot-1.env").stat().st_mode & 0o077 == 0
    assert (secrets_dir / "keys" / "signing.key").exists() and list((secrets_dir / "keys" / "trusted").glob("*.pub"))


def test_s3_policies_scope_each_robot_to_its_own_prefix():
    doc = s3_policy("robot-robot-1", "fleet", "prod")
    writes = [s for s in doc["Statement"] if "s3:PutObject" in s["Action"]]
    assert [r for s in writes for r in s["Resource"]] == ["arn:aws:s3:::fleet/prod/episodes/robot-1/*"]
    reads = [s for s in doc["Statement"] if "s3:GetObject" in s["Action"]]
    assert [r for s in reads for r in s["Resource"]] == ["arn:aws:s3:::fleet/prod/policies/*"]
    assert not any("s3:DeleteObject" in s["Action"] for s in doc["Statement"])
    with pytest.raises(ValueError, match="reserved"):
        s3_policy("robot-all", "fleet")


def test_consumer_dead_letters_an_episode_another_robot_claims(tmp_path, redis_client):
    """An event naming robot-2 for an episode under episodes/robot-1/ (or a manifest in robot-1's
    prefix saying it is robot-2's) is dead-lettered, not indexed."""
    from fleetloop.buffer.consumer import DataConsumer, episode_writer
    from fleetloop.buffer.index import FrameIndex
    from fleetloop.buffer.queue import EpisodeAnnouncer
    from fleetloop.proto.v1 import episode_pb2 as pb

    assert episode_writer("episodes/robot-1/e1/manifest.json", "e1") == ("robot-1", "")
    assert episode_writer("episodes/all/e1/manifest.json", "e1")[0] is None
    assert episode_writer("episodes/robot-1/e2/manifest.json", "e1")[0] is None
    assert episode_writer("policies/v000001/manifest.json", "e1")[0] is None
    ann = EpisodeAnnouncer(redis_client)
    ann.announce(pb.EpisodeEvent(episode_id="e1", manifest_key="episodes/robot-1/e1/manifest.json",
                                 robot_id="robot-2"))
    ann.announce(pb.EpisodeEvent(episode_id="e2", manifest_key="episodes/../robot-2/e2/manifest.json"))
    consumer = DataConsumer(LocalStore(tmp_path / "store"), redis_client, FrameIndex(), consumer_name="c")
    deadline = time.monotonic() + 10
    while consumer.stats.dead_lettered < 2 and time.monotonic() < deadline:
        consumer.poll_once(block_ms=100)
    assert consumer.stats.dead_reasons == {"robot-mismatch": 2}
    dead = redis_client.xrange(config.DEAD_LETTER_STREAM)
    assert [f[b"dead_reason"] for _id, f in dead] == [b"robot-mismatch"] * 2


def test_transactions_survive_a_redis_restart_with_the_issued_acl_file(tmp_path):
    """Redis with the issued ACL file and its append-only file (as compose runs it) restarts with
    every transaction: on Redis 7.0 a MULTI/EXEC holding XADD * or EXPIRE was dropped at replay
    while the `default` user was off, which lost the fleet's policy pointer on `compose restart`."""
    secrets_dir = tmp_path / "secrets"
    passwords = issue(secrets_dir, ["robot-1"], redis_host="127.0.0.1:0")
    port = free_port()
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
            "--aclfile", str(secrets_dir / "redis" / "users.acl"), "--dir", str(tmp_path)]

    def start():
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(port, proc, "redis-server")
        return proc, redis.Redis(port=port, username="learner", password=passwords["learner"], socket_timeout=5)

    proc, learner = start()
    try:
        with learner.pipeline(transaction=True) as tx:
            tx.xadd(config.EPISODE_STREAM, {"episode_id": "e1"})
            tx.hset(config.HEARTBEAT_PREFIX + "robot-1", "status", "{}")
            tx.expire(config.HEARTBEAT_PREFIX + "robot-1", 600)
            tx.set("fleetloop:test:pointer", "v000002")
            tx.execute()
        with pytest.raises(redis.AuthenticationError):  # no client can be `default`
            redis.Redis(port=port).get("x")
    finally:
        proc.terminate()
        proc.wait(10)
    proc, learner = start()
    try:
        assert learner.get("fleetloop:test:pointer") == b"v000002"
        assert learner.xlen(config.EPISODE_STREAM) == 1
        assert learner.ttl(config.HEARTBEAT_PREFIX + "robot-1") > 0
    finally:
        proc.terminate()
        proc.wait(10)
