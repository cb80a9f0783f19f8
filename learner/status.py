"""What the learner's stats hash (config.LEARNER_STATS_KEY) means when read back.

The learner writes the hash every `stats_interval_s` with `updated_ns` and `stale_after_s`. A
learner that dies (kill -9, a lost node) stops writing and its last "training" stays in Redis;
readers therefore never take `status` at its word: past `stale_after_s` without an update the
status is "stale" (the reported one stays in `reported_status`). Final states ("stopped",
"failed", "fenced") are kept as written: nothing more is expected after them.
"""
from __future__ import annotations

import json
import time

from fleetloop import config

DEFAULT_STALE_AFTER_S = 30.0
FINAL = ("stopped", "failed", "fenced")


def stale_after_s(interval_s: float) -> float:
    """What the learner promises: a report at least this often while it runs."""
    return max(10.0, 5.0 * float(interval_s))


def effective(stats: dict, now_ns: int | None = None) -> dict:
    """stats (decoded hash) with `status` corrected to "stale" when overdue, plus `age_s`."""
    out = dict(stats)
    now_ns = time.time_ns() if now_ns is None else now_ns
    try:
        updated = int(out.get("updated_ns") or 0)
    except (TypeError, ValueError):
        updated = 0
    try:
        limit = float(out.get("stale_after_s") or DEFAULT_STALE_AFTER_S)
    except (TypeError, ValueError):
        limit = DEFAULT_STALE_AFTER_S
    age = max(0.0, (now_ns - updated) / 1e9) if updated else None
    out["age_s"] = round(age, 1) if age is not None else None
    if out and out.get("status") not in FINAL and (age is None or age > limit):
        out["reported_status"] = out.get("status")
        out["status"] = "stale"
    return out


def read(client, key: str = config.LEARNER_STATS_KEY, now_ns: int | None = None) -> dict:
    """The hash, JSON-decoded, through effective(); {} when the learner never reported."""
    raw = {}
    for k, v in client.hgetall(key).items():
        k = k.decode() if isinstance(k, bytes) else k
        try:
            raw[k] = json.loads(v)
        except ValueError:
            raw[k] = v.decode() if isinstance(v, bytes) else v
    return effective(raw, now_ns) if raw else {}
