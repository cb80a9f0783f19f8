"""Signed policy versions and pointer moves (issue 12, item 1), against a real Redis, a real store
and a real PolicySlot: a robot runs only what a trusted key signed, refuses unsigned, forged and
foreign-key versions and steering before reading anything else, keeps its current policy, and
follows key rotation with an overlap."""
from __future__ import annotations

import json
import time

import pytest

from fleetloop import config
from fleetloop.actor.weights import PolicySlot
from fleetloop.buffer.store import LocalStore
from fleetloop.release import signing
from fleetloop.release.registry import (PolicyRegistry, manifest_from_bytes, manifest_key, manifest_to_bytes,
                                        signature_key)


class Loader:
    """load_fn that records what it was asked to build (proves refused bytes never load)."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, config_json: str, data: bytes, version: str):
        self.calls.append(version)
        return type("P", (), {"version": version, "config": json.loads(config_json)})()


@pytest.fixture
def keys(tmp_path):
    """learner key (trusted), a second trusted key (rotation), an attacker's key (not trusted)."""
    learner = signing.Signer.from_file(signing.generate_keypair(tmp_path / "learner")[0])
    attacker = signing.Signer.from_file(signing.generate_keypair(tmp_path / "attacker")[0])
    return learner, attacker


def registry(store, client, signer=None, trust=None) -> PolicyRegistry:
    r = PolicyRegistry(store, client)
    r.signer, r.trust = signer, trust
    return r


def publish(reg: PolicyRegistry, i: int, move_pointer: bool = True) -> str:
    return reg.publish(f"weights-{i}".encode() * 50, json.dumps({"hidden": 8, "i": i}), learner_step=i,
                       move_pointer=move_pointer).version


def test_manifest_signature_roundtrip_forgery_and_rotation(tmp_path, keys):
    learner, attacker = keys
    data = b'{"version": "v000001"}'
    sig = learner.sign_manifest("v000001", data)
    trusted_dir = tmp_path / "trusted"
    trusted_dir.mkdir()
    (trusted_dir / f"{learner.key_id}.pub").write_bytes((tmp_path / "learner" / f"{learner.key_id}.pub").read_bytes())
    trust = signing.TrustStore([trusted_dir], reload_interval_s=0)
    assert trust.verify_manifest("v000001", data, sig) == learner.key_id
    with pytest.raises(signing.SignatureError, match="does not verify"):
        trust.verify_manifest("v000001", data + b" ", sig)
    with pytest.raises(signing.SignatureError, match="is for version"):
        trust.verify_manifest("v000002", data, sig)  # a signature cannot be moved to another version
    with pytest.raises(signing.SignatureError, match="does not trust"):
        trust.verify_manifest("v000001", data, attacker.sign_manifest("v000001", data))
    with pytest.raises(signing.SignatureError, match="unsigned"):
        trust.verify_manifest("v000001", data, None)
    with pytest.raises(signing.SignatureError, match="malformed"):
        trust.verify_manifest("v000001", data, b'{"alg": "ed25519", "key_id": "x", "signature": "!!"}')
    # A steering signature is not a manifest signature (domain separation).
    rec = {"kind": "fleet", "version": "v000001", "published_ns": 1}
    s = learner.sign_record(rec)
    assert trust.verify_record(rec, s, "pointer") == learner.key_id
    with pytest.raises(signing.SignatureError):
        trust.verify_record(dict(rec, version="v000002"), s, "pointer")

    # Rotation with overlap: a new key's .pub is added (picked up without a restart), both verify;
    # then the old one is removed and its signatures stop verifying.
    new = signing.Signer.from_file(signing.generate_keypair(tmp_path / "new")[0])
    (trusted_dir / f"{new.key_id}.pub").write_bytes((tmp_path / "new" / f"{new.key_id}.pub").read_bytes())
    assert trust.verify_manifest("v000002", data, new.sign_manifest("v000002", data)) == new.key_id
    assert trust.verify_manifest("v000001", data, sig) == learner.key_id
    (trusted_dir / f"{learner.key_id}.pub").unlink()
    trust.reload()
    with pytest.raises(signing.SignatureError, match="does not trust"):
        trust.verify_manifest("v000001", data, sig)

    empty = signing.TrustStore([tmp_path / "nothing-here"])
    with pytest.raises(signing.NoTrustedKeys, match="no trusted policy keys"):
        empty.verify_manifest("v000001", data, sig)


def test_real_policy_slot_refuses_unsigned_forged_and_foreign_versions(tmp_path, redis_client, keys):
    learner, attacker = keys
    store = LocalStore(tmp_path / "store")
    learner_reg = registry(store, redis_client, signer=learner)
    v1 = publish(learner_reg, 1)

    robot_reg = registry(store, redis_client, trust=signing.TrustStore.of(learner.public_key()))
    loader = Loader()
    slot = PolicySlot(robot_reg, "robot-1", loader, poll_interval_s=0.1).start()
    try:
        assert slot.wait_ready(v1, timeout=10)
        policy, running = slot.begin_episode()
        assert running == v1 and loader.calls == [v1]

        # 1. Unsigned: a version without a signature, even when the pointer move is legitimate.
        v2 = publish(learner_reg, 2, move_pointer=False)
        store.delete(signature_key(v2))
        learner_reg.promote(v2)
        _wait_refused(slot, v2, "unsigned")
        rogue = registry(store, redis_client, signer=attacker)

        # 2. Forged: a signed manifest altered after signing -- here a config sizing a huge
        #    network. Refused on the signature, before the manifest is parsed: nothing is loaded.
        v3 = publish(learner_reg, 3, move_pointer=False)
        m = manifest_from_bytes(store.get(manifest_key(v3)))
        m.config_json = json.dumps({"hidden": 10 ** 9})
        store.put(manifest_key(v3), manifest_to_bytes(m))
        learner_reg.promote(v3)
        _wait_refused(slot, v3, "does not verify")

        # 3. Signed, but by a key the robot does not trust (pointer signed by it too).
        v4 = publish(rogue, 4)
        _wait_refused(slot, v4, "does not trust")

        # 4. A manifest object that is not JSON at all, and a huge one: refused unread.
        v5 = publish(learner_reg, 5, move_pointer=False)
        store.put(manifest_key(v5), b"\x00garbage" * 10)
        learner_reg.promote(v5)
        _wait_refused(slot, v5, "does not verify")
        v6 = publish(learner_reg, 6, move_pointer=False)
        store.put(manifest_key(v6), b" " * (signing.MAX_MANIFEST_BYTES + 1))
        learner_reg.promote(v6)
        _wait_refused(slot, v6, "not a manifest")

        # Through all of it the robot ran v1, and nothing else was ever built.
        assert slot.begin_episode()[1] == v1 and loader.calls == [v1] and slot.pending_version is None

        # A legitimate version still goes through.
        v7 = publish(learner_reg, 7)
        assert slot.wait_ready(v7, timeout=10)
        assert slot.begin_episode()[1] == v7 and loader.calls == [v1, v7]
    finally:
        slot.stop()


def _wait_refused(slot: PolicySlot, version: str, why: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        err = slot.status()["last_error"] or ""
        if version in err and why in err or (why in err and "steering record refused" in err):
            assert slot.pending_version != version
            return
        time.sleep(0.05)
    raise AssertionError(f"{version} not refused ({why}); last error: {slot.status()['last_error']}")


def test_steering_must_be_signed(tmp_path, redis_client, keys):
    learner, attacker = keys
    store = LocalStore(tmp_path / "store")
    learner_reg = registry(store, redis_client, signer=learner)
    v1, v2 = publish(learner_reg, 1), publish(learner_reg, 2)
    robot_reg = registry(store, redis_client, trust=signing.TrustStore.of(learner.public_key()))
    assert robot_reg.resolve("robot-1").version == v2

    # Operator moves signed by a trusted key resolve.
    learner_reg.pin_robot("robot-1", v1, by="alice")
    assert robot_reg.resolve("robot-1").version == v1
    learner_reg.unpin_robot("robot-1")
    learner_reg.set_canary(v1, robot_ids=["robot-1"], by="alice")
    assert robot_reg.resolve("robot-1").source == "canary"
    learner_reg.clear_canary()
    learner_reg.rollback(by="alice")
    assert robot_reg.resolve("robot-1").version == v1

    # Raw writes (no key) and moves signed by an untrusted key are refused: the robot keeps the
    # record it accepted (v1) and says why.
    def refused(why: str) -> None:
        assert robot_reg.resolve("robot-1").version == v1
        assert any(why in a for a in robot_reg.steering_alerts), robot_reg.steering_alerts

    redis_client.hset(config.POLICY_POINTER, "version", v2)
    refused("does not verify")
    redis_client.hdel(config.POLICY_POINTER, "sig")
    refused("unsigned")
    rogue = registry(store, redis_client, signer=attacker)
    rogue.pin_robot("robot-1", v2)
    refused("does not trust")
    rogue.unpin_robot("robot-1")
    rogue.set_canary(v2, fraction=1.0)
    refused("does not trust")


def test_insecure_mode_is_named_and_off_by_default(tmp_path, redis_client, keys, monkeypatch):
    learner, _ = keys
    store = LocalStore(tmp_path / "store")
    v1 = publish(registry(store, redis_client, signer=learner), 1)
    store.delete(signature_key(v1))
    robot_reg = registry(store, redis_client, trust=signing.TrustStore.of(learner.public_key()))
    monkeypatch.delenv(signing.INSECURE_ENV, raising=False)
    with pytest.raises(signing.SignatureError, match="unsigned"):
        robot_reg.verified_manifest(v1)
    monkeypatch.setenv(signing.INSECURE_ENV, "1")
    assert robot_reg.verified_manifest(v1).version == v1


def test_embedded_default_key_signs_and_is_trusted_locally(tmp_path, redis_client, monkeypatch):
    """One machine (demo, tests): the first publish generates <home>/keys/signing.key and trusts
    its public half locally; a robot elsewhere (no trusted keys) refuses with a clear reason."""
    monkeypatch.setenv("FLEETLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(signing.SIGNING_KEY_ENV, raising=False)
    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV, raising=False)
    store = LocalStore(tmp_path / "store")
    v1 = publish(PolicyRegistry(store, redis_client), 1)
    assert (tmp_path / "home" / "keys" / "signing.key").stat().st_mode & 0o777 == 0o600
    local = PolicyRegistry(store, redis_client)
    local.trust = signing.TrustStore.default()
    assert local.verified_manifest(v1).version == v1 and local.resolve("r").version == v1
    elsewhere = PolicyRegistry(store, redis_client)
    elsewhere.trust = signing.TrustStore.default({signing.TRUSTED_KEYS_ENV: str(tmp_path / "empty")})
    with pytest.raises(signing.NoTrustedKeys, match="no trusted policy keys configured"):
        elsewhere.verified_manifest(v1)
