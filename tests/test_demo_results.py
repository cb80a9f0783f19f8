"""results.json's versions_published counts what the run published, not what retention left."""
from __future__ import annotations

import json

from fleetloop.buffer.store import open_store
from fleetloop.demo import versions_published
from fleetloop.release.registry import PolicyRegistry
from fleetloop.retention import RetentionPolicy, collect


def test_versions_published_counts_past_retention(redis_client, tmp_path):
    registry = PolicyRegistry(open_store((tmp_path / "store").as_uri()), redis_client)
    config = json.dumps({"in": 1})
    registry.publish(b"weights-0", config)                    # there before the run
    before = registry.latest_version()
    for k in range(1, 13):                                     # the run publishes 12
        registry.publish(f"weights-{k}".encode(), config, parent_version=registry.latest_version())
    collect(registry, RetentionPolicy(keep_last=3, keep_every=100, stack_depth=0))
    retained = len(registry.list_versions())
    assert retained < 12  # retention removed most of them
    assert versions_published(before, registry.latest_version()) == 12
    assert versions_published(None, registry.latest_version()) == 13  # a fresh store: everything
