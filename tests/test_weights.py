"""Weight path: registry (store + Redis pointers) and the robot's PolicySlot, against real Redis
and a real S3-protocol server."""
from __future__ import annotations

import json
import math
import threading
import time
import uuid

import pytest
import redis
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fleetloop import config
from fleetloop.actor.weights import NoPolicyYet, PolicySlot
from fleetloop.buffer.store import S3Store
from fleetloop.config import S3Settings
from fleetloop.release.registry import (PolicyRegistry, RegistryError, UnknownVersion, WeightsIntegrityError,
                                        canary_member, manifest_key, notice_from_json, sha256_hex)
from fleetloop.services import FaultProxy, RedisServer

CONFIG = json.dumps({"in": 4, "out": 2})


class TinyPolicy:
    """Policy-like: a Linear layer plus the attributes the actor reads."""
    horizon, action_dim = 1, 2

    def __init__(self, net: torch.nn.Linear, version: str = ""):
        self.net, self.version = net, version


def tiny_weights(seed: int) -> bytes:
    torch.manual_seed(seed)
    return st_save(torch.nn.Linear(4, 2).state_dict())


class Loader:
    """load_fn(config_json, weights) that counts calls (to prove rejected bytes never load)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, config_json: str, data: bytes) -> TinyPolicy:
        self.calls += 1
        cfg = json.loads(config_json)
        net = torch.nn.Linear(cfg["in"], cfg["out"])
        net.load_state_dict(st_load(data))
        return TinyPolicy(net)


@pytest.fixture
def store(s3_settings):
    return S3Store(f"weights-{uuid.uuid4().hex[:8]}", "fleet", s3_settings)


@pytest.fixture
def registry(store, redis_client):
    return PolicyRegistry(store, redis_client)


def publish(reg: PolicyRegistry, seed: int, parent: str = "", **kw):
    return reg.publish(tiny_weights(seed), CONFIG, parent_version=parent, learner_step=seed * 25,
                       algorithm="hg-dagger", metrics={"loss": 0.1 * seed}, **kw)


def same_weights(policy: TinyPolicy, seed: int) -> bool:
    expected = st_load(tiny_weights(seed))
    return all(torch.equal(policy.net.state_dict()[k], v) for k, v in expected.items())


def test_publish_commits_moves_pointer_and_notifies(registry, store, redis_client):
    ps = redis_client.pubsub(ignore_subscribe_messages=True)
    ps.subscribe(config.POLICY_CHANNEL)
    m = publish(registry, 1)
    assert m.version == "v000001"
    assert store.exists(m.weights_key) and store.exists(manifest_key(m.version))
    assert m.weights_sha256 == sha256_hex(tiny_weights(1)) and m.weights_bytes == len(tiny_weights(1))
    assert registry.pointer()["version"] == "v000001" and not registry.pointer()["pinned"]
    msg = None
    deadline = time.monotonic() + 5
    while msg is None and time.monotonic() < deadline:
        msg = ps.get_message(timeout=0.5)
    assert msg and notice_from_json(msg["data"]).version == "v000001"
    assert publish(registry, 2, parent="v000001").version == "v000002"  # monotonic
    assert [v["version"] for v in registry.list_versions()] == ["v000001", "v000002"]
    assert registry.list_versions()[1]["metrics"] == {"loss": pytest.approx(0.2)}
    m3 = registry.publish(tiny_weights(3), CONFIG, metrics={"loss": float("nan")})
    assert registry.list_versions()[2]["metrics"] == {"loss": None}  # strict-JSON safe for the dashboard
    assert math.isnan(PolicyRegistry(store, redis_client).manifest(m3.version).metrics["loss"])
    # a fresh registry (another process) reads the committed manifest from the store
    other = PolicyRegistry(store, redis_client)
    m2, data = other.fetch("v000002")
    assert m2.parent_version == "v000001" and data == tiny_weights(2)
    ps.close()


def test_slot_swaps_only_at_episode_start(registry):
    loader = Loader()
    slot = PolicySlot(registry, "robot-a", loader, poll_interval_s=30.0).start()  # notices only
    try:
        with pytest.raises(NoPolicyYet):
            slot.begin_episode()
        publish(registry, 1)
        assert slot.wait_ready("v000001", timeout=10)
        assert slot.status()["pending_version"] == "v000001"
        policy, version = slot.begin_episode()
        assert version == "v000001" == policy.version and same_weights(policy, 1)

        # mid-episode: a new version arrives and is loaded in the background, not swapped in
        publish(registry, 2, parent="v000001")
        assert slot.wait_ready("v000002", timeout=10)
        assert slot.current_version == "v000001" and slot.pending_version == "v000002"
        assert policy.version == "v000001" and same_weights(policy, 1)  # the running object is untouched

        policy2, version2 = slot.begin_episode()  # next episode: swap
        assert version2 == "v000002" and same_weights(policy2, 2) and policy2 is not policy
        assert slot.begin_episode()[0] is policy2  # nothing pending: same policy again
        st = slot.status()
        assert st["swaps"] == 2 and st["loads"] == 2 and st["publish_to_loaded_s"]["n"] == 2
        assert st["loaded_to_swapped_s"]["n"] == 2 and st["last_error"] is None
    finally:
        slot.stop()


def test_catch_up_after_missed_notice(registry):
    slot = PolicySlot(registry, "robot-a", Loader(), poll_interval_s=0.2).start()
    try:
        registry._notify = lambda version: None  # every notice is lost
        publish(registry, 1)
        assert slot.wait_ready("v000001", timeout=10)  # found by polling the durable pointer
    finally:
        slot.stop()
    # stopped while a version was published: converges as soon as it starts again
    publish(registry, 2)
    slot.poll_interval_s = 60.0
    slot.start()
    try:
        assert slot.wait_ready("v000002", timeout=10)
    finally:
        slot.stop()


def test_catch_up_after_redis_restart(store):
    with RedisServer(appendonly=True) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
        reg = PolicyRegistry(store, client)
        publish(reg, 1)
        slot = PolicySlot(reg, "robot-a", Loader(), initial_policy=None, poll_interval_s=0.3,
                          max_backoff_s=0.5).start()
        try:
            assert slot.wait_ready("v000001", timeout=10)
            server.stop()
            time.sleep(1.0)  # the slot's subscriber fails and backs off; the thread must survive
            assert slot.status()["running"] and slot.status()["errors"] > 0
            server.start()
            publish(reg, 2)  # most likely before the subscriber is back: the notice is missed
            assert slot.wait_ready("v000002", timeout=15)
            assert slot.status()["running"]
            assert slot.begin_episode()[1] == "v000002"
        finally:
            slot.stop()
            client.close()


def test_corrupted_weights_are_rejected_and_current_kept(registry, store):
    loader = Loader()
    slot = PolicySlot(registry, "robot-a", loader, poll_interval_s=0.2).start()
    try:
        publish(registry, 1)
        assert slot.wait_ready("v000001", timeout=10)
        policy, _ = slot.begin_episode()
        m = publish(registry, 2, move_pointer=False)
        tampered = bytearray(store.get(m.weights_key))
        tampered[-1] ^= 0xFF  # same size, one flipped byte
        store.put(m.weights_key, bytes(tampered))
        with pytest.raises(WeightsIntegrityError, match="sha256"):
            PolicyRegistry(store, registry.redis).fetch(m.version)
        registry.promote(m.version)
        deadline = time.monotonic() + 10
        while "sha256" not in (slot.status()["last_error"] or "") and time.monotonic() < deadline:
            time.sleep(0.05)
        st = slot.status()
        assert "v000002" in st["last_error"] and "sha256" in st["last_error"]
        assert loader.calls == 1  # the tampered bytes never reached load_fn
        assert st["pending_version"] is None and slot.begin_episode() == (policy, "v000001")
        # fixing the object (e.g. re-upload) lets the retry succeed
        store.put(m.weights_key, tiny_weights(2))
        assert slot.wait_ready("v000002", timeout=10)
    finally:
        slot.stop()


def test_store_outage_and_unloadable_version_keep_current(s3_server, s3_settings, registry):
    proxy = FaultProxy(s3_server.port)
    try:
        bucket = registry.store.bucket
        robot_store = S3Store(bucket, "fleet", S3Settings(endpoint_url=f"http://127.0.0.1:{proxy.port}",
                                                          access_key="test", secret_key="test"))
        slot = PolicySlot(PolicyRegistry(robot_store, registry.redis), "robot-a", Loader(),
                          poll_interval_s=0.2, max_backoff_s=0.5).start()
        try:
            publish(registry, 1)
            assert slot.wait_ready("v000001", timeout=10)
            slot.begin_episode()
            proxy.refuse()  # the robot loses the store; the learner does not
            publish(registry, 2)
            deadline = time.monotonic() + 15
            while "v000002" not in (slot.status()["last_error"] or "") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "v000002" in slot.status()["last_error"] and slot.status()["running"]
            assert slot.begin_episode()[1] == "v000001"
            proxy.allow()
            assert slot.wait_ready("v000002", timeout=15)
            assert slot.begin_episode()[1] == "v000002"
            # weights that load_fn rejects (config does not fit): recorded, current kept
            registry.publish(tiny_weights(3), json.dumps({"in": 8, "out": 2}))
            deadline = time.monotonic() + 10
            while "v000003" not in (slot.status()["last_error"] or "") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "v000003" in slot.status()["last_error"]
            assert slot.begin_episode()[1] == "v000002" and slot.status()["running"]
        finally:
            slot.stop()
    finally:
        proxy.close()


def test_steering_pin_rollback_canary(registry):
    for seed in (1, 2, 3):
        publish(registry, seed)
    assert registry.target_version("r1") == "v000003"
    assert registry.rollback() == "v000002"
    assert registry.rollback() == "v000001"
    with pytest.raises(RegistryError):
        registry.rollback()
    registry.promote("v000003")
    assert registry.pointer()["version"] == "v000003"

    registry.pin_fleet("v000002")
    publish(registry, 4)  # recorded, but the pinned fleet stays
    assert registry.pointer() | {"published_ns": 0} == {"version": "v000002", "pinned": True, "published_ns": 0,
                                                        "manifest_key": manifest_key("v000002")}
    assert registry.target_version("r1") == "v000002"
    registry.unpin_fleet()
    assert registry.target_version("r1") == "v000004" and not registry.pointer()["pinned"]

    registry.pin_robot("r1", "v000001")
    registry.set_canary("v000003", robot_ids=["r1", "r2"])
    assert registry.target_version("r1") == "v000001"  # robot pin beats canary
    assert registry.target_version("r2") == "v000003"  # canary beats fleet
    assert registry.target_version("r3") == "v000004"
    registry.set_canary("v000003", fraction=1.0)
    assert registry.target_version("r3") == "v000003"
    registry.clear_canary()
    registry.unpin_robot("r1")
    assert {registry.target_version(r) for r in ("r1", "r2", "r3")} == {"v000004"}

    # fractional canaries are stable and grow monotonically
    robots = [f"robot-{i}" for i in range(400)]
    small = {r for r in robots if canary_member(r, 0.1)}
    large = {r for r in robots if canary_member(r, 0.3)}
    assert small <= large and 15 < len(small) < 70 and 80 < len(large) < 170

    actions = [h["action"] for h in registry.history(limit=100)]
    assert actions[0] == "unpin_robot" and "rollback" in actions and "pin_fleet" in actions


def test_slot_follows_pins_and_rollback(registry):
    publish(registry, 1)
    publish(registry, 2)
    slot = PolicySlot(registry, "r1", Loader(), poll_interval_s=30.0).start()
    try:
        assert slot.wait_ready("v000002", timeout=10)
        slot.begin_episode()
        registry.pin_robot("r1", "v000001")
        assert slot.wait_ready("v000001", timeout=10)
        assert slot.begin_episode()[1] == "v000001"
        registry.unpin_robot("r1")
        assert slot.wait_ready("v000002", timeout=10)
        # a rollback before the swap drops the pending version instead of swapping to it
        registry.rollback()
        deadline = time.monotonic() + 10
        while slot.pending_version is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slot.begin_episode()[1] == "v000001"
    finally:
        slot.stop()


def test_unknown_versions(registry):
    publish(registry, 1)
    for bad in ("v000999", "garbage", "", "../v000001"):
        with pytest.raises(UnknownVersion) as e:
            registry.manifest(bad)
        assert isinstance(e.value, KeyError) and "unknown policy version" in str(e.value)
        with pytest.raises(KeyError):
            registry.fetch(bad)
    for op in (lambda: registry.promote("v000999"), lambda: registry.pin_fleet("v000999"),
               lambda: registry.pin_robot("r1", "v000999"), lambda: registry.set_canary("v000999", ["r1"])):
        with pytest.raises(UnknownVersion):
            op()
    assert registry.pointer()["version"] == "v000001"


def test_delta_transfer_is_verified_and_falls_back(registry, store):
    def blob(changed: float) -> bytes:
        g = torch.Generator().manual_seed(0)
        tensors = {f"layer{i}.weight": torch.randn(256, 256, generator=g) for i in range(6)}
        tensors["layer0.weight"] = tensors["layer0.weight"] + changed  # only one layer trains
        return st_save(tensors)

    def load(config_json, data, version):  # three-argument form gets the version
        return TinyPolicy(st_load(data), version)

    v1 = registry.publish(blob(0.0), "{}")
    v2 = registry.publish(blob(0.5), "{}", parent_version=v1.version)
    assert v2.delta_key and v2.delta_bytes < 0.3 * v2.weights_bytes
    slot = PolicySlot(registry, "r1", load, poll_interval_s=30.0)  # no thread: driven by hand
    registry.promote(v1.version)
    assert slot.sync_once() == v1.version
    registry.promote(v2.version)
    assert slot.sync_once() == v2.version
    st = slot.status()
    assert st["fetches"] == {"full": 1, "delta": 1} and st["last_load"]["via"] == "delta"
    assert st["bytes_moved"] == v1.weights_bytes + v2.delta_bytes
    policy, version = slot.begin_episode()
    assert version == v2.version == policy.version
    assert all(torch.equal(policy.net[k], v) for k, v in st_load(blob(0.5)).items())

    # a corrupted delta is never trusted: the full weights are fetched instead
    v3 = registry.publish(blob(1.0), "{}", parent_version=v2.version)
    store.put(v3.delta_key, b"\x00" * v3.delta_bytes)
    registry.promote(v3.version)
    assert slot.sync_once() == v3.version and slot.status()["last_load"]["via"] == "full"


def test_concurrent_publishers_get_distinct_versions(registry):
    out, lock = [], threading.Lock()

    def pub(seed):
        m = publish(registry, seed)
        with lock:
            out.append(m.version)
    threads = [threading.Thread(target=pub, args=(s,)) for s in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == [f"v{i:06d}" for i in range(1, 7)]
    assert registry.pointer()["version"] == "v000006"  # never moved backwards by a slower publisher


def test_version_counter_never_overwrites_committed_versions(registry, redis_client):
    publish(registry, 1)
    publish(registry, 2)
    redis_client.delete("fleetloop:policy:seq")  # Redis lost its data
    assert publish(registry, 3).version == "v000003"
    redis_client.flushall()
    assert registry.reindex() == 3
    assert [v["version"] for v in registry.list_versions()] == ["v000001", "v000002", "v000003"]
