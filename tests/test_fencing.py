"""Issue 13: a learner lease with a fencing token checked on every publish and checkpoint (a
zombie learner cannot write), and version numbers assigned only on a successful publish.
Real Redis, real S3 (moto over HTTP, through a fault proxy for the outage)."""
from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save as st_save

from fleetloop.buffer.store import LocalStore, S3Store, StoreError
from fleetloop.config import S3Settings
from fleetloop.learner.checkpoint import CheckpointStore
from fleetloop.learner.lease import Lease, LeaseLost, LeaseRenewer
from fleetloop.release.registry import PolicyRegistry
from fleetloop.services import FaultProxy


def weights(seed: int) -> bytes:
    torch.manual_seed(seed)
    return st_save({"w": torch.randn(8, 8)})


CFG = json.dumps({"in": 8, "out": 8})


def test_zombie_learner_cannot_publish_or_checkpoint(tmp_path, redis_client):
    store = LocalStore(tmp_path / "store")
    old = Lease(redis_client, "run", ttl_s=0.3)
    old.acquire()
    reg_old = PolicyRegistry(store, redis_client, fence=old)
    ck_old = CheckpointStore(store, "learner/run", fence=old)
    assert reg_old.publish(weights(1), CFG).version == "v000001"
    ck_old.save(1, {"model": b"m"}, {})
    # The old driver dies (kill -9: no more renewals); its lease expires; a new learner takes over.
    time.sleep(0.5)
    new = Lease(redis_client, "run", ttl_s=10)
    new.acquire()
    assert new.token > old.token
    with pytest.raises(LeaseLost):
        reg_old.publish(weights(2), CFG)      # the zombie's worker tries to publish
    with pytest.raises(LeaseLost):
        ck_old.save(2, {"model": b"zombie"}, {})
    # nothing written: no manifest, no number used, LATEST still the old learner's step 1
    assert not store.exists("policies/v000002/manifest.json")
    assert json.loads(store.get("learner/run/LATEST"))["step"] == 1
    reg_new = PolicyRegistry(store, redis_client, fence=new)
    assert reg_new.publish(weights(3), CFG).version == "v000002"
    assert CheckpointStore(store, "learner/run", fence=new).save(3, {"model": b"m3"}, {})
    assert reg_new.pointer()["version"] == "v000002"


def test_lease_is_exclusive_renewed_and_released(redis_client):
    a = Lease(redis_client, "excl", ttl_s=0.6)
    a.acquire()
    renewer = LeaseRenewer(a).start()
    try:
        with pytest.raises(LeaseLost):
            Lease(redis_client, "excl", ttl_s=5).acquire(wait_s=1.0)  # renewed past its TTL
        assert a.held()
    finally:
        renewer.stop()
    assert a.release() and not a.held()
    b = Lease(redis_client, "excl", ttl_s=5)
    b.acquire()
    with pytest.raises(LeaseLost):
        a.check()
    # Redis lost its data: nobody holds the key, checks fail, the live holder's renew takes it back
    redis_client.flushall()
    with pytest.raises(LeaseLost):
        b.check()
    assert b.renew() and b.held()


def test_failed_publishes_do_not_burn_version_numbers(s3_server, s3_settings, redis_client):
    proxy = FaultProxy(s3_server.port)
    try:
        settings = S3Settings(endpoint_url=f"http://127.0.0.1:{proxy.port}", access_key="test", secret_key="test")
        store = S3Store("fence-versions", "fleet", settings)
        lease = Lease(redis_client, "versions", ttl_s=30)
        lease.acquire()
        for fence in (None, lease):  # with and without a learner lease
            redis_client.delete("fleetloop:policy:seq", "fleetloop:policy:versions")
            reg = PolicyRegistry(S3Store("fence-versions", f"fleet-{bool(fence)}", settings), redis_client,
                                 fence=fence)
            published = [reg.publish(weights(1), CFG).version]
            proxy.refuse()                    # a store outage: every publish fails
            for k in range(5):
                with pytest.raises((StoreError, OSError)):
                    reg.publish(weights(10 + k), CFG)
            proxy.allow()
            published += [reg.publish(weights(k), CFG).version for k in (2, 3)]
            assert published == ["v000001", "v000002", "v000003"], published
            assert [v["version"] for v in reg.list_versions()] == published
    finally:
        proxy.close()
