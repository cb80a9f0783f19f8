"""Robot heartbeats as untrusted input: what every dashboard reader gets from Redis.

A heartbeat (the `status` field of the hash fleetloop:robot:<id>) is written by a robot, so it is
whatever bytes that robot chose: not JSON, JSON with a lone surrogate ("\\ud800" cannot be encoded
into a response), a timestamp that is a string ("soon"), Infinity in a swap figure. `parse` turns
it into a dict of the fields readers use, each of the type they expect and of bounded size, or
None (the robot is shown offline); nothing a robot writes makes a reader fail.

The robot set (fleetloop:robot:all) is untrusted as well: members that are not valid robot ids
are ignored, only robots with a heartbeat are listed, and at most MAX_ROBOTS of them (sorted by
id), so 50,000 junk members cost one SMEMBERS and a pipelined read, not 50,000 summaries.
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import Optional

import redis

from fleetloop import config
from fleetloop.buffer.codec import check_id

log = logging.getLogger(__name__)

ROBOTS_SET = config.ROBOTS_SET
MAX_HEARTBEAT_BYTES = 64 * 1024   # a daemon's status is ~2 KB; anything larger is not parsed
MAX_ROBOTS = 10_000               # robots listed at most (a fleet larger than this needs paging)
MAX_TEXT = 256                    # characters kept of any string field
MAX_ITEMS = 64                    # keys/items kept of any nested object
MAX_DEPTH = 4
NS_MAX = 2 ** 63 - 1
TEXT_FIELDS = ("robot_id", "episode_id", "task_id", "policy_version", "pending_version", "upload_error")
SPOOL_COUNTS = ("episodes", "bytes", "dropped_episodes", "damaged_episodes")


def text(v, limit: int = MAX_TEXT) -> str:
    """A string that can always be encoded as UTF-8 (lone surrogates replaced), at most limit long."""
    if not isinstance(v, str):
        return ""
    v = v[:limit]
    try:
        v.encode("utf-8")
        return v
    except UnicodeEncodeError:
        return v.encode("utf-8", "replace").decode("utf-8")


def count(v) -> int:
    """A non-negative integer within int64, else 0 (bool, float, str and negatives are not counts)."""
    return v if type(v) is int and 0 <= v <= NS_MAX else 0


def clean(v, depth: int = 0):
    """A bounded copy of parsed JSON: finite numbers, encodable strings, small objects."""
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v if -NS_MAX <= v <= NS_MAX else None
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, str):
        return text(v)
    if depth >= MAX_DEPTH:
        return None
    if isinstance(v, dict):
        return {text(str(k), 64): clean(x, depth + 1) for k, x in list(v.items())[:MAX_ITEMS]}
    if isinstance(v, list):
        return [clean(x, depth + 1) for x in v[:MAX_ITEMS]]
    return None


def parse(raw) -> Optional[dict]:
    """The heartbeat's fields, validated and bounded; None when it is missing or unreadable."""
    if not isinstance(raw, (bytes, str)) or not raw or len(raw) > MAX_HEARTBEAT_BYTES:
        return None
    try:
        hb = json.loads(raw, parse_constant=lambda _c: None)  # NaN / Infinity -> None
    except (ValueError, RecursionError):
        return None
    if not isinstance(hb, dict):
        return None
    spool = hb.get("spool") if isinstance(hb.get("spool"), dict) else {}
    max_bytes = spool.get("max_bytes")
    out = {f: text(hb.get(f)) for f in TEXT_FIELDS}
    out.update({
        "last_seen_ns": count(hb.get("last_seen_ns")),
        "takeover_requested": hb.get("takeover_requested") is True, "paused": hb.get("paused") is True,
        "spool": {**{k: count(spool.get(k)) for k in SPOOL_COUNTS},
                  "max_bytes": count(max_bytes) if max_bytes is not None else None},
        "uploads_failed": count(hb.get("uploads_failed")),
    })
    for f in ("counters", "last_command", "inference"):
        v = clean(hb.get(f))
        out[f] = v if isinstance(v, dict) else {}
    guidance = clean(hb.get("guidance"))  # the indicator / guidance beta its policy runs with, or None
    out["guidance"] = guidance if isinstance(guidance, dict) else None
    # swap: {phase: {stat: number}} only (the /metrics gauges read numbers from it)
    swap = hb.get("swap") if isinstance(hb.get("swap"), dict) else {}
    out["swap"] = {text(str(phase), 64): {text(str(k), 64): x for k, x in list(stats.items())[:MAX_ITEMS]
                                          if type(x) in (int, float) and math.isfinite(x) and abs(x) <= NS_MAX}
                   for phase, stats in list(swap.items())[:MAX_ITEMS] if isinstance(stats, dict)}
    return out


def robot_ids(client: redis.Redis, limit: int = MAX_ROBOTS) -> list[str]:
    """Valid robot ids in the robot set, sorted, at most `limit`."""
    ids = []
    for r in client.smembers(ROBOTS_SET):
        try:
            ids.append(check_id("robot id", r.decode() if isinstance(r, bytes) else str(r)))
        except (ValueError, UnicodeDecodeError):
            continue
    ids.sort()
    global _warned_at
    if len(ids) > limit and time.monotonic() - _warned_at > 60:  # once a minute, not per request
        _warned_at = time.monotonic()
        log.warning("the robot set holds %d valid ids; listing the first %d", len(ids), limit)
    return ids[:limit]


_warned_at = -1e9


def read_all(client: redis.Redis, limit: int = MAX_ROBOTS) -> dict[str, dict]:
    """{robot_id: parsed heartbeat} for robots in the set that have a heartbeat (a readable one or
    not: an unreadable heartbeat is listed as {} -- the robot shows offline)."""
    ids = robot_ids(client, limit)
    pipe = client.pipeline(transaction=False)
    for rid in ids:
        pipe.hget(config.HEARTBEAT_PREFIX + rid, "status")
    out: dict[str, dict] = {}
    for rid, raw in zip(ids, pipe.execute(raise_on_error=False) if ids else []):
        if isinstance(raw, (bytes, str)) and raw:
            out[rid] = parse(raw) or {}
    return out


def read_one(client: redis.Redis, robot_id: str) -> Optional[dict]:
    return parse(client.hget(config.HEARTBEAT_PREFIX + robot_id, "status"))
