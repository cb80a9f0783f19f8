"""Issue 13: versions and checkpoints are garbage-collected by a documented policy (keep current,
pinned, canary, the rollback stack, the last N, every Kth, what robots run, delta parents); what
is kept stays loadable (full and delta), and no version number is reused after GC."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save as st_save

from fleetloop import config
from fleetloop.buffer.store import LocalStore
from fleetloop.learner.checkpoint import CheckpointStore
from fleetloop.release.registry import PolicyRegistry
from fleetloop.retention import RetentionPolicy, collect, collect_checkpoints


def weights(seed: int) -> bytes:
    torch.manual_seed(seed)
    big = torch.zeros(64, 1024)            # most blocks unchanged between versions: deltas are stored
    big[seed % 64] = torch.randn(1024)
    return st_save({"w": big})


def test_version_gc_policy(tmp_path, redis_client):
    store = LocalStore(tmp_path / "store")
    reg = PolicyRegistry(store, redis_client)
    parent = ""
    for k in range(1, 31):
        parent = reg.publish(weights(k), json.dumps({}), parent_version=parent).version
    reg.pin_robot("robot-7", "v000004")
    reg.set_canary("v000006", robot_ids=["robot-9"])
    redis_client.hset(config.HEARTBEAT_PREFIX + "robot-3", "status", json.dumps({"policy_version": "v000002"}))
    redis_client.sadd(config.HEARTBEAT_PREFIX + "all", "robot-3")
    before = sum(1 for _ in store.list("policies/"))
    out = collect(reg, RetentionPolicy(keep_last=5, keep_every=10, stack_depth=3))
    kept = set(out["keep_reasons"])
    assert {"v000026", "v000027", "v000028", "v000029", "v000030"} <= kept     # newest 5 (incl. current)
    assert {"v000010", "v000020", "v000004", "v000006", "v000002"} <= kept     # every 10th, pin, canary, running
    assert "v000025" in kept and "delta parent of v000026" in out["keep_reasons"]["v000025"]
    assert "delta parent of v000006" in out["keep_reasons"]["v000005"]
    assert {"v000008", "v000012", "v000017", "v000023"} <= set(out["deleted"])
    assert out["freed_bytes"] > 0 and sum(1 for _ in store.list("policies/")) < before
    assert not store.exists("policies/v000012/manifest.json")
    assert "v000012" not in {v["version"] for v in reg.list_versions()}
    # what is kept loads, in full and through its delta
    fresh = PolicyRegistry(store, redis_client)
    for v in kept:
        assert fresh.fetch(v)[1]
    base = ("v000029", fresh.fetch("v000029")[1])
    assert fresh.fetch_detailed("v000030", base=base).via == "delta"
    # the counter never hands out a deleted number, even after Redis lost it
    redis_client.delete("fleetloop:policy:seq")
    assert fresh.publish(weights(99), json.dumps({})).version == "v000031"


def test_checkpoint_gc(tmp_path):
    store = LocalStore(tmp_path / "store")
    cs = CheckpointStore(store, "learner/old-run", keep=10)
    for step in range(1, 8):
        cs.save(step * 100, {"model": b"m%d" % step}, {})
    gone = collect_checkpoints(store, "learner/old-run", keep=2)
    assert len(gone) == 5 and len(cs.checkpoints()) == 2
    assert CheckpointStore(store, "learner/old-run").load_latest().step == 700


def test_running_versions_survive_robot_set_junk(redis_client):
    """The robot set and heartbeats are robot-written: a member that is not UTF-8, a heartbeat that
    is not a hash or not JSON do not stop the collection; the versions robots run are still kept."""
    from fleetloop.retention import running_versions
    redis_client.hset(config.HEARTBEAT_PREFIX + "robot-3", "status", json.dumps({"policy_version": "v000002"}))
    redis_client.hset(config.HEARTBEAT_PREFIX + "robot-4", "status",
                      json.dumps({"policy_version": "v000005", "last_seen_ns": "soon"}))
    redis_client.hset(config.HEARTBEAT_PREFIX + "robot-5", "status", "{")
    redis_client.set(config.HEARTBEAT_PREFIX + "not-a-hash", "x")
    junk = "bad id \ud800".encode("utf-8", "surrogatepass")
    redis_client.sadd(config.HEARTBEAT_PREFIX + "all", "robot-3", "robot-5", junk)
    redis_client.hset(config.HEARTBEAT_PREFIX.encode() + junk, "status", json.dumps({"pending_version": "v000007"}))
    assert running_versions(redis_client) == {"v000002", "v000005", "v000007"}
