"""Retention: published versions and learner checkpoints do not pile up forever.

Versions (policies/<version>/...). A version is KEPT if any of these holds:
  - it is the fleet pointer's current version, or pinned fleet-wide;
  - a robot is pinned to it, or it is the canary;
  - it is on the rollback stack (the newest `stack_depth` entries: what rollback() can reach);
  - it is among the newest `keep_last` versions;
  - its number is a multiple of `keep_every` (a sparse history to compare or roll back to);
  - a robot reports running it, or loading it (heartbeat `policy_version`/`pending_version`);
  - it is the parent of a kept version that has a delta (so every delta kept stays usable).
Everything else is deleted: manifest first (the version stops existing for readers), then the
weights and delta objects, then its Redis index entries. Full weights are never shared between
versions, so what is kept stays loadable in full; deltas of kept versions stay valid because
their parents are kept. The newest version is always kept, so the registry's counter resync
(which looks at the highest manifest in the store) can never hand out a deleted number again.

Checkpoints (learner/<run>/checkpoints/...): the learner keeps the newest `keep_checkpoints`
complete ones and deletes the rest on every save, after LATEST names the new one, and only
while it holds its lease (learner/checkpoint.py). collect_checkpoints() applies the same rule to
runs whose learner is gone.

The learner runs collect() every `gc_every_publishes` publishes (fenced by its lease); an
operator can run it by hand (`python -m fleetloop.retention --dry-run`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass

import redis

from fleetloop import config
from fleetloop.buffer.store import ObjectNotFound, ObjectStore
from fleetloop.dashboard import heartbeat

log = logging.getLogger(__name__)


@dataclass
class RetentionPolicy:
    keep_last: int = 20
    keep_every: int = 50
    stack_depth: int = 10

    def __post_init__(self):
        if self.keep_last < 1 or self.keep_every < 1 or self.stack_depth < 0:
            raise ValueError("keep_last and keep_every must be >= 1, stack_depth >= 0")


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


def running_versions(client: redis.Redis) -> set[str]:
    """Versions robots report running or loading (their heartbeats: robot-written, so keys are
    kept as bytes -- a member that is not UTF-8 is still looked at -- and each heartbeat is read
    through fleetloop.dashboard.heartbeat)."""
    prefix = config.HEARTBEAT_PREFIX.encode()
    keys = {prefix + _b(r) for r in client.smembers(heartbeat.ROBOTS_SET)}
    for key in client.scan_iter(match=config.HEARTBEAT_PREFIX + "*", count=1000):
        k = _b(key)[len(prefix):]
        if k != b"all" and b":" not in k:
            keys.add(_b(key))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hget(key, "status")
    out: set[str] = set()
    for raw in pipe.execute(raise_on_error=False) if keys else []:  # a key that is not a hash: skipped
        hb = heartbeat.parse(raw) or {}
        for f in ("policy_version", "pending_version"):
            if hb.get(f):
                out.add(hb[f])
    return out


def _b(v) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def plan(registry, policy: RetentionPolicy = RetentionPolicy()) -> dict:
    """{"keep": {version: [reasons]}, "delete": [versions]} without changing anything."""
    from fleetloop.release.registry import STACK_KEY, _seq, _VERSION_RE
    versions = sorted({k.split("/")[1] for k in registry.store.list("policies/")
                       if k.endswith("/manifest.json") and _VERSION_RE.fullmatch(k.split("/")[1])}, key=_seq)
    keep: dict[str, list[str]] = {}

    def mark(v: str, why: str) -> None:
        if v in versions:
            keep.setdefault(v, []).append(why)

    pointer = registry.pointer()
    if pointer.get("version"):
        mark(pointer["version"], "current" + (" (pinned)" if pointer.get("pinned") else ""))
    for v in registry.robot_pins().values():
        mark(v, "robot pin")
    canary = registry.canary()
    if canary and canary.get("version"):
        mark(canary["version"], "canary")
    if policy.stack_depth:
        for v in registry.redis.lrange(STACK_KEY, -policy.stack_depth, -1):
            mark(_s(v), "rollback stack")
    for v in versions[-policy.keep_last:]:
        mark(v, "newest")
    for v in versions:
        if _seq(v) % policy.keep_every == 0:
            mark(v, f"every {policy.keep_every}th")
    for v in running_versions(registry.redis):
        mark(v, "running on a robot")
    for v in list(keep):  # deltas of kept versions stay usable: keep their parents
        try:
            m = registry.manifest(v)
        except Exception:  # noqa: BLE001
            continue
        if m.delta_key and m.parent_version:
            mark(m.parent_version, f"delta parent of {v}")
    return {"keep": keep, "delete": [v for v in versions if v not in keep], "versions": len(versions)}


def collect(registry, policy: RetentionPolicy = RetentionPolicy(), dry_run: bool = False, fence=None) -> dict:
    """Apply the policy; returns the plan plus bytes freed. fence: the learner's lease."""
    from fleetloop.release.registry import INFO_KEY, VERSIONS_KEY, manifest_key
    p = plan(registry, policy)
    freed = 0
    deleted = []
    for v in ([] if dry_run else p["delete"]):
        if fence is not None:
            fence.check()
        keys = [manifest_key(v)] + sorted(k for k in registry.store.list(f"policies/{v}/")
                                          if not k.endswith("/manifest.json"))
        for k in keys:  # the manifest first: the version stops existing before its bytes go
            try:
                if hasattr(registry.store, "size"):
                    freed += registry.store.size(k)
            except (ObjectNotFound, Exception):  # noqa: BLE001
                pass
            try:
                registry.store.delete(k)
            except ObjectNotFound:
                pass
        pipe = registry.redis.pipeline()
        pipe.zrem(VERSIONS_KEY, v)
        pipe.hdel(INFO_KEY, v)
        pipe.execute()
        with registry._lock:
            registry._manifests.pop(v, None)
        deleted.append(v)
    if deleted:
        log.info("retention: deleted %d versions (%.1f MB), kept %d", len(deleted), freed / 1e6, len(p["keep"]))
    return {"versions": p["versions"], "kept": len(p["keep"]), "deleted": deleted, "freed_bytes": freed,
            "keep_reasons": p["keep"], "dry_run": dry_run}


def collect_checkpoints(store: ObjectStore, prefix: str, keep: int = 3, dry_run: bool = False) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints of a run (and crash leftovers older
    than the newest complete one). Returns the deleted checkpoint directories."""
    from fleetloop.learner.checkpoint import CheckpointStore
    cs = CheckpointStore(store, prefix, keep=keep)
    complete = cs.checkpoints()
    if not complete:
        return []
    kept = set(complete[-keep:])
    newest = complete[-1]
    dirs = sorted({k.rsplit("/", 1)[0] for k in store.list(f"{cs.prefix}/checkpoints/")})
    gone = [d for d in dirs if d not in kept and d < newest]
    if not dry_run:
        for d in gone:
            for k in sorted(store.list(d + "/"), key=lambda k: not k.endswith("/state.json")):
                store.delete(k)
    return gone


def main(argv=None) -> int:
    from fleetloop.buffer.store import open_store
    from fleetloop.release.registry import PolicyRegistry
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=config.default_store_uri())
    ap.add_argument("--redis", default=config.default_redis_url())
    ap.add_argument("--keep-last", type=int, default=20)
    ap.add_argument("--keep-every", type=int, default=50)
    ap.add_argument("--stack-depth", type=int, default=10)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    if not a.redis:
        ap.error("--redis (or FLEETLOOP_REDIS_URL) is needed: pins, canary and heartbeats live there")
    reg = PolicyRegistry(open_store(a.store), redis.Redis.from_url(a.redis))
    out = collect(reg, RetentionPolicy(a.keep_last, a.keep_every, a.stack_depth), dry_run=a.dry_run)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
