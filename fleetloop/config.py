"""One place for settings shared by every process: where the store is, where Redis is.

Precedence: explicit argument > environment variable > embedded default. The embedded
defaults run everything on one machine (a local-directory store under ~/.fleetloop).

Store URIs, used everywhere (CLI flags, config files, the learner, the actor):
  file:///abs/path          a local directory (the embedded default)
  s3://bucket/optional/prefix
      endpoint from FLEETLOOP_S3_ENDPOINT (or AWS_ENDPOINT_URL), credentials from the usual
      AWS variables (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def home_dir() -> Path:
    return Path(os.environ.get("FLEETLOOP_HOME", Path.home() / ".fleetloop"))


def default_store_uri() -> str:
    return os.environ.get("FLEETLOOP_STORE", (home_dir() / "store").resolve().as_uri())


def default_redis_url() -> str | None:
    """None means: start a private Redis server (embedded default)."""
    return os.environ.get("FLEETLOOP_REDIS_URL") or None


@dataclass
class S3Settings:
    endpoint_url: str | None = field(
        default_factory=lambda: os.environ.get("FLEETLOOP_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL"))
    region: str = field(default_factory=lambda: os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    access_key: str | None = field(default_factory=lambda: os.environ.get("AWS_ACCESS_KEY_ID"))
    secret_key: str | None = field(default_factory=lambda: os.environ.get("AWS_SECRET_ACCESS_KEY"))
    create_bucket: bool = field(
        default_factory=lambda: os.environ.get("FLEETLOOP_S3_CREATE_BUCKET", "1") not in ("0", "false", "no"))


# Redis names, one place.
EPISODE_STREAM = "fleetloop:episodes"
DEAD_LETTER_STREAM = "fleetloop:episodes:dead"
CONSUMER_GROUP = "learner"
POLICY_CHANNEL = "fleetloop:policy"          # PUBLISH on new version
POLICY_POINTER = "fleetloop:policy:current"  # durable "current version" pointer (a Redis hash)
CONTROL_CHANNEL_PREFIX = "fleetloop:control:"  # + robot_id
HEARTBEAT_PREFIX = "fleetloop:robot:"          # + robot_id (hash, with a TTL)
ROBOTS_SET = HEARTBEAT_PREFIX + "all"  # set: every robot with a heartbeat (written by fleetloop.ingest only)
LEARNER_STATS_KEY = "fleetloop:learner:stats"  # hash: field -> JSON value, written by the learner
LABEL_STREAM = "fleetloop:labels"              # operator outcome (re)labels: episode_id, outcome, by
AUDIT_STREAM = "fleetloop:audit"               # every operator action: who, what, when, result
