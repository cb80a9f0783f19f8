"""Signatures, second round (issue 22, items 6-9 and the smaller ones), on a real redis-server
running the ACL file `fleetloop credentials issue` writes, real stores (file:// and S3 over
moto's server) and real PolicySlots whose Redis credentials are their robot's own ACL user:

  6. an oversized manifest.sig is refused after reading at most 4 KiB of it;
  7. a .pub removed from disk stops being trusted without a restart (mtime), and a key file
     changed without an mtime change is picked up on the timer;
  8. an old signed pointer or pin written back is a replay and refused (also after a restart),
     and a pin or canary deleted without a signed tombstone is refused;
  9. a garbage or unsigned pin/canary never blocks a signed promotion or rollback;
  and: a deeply nested signature is a clear refusal, and a robot reads only its own pin.

`admin` below stands for someone who got write access to Redis (what signatures defend against):
a robot's own credentials cannot write any of these keys (tests/test_credentials.py)."""
from __future__ import annotations

import json
import os
import time
import uuid

import pytest
import redis

from fleetloop import config
from fleetloop.actor.weights import PolicySlot
from fleetloop.buffer.store import LocalStore, S3Store
from fleetloop.release import signing
from fleetloop.release.registry import CANARY_KEY, ROBOT_PINS_KEY, PolicyRegistry, signature_key

from polling import wait_until
from test_credentials import _redis_major, acl_redis_server

ROBOT_PIN_PREFIX = "fleetloop:policy:robot_pin:"  # registry.ROBOT_PIN_PREFIX: one key per robot, for its ACL

pytestmark = [pytest.mark.skipif(_redis_major() < 7, reason="ACL selectors need Redis >= 7"),
              pytest.mark.timeout(120)]


class Loader:
    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, config_json: str, data: bytes, version: str):
        self.calls.append(version)
        return type("P", (), {"version": version})()


class CountingStore:
    """A real store that counts the bytes its readers were handed (what a robot held in memory)."""

    def __init__(self, inner):
        self.inner, self.bytes_read = inner, 0
        self.uri = inner.uri

    def get(self, key):
        data = self.inner.get(key)
        self.bytes_read += len(data)
        return data

    def get_range(self, key, start, length):
        data, total = self.inner.get_range(key, start, length)
        self.bytes_read += len(data)
        return data, total

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def fleet(tmp_path):
    """(connect, learner signer, trusted-keys dir) on a real ACL'd redis-server."""
    with acl_redis_server(tmp_path, ["robot-1", "robot-2"]) as (connect, secrets_dir):
        signer = signing.Signer.from_file(secrets_dir / "keys" / "signing.key")
        yield connect, signer, secrets_dir / "keys" / "trusted"


def service_registry(store, client, signer) -> PolicyRegistry:
    reg = PolicyRegistry(store, client)
    reg.signer = signer
    return reg


def services(fleet, tmp_path) -> tuple[LocalStore, PolicyRegistry, PolicyRegistry, redis.Redis]:
    """A file store, the learner's and the dashboard's signing registries on it (each with its own
    ACL user), and the admin connection that stands for an attacker with Redis write access."""
    connect, signer, _ = fleet
    store = LocalStore(tmp_path / "store")
    return (store, service_registry(store, connect("learner"), signer),
            service_registry(store, connect("dashboard"), signer), connect("fleetloop-admin"))


def robot_registry(store, client, trusted_dir, **trust_kw) -> PolicyRegistry:
    reg = PolicyRegistry(store, client)
    reg.trust = signing.TrustStore([trusted_dir], **trust_kw)
    return reg


def publish(reg: PolicyRegistry, i: int, move_pointer: bool = True) -> str:
    return reg.publish(f"weights-{i}".encode() * 20, json.dumps({"i": i}), learner_step=i,
                       move_pointer=move_pointer).version


def alerted(slot: PolicySlot, text: str) -> bool:
    return any(text in a for a in slot.status()["steering_alerts"])


# ---- 6 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["file", "s3"])
def test_oversized_signature_is_refused_unread(fleet, tmp_path, s3_settings, kind):
    connect, signer, trusted = fleet
    inner = (LocalStore(tmp_path / "store") if kind == "file"
             else S3Store(f"sig-{uuid.uuid4().hex[:8]}", "fleet", s3_settings))
    learner = service_registry(inner, connect("learner"), signer)
    v1 = publish(learner, 1)
    huge = 64 << 20  # the 400 MB behaves the same; 64 MB keeps the test quick
    inner.put(signature_key(v1), b" " * huge)
    store = CountingStore(inner)
    robot = robot_registry(store, connect("robot-robot-1"), trusted)
    with pytest.raises(signing.SignatureError, match=f"signature object of {huge} bytes"):
        robot.verified_manifest(v1)
    assert store.bytes_read <= signing.MAX_SIGNATURE_OBJECT + 1, store.bytes_read
    # the manifest itself is read with the same bound
    v2 = publish(learner, 2)
    store.bytes_read = 0
    inner.put(f"policies/{v2}/manifest.json", b" " * (signing.MAX_MANIFEST_BYTES * 8))
    with pytest.raises(signing.SignatureError, match="not a manifest"):
        robot.verified_manifest(v2)
    assert store.bytes_read <= signing.MAX_MANIFEST_BYTES + signing.MAX_SIGNATURE_OBJECT + 2, store.bytes_read


def test_deeply_nested_signatures_are_a_clear_refusal(fleet, tmp_path):
    connect, signer, trusted = fleet
    store = LocalStore(tmp_path / "store")
    learner = service_registry(store, connect("learner"), signer)
    v1 = publish(learner, 1)
    nested = b"[" * 2000 + b"]" * 2000  # under the 4 KiB bound, far deeper than json's recursion
    store.put(signature_key(v1), nested)
    robot = robot_registry(store, connect("robot-robot-1"), trusted)
    with pytest.raises(signing.SignatureError, match="malformed signature object.*nested too deeply"):
        robot.verified_manifest(v1)
    # the same inside a steering record (admin writes a pin whose sig is 4,000 levels deep)
    admin = connect("fleetloop-admin")
    deep_pin = json.dumps({"version": v1, "set_ns": 1, "seq": 1}).rstrip("}") + ', "sig": ' + "[" * 4000 + "]" * 4000 + "}"
    admin.set(ROBOT_PIN_PREFIX + "robot-1", deep_pin)
    admin.hset(ROBOT_PINS_KEY, "robot-1", deep_pin)
    target = robot.resolve("robot-1")  # no RecursionError: the pin is ignored, the pointer applies
    assert target.source == "fleet" and target.version == v1
    assert any("nested too deeply" in a for a in robot.steering_alerts), robot.steering_alerts


# ---- 7 -----------------------------------------------------------------------------------------

def test_removed_key_stops_being_trusted_without_a_restart(fleet, tmp_path):
    connect, signer, trusted = fleet
    store = LocalStore(tmp_path / "store")
    learner = service_registry(store, connect("learner"), signer)
    v1 = publish(learner, 1)
    loader = Loader()
    slot = PolicySlot(robot_registry(store, connect("robot-robot-1"), trusted, reload_interval_s=0.2),
                      "robot-1", loader, poll_interval_s=0.1).start()
    try:
        assert slot.wait_ready(v1, timeout=10)
        (pub,) = trusted.glob("*.pub")
        pub.unlink()  # the operator revokes the key; the same key keeps signing
        wait_until("the key file re-read", lambda: slot.registry.trust.key_ids() == [])  # ~reload_interval_s
        v2 = publish(learner, 2)
        wait_until("v2 refused", lambda: "no trusted policy keys" in (slot.status()["last_error"] or ""))
        time.sleep(0.5)
        assert v2 not in loader.calls and slot.pending_version != v2
        assert slot.begin_episode()[1] == v1
    finally:
        slot.stop()


def test_key_files_are_reread_on_a_timer(tmp_path):
    """A key file replaced in place with its mtime and size kept (a restore, a coarse clock)
    is missed by the mtime check; the timer re-reads it anyway."""
    trusted = tmp_path / "trusted"
    old = signing.Signer.from_file(signing.generate_keypair(tmp_path / "old")[0])
    new = signing.Signer.from_file(signing.generate_keypair(tmp_path / "new")[0])
    pub = trusted / "fleet.pub"
    trusted.mkdir()
    pub.write_bytes((tmp_path / "old" / f"{old.key_id}.pub").read_bytes())
    trust = signing.TrustStore([trusted], reload_interval_s=0.05, refresh_interval_s=1.0)
    rec = {"kind": "fleet", "version": "v000001", "published_ns": 1, "seq": 1}
    assert trust.verify_record(rec, old.sign_record(rec), "pointer") == old.key_id
    st, dir_st = pub.stat(), trusted.stat()
    with open(pub, "r+b") as f:  # same inode, same size (Ed25519 PEMs are all the same length)
        f.write((tmp_path / "new" / f"{new.key_id}.pub").read_bytes())
    os.utime(pub, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(trusted, ns=(dir_st.st_atime_ns, dir_st.st_mtime_ns))
    time.sleep(0.1)
    assert trust.verify_record(rec, old.sign_record(rec), "pointer") == old.key_id  # not seen yet
    time.sleep(1.0)
    with pytest.raises(signing.SignatureError, match="does not trust"):
        trust.verify_record(rec, old.sign_record(rec), "pointer")


# ---- 8 -----------------------------------------------------------------------------------------

def test_replayed_pointer_and_pin_are_refused_also_after_a_restart(fleet, tmp_path):
    connect, signer, trusted = fleet
    store, learner, dashboard, admin = services(fleet, tmp_path)
    state = tmp_path / "robot-1-spool" / ".policy-steering.json"
    v1 = publish(learner, 1)
    v2 = publish(learner, 2)  # turns out bad
    bad_pointer = admin.hgetall(config.POLICY_POINTER)
    loader = Loader()

    def start():
        return PolicySlot(robot_registry(store, connect("robot-robot-1"), trusted), "robot-1", loader,
                          poll_interval_s=0.1, steering_state=state).start()

    slot = start()
    try:
        assert slot.wait_ready(v2, timeout=10)
        assert dashboard.rollback(by="alice") == v1
        assert slot.wait_ready(v1, timeout=10) and slot.begin_episode()[1] == v1

        # The old, validly signed pointer to the bad version is written back.
        admin.delete(config.POLICY_POINTER)
        admin.hset(config.POLICY_POINTER, mapping=bad_pointer)
        wait_until("replay alert", lambda: alerted(slot, "fleet pointer is a replay"))
        assert slot.target.version == v1 and slot.pending_version is None
        slot.stop()

        slot = start()  # a restarted robot remembers (the state file), so it refuses it too
        wait_until("replay alert after restart", lambda: alerted(slot, "fleet pointer is a replay"))
        assert slot.target.version == v1 and slot.pending_version != v2

        # Pins: an old signed pin written back after an unpin is a replay as well.
        dashboard.pin_robot("robot-1", v2, by="alice")
        old_pin = admin.get(ROBOT_PIN_PREFIX + "robot-1")
        wait_until("pinned", lambda: slot.target and slot.target.source == "robot_pin")
        dashboard.promote(v1, by="alice")  # and a fresh pointer, so the fleet layer is valid again
        dashboard.unpin_robot("robot-1", by="alice")
        wait_until("unpinned", lambda: slot.target and slot.target.source == "fleet" and slot.target.version == v1)
        admin.set(ROBOT_PIN_PREFIX + "robot-1", old_pin)
        wait_until("pin replay alert", lambda: alerted(slot, "robot pin of robot-1 is a replay"))
        assert slot.target.version == v1 and slot.target.source == "fleet"
    finally:
        slot.stop()
    # v2 ran only while legitimately current (before the rollback) and legitimately pinned
    assert loader.calls == [v2, v1, v1, v2, v1]


def test_deleting_a_pin_or_canary_needs_a_signed_tombstone(fleet, tmp_path):
    connect, signer, trusted = fleet
    store, learner, dashboard, admin = services(fleet, tmp_path)
    v1, v2 = publish(learner, 1), publish(learner, 2)
    robot = robot_registry(store, connect("robot-robot-1"), trusted)

    dashboard.pin_robot("robot-1", v1, by="alice")
    assert robot.resolve("robot-1").version == v1
    admin.delete(ROBOT_PIN_PREFIX + "robot-1")  # unsigned deletion: the robot keeps its pin
    t = robot.resolve("robot-1")
    assert (t.version, t.source) == (v1, "robot_pin")
    assert any("deleted without a signed tombstone" in a for a in robot.steering_alerts)
    dashboard.unpin_robot("robot-1", by="alice")  # the signed tombstone is obeyed
    assert robot.resolve("robot-1").version == v2 and robot.steering_alerts == []
    assert json.loads(admin.get(ROBOT_PIN_PREFIX + "robot-1"))["version"] == ""
    assert dashboard.robot_pins() == {}

    dashboard.set_canary(v1, robot_ids=["robot-1"], by="alice")
    assert robot.resolve("robot-1").source == "canary"
    admin.delete(CANARY_KEY)
    t = robot.resolve("robot-1")
    assert (t.version, t.source) == (v1, "canary")
    assert any("canary was deleted without a signed tombstone" in a for a in robot.steering_alerts)
    dashboard.clear_canary(by="alice")
    assert robot.resolve("robot-1").version == v2 and dashboard.canary() is None


# ---- 9 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["garbage", "unsigned", "foreign"])
def test_an_invalid_pin_or_canary_never_blocks_signed_moves(fleet, tmp_path, bad):
    connect, signer, trusted = fleet
    store, learner, dashboard, admin = services(fleet, tmp_path)
    v1 = publish(learner, 1)
    if bad == "garbage":
        pin, canary = "{not json", {"version": v1, "robots": "[[[", "fraction": "lots"}
    elif bad == "unsigned":
        pin = json.dumps({"version": v1, "set_ns": 1})
        canary = {"version": v1, "robots": '["robot-1"]', "fraction": "1.0", "set_ns": "1"}
    else:  # signed, by a key the robots do not trust
        rogue = service_registry(store, admin, signing.Signer.from_file(signing.generate_keypair(tmp_path / "k")[0]))
        rogue.pin_robot("robot-1", v1)
        rogue.set_canary(v1, fraction=1.0)
        pin, canary = admin.get(ROBOT_PIN_PREFIX + "robot-1"), admin.hgetall(CANARY_KEY)
    admin.set(ROBOT_PIN_PREFIX + "robot-1", pin)
    admin.hset(ROBOT_PINS_KEY, "robot-1", pin)
    admin.delete(CANARY_KEY)
    admin.hset(CANARY_KEY, mapping=canary)

    loader = Loader()
    slot = PolicySlot(robot_registry(store, connect("robot-robot-1"), trusted), "robot-1", loader,
                      poll_interval_s=0.1).start()
    try:
        assert slot.wait_ready(v1, timeout=10)
        v2 = publish(learner, 2)  # a signed move: the learner's publish
        assert slot.wait_ready(v2, timeout=10) and slot.begin_episode()[1] == v2
        assert alerted(slot, "robot pin of robot-1") and alerted(slot, "canary")
        assert dashboard.rollback(by="alice") == v1  # and a signed rollback
        assert slot.wait_ready(v1, timeout=10) and slot.begin_episode()[1] == v1
    finally:
        slot.stop()
    # The services' readers (dashboard listing, rollout gate, retention) skip them too.
    if bad == "garbage":
        assert dashboard.robot_pins() == {} and dashboard.canary() is None


# ---- a robot reads only its own pin ---------------------------------------------------------------

def test_a_robot_reads_only_its_own_pin(fleet, tmp_path):
    connect, signer, trusted = fleet
    store, learner, dashboard, _ = services(fleet, tmp_path)
    v1, v2 = publish(learner, 1), publish(learner, 2)
    dashboard.pin_robot("robot-1", v1, by="alice")
    dashboard.pin_robot("robot-2", v1, by="alice")
    robot1 = connect("robot-robot-1")
    assert robot_registry(store, robot1, trusted).resolve("robot-1").version == v1  # its own: yes
    for spy in (lambda: robot1.get(ROBOT_PIN_PREFIX + "robot-2"),
                lambda: robot1.hgetall(ROBOT_PINS_KEY),
                lambda: robot1.hget(ROBOT_PINS_KEY, "robot-2"),
                lambda: robot1.set(ROBOT_PIN_PREFIX + "robot-1", "{}"),
                lambda: robot1.delete(ROBOT_PIN_PREFIX + "robot-1")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            spy()
    assert dashboard.robot_pins() == {"robot-1": v1, "robot-2": v1}
