"""The ingest ledger: what each episode was when the cloud first ingested it.

A robot's store credentials may write its own `episodes/<id>/` prefix, and an object store
without write-once enforcement (docs/security.md) lets it replace an episode it already
committed. The learner trains on the copy it verified at ingest, but an index rebuilt from the
store (a restart's reconcile scan) would read the replacement. So the first ingest records a
digest of the episode's manifest -- which names every chunk's sha256, and the outcome, task and
interventions -- in a Redis hash robots cannot write (their ACL reaches none of it), and every
later ingest of the same episode id must match it: a rewritten episode is refused
(EpisodeRejected "rewritten": dead-lettered by the consumer, skipped by reconcile) with an alert.
"""
from __future__ import annotations

import logging
from typing import Optional

import redis

from fleetloop.buffer.codec import EpisodeRejected, sha256_hex
from fleetloop.proto.v1 import episode_pb2 as pb

log = logging.getLogger(__name__)

LEDGER_KEY = "fleetloop:episodes:ingested"   # hash: episode_id -> manifest digest (first ingest)


def manifest_digest(manifest: pb.EpisodeManifest) -> str:
    """sha256 of the manifest's deterministic protobuf encoding (the same whether it was parsed
    from the event's copy or from the store), first 32 hex digits."""
    return sha256_hex(manifest.SerializeToString(deterministic=True))[:32]


class IngestLedger:
    def __init__(self, client: Optional[redis.Redis]):
        self.client = client

    def check(self, manifest: pb.EpisodeManifest) -> None:
        """Raise EpisodeRejected("rewritten") if this episode was ingested before with other content."""
        if self.client is None:
            return
        seen = self.client.hget(LEDGER_KEY, manifest.episode_id)
        if seen is None:
            return
        seen = seen.decode() if isinstance(seen, bytes) else str(seen)
        if seen != manifest_digest(manifest):
            log.error("ALERT episode %s (robot %s) was rewritten after it was ingested; refusing the new copy",
                      manifest.episode_id, manifest.robot_id)
            raise EpisodeRejected("rewritten", f"episode {manifest.episode_id} differs from the copy ingested "
                                               f"before (digest {seen}); a committed episode is write-once")

    def record(self, manifest: pb.EpisodeManifest) -> None:
        """The first ingest's digest (HSETNX: a later ingest never replaces it)."""
        if self.client is not None:
            self.client.hsetnx(LEDGER_KEY, manifest.episode_id, manifest_digest(manifest))
