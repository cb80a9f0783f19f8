"""Self-healing: find committed episodes in the store that an index does not have, and ingest them.

The Redis stream is a notification path, not the record of truth: an event can be lost (Redis
restarted without persistence, a FLUSHALL, a stream trimmed while a consumer was down, a fresh
Redis in front of an old store). The store's manifests are the truth, so a Reconciler compares
`episodes/*/manifest.json` with an index (the learner's replay, the dashboard's view) and reads
the missing ones through the same verification as the consumer (buffer.codec.read_episode).

When it scans:
  - at start (a dashboard or learner in front of an existing store: the view is rebuilt);
  - when Redis looks reset: its run_id changed, or the episode stream is shorter than before,
    or the consumer group is gone (checked every `check_s`, three cheap commands);
  - every `interval_s` regardless (a lost event with no other sign).
Each scan is one LIST of the episodes/ prefix (1 request per 1,000 keys) plus one GET per
missing manifest and one ranged GET per chunk of it. Episodes the bounded buffer evicted on
purpose are skipped (FrameIndex.wanted). What the scan at start ingests is the view being rebuilt,
not a fault (a restarted dashboard in front of a store it has not seen, demonstrations recorded
before it started): an INFO line and `rebuilt_total`. Finding anything later is a lost event: an
alert-worthy line ("ALERT reconcile: ...") and `found_total` (exported as metrics by the dashboard
and in the learner's stats hash as `reconcile`).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import redis

from fleetloop import config
from fleetloop.buffer.codec import EpisodeRejected, Limits, read_episode
from fleetloop.buffer.index import EpisodeEntry, FrameIndex, entry_from_loaded
from fleetloop.buffer.ledger import IngestLedger
from fleetloop.buffer.store import ObjectStore, StoreError

log = logging.getLogger(__name__)


def manifest_episode_id(key: str) -> str | None:
    """episodes/<robot>/<episode_id>/manifest.json -> episode_id."""
    parts = key.split("/")
    if len(parts) == 4 and parts[0] == "episodes" and parts[3] == "manifest.json":
        return parts[2]
    return None


class Reconciler:
    def __init__(self, store: ObjectStore, index: FrameIndex, name: str = "index",
                 client: redis.Redis | None = None, on_indexed: Callable[[EpisodeEntry], None] | None = None,
                 interval_s: float = 300.0, check_s: float = 5.0, limits: Limits = Limits(),
                 workers: int = 4, stream: str = config.EPISODE_STREAM, group: str | None = None):
        self.store, self.index, self.name, self.client = store, index, name, client
        self.ledger = IngestLedger(client)  # without a client: no check (tests, one-off tools)
        self.on_indexed, self.interval_s, self.check_s = on_indexed, interval_s, check_s
        self.limits, self.workers, self.stream, self.group = limits, workers, stream, group
        self.scans = 0
        self.found_total = 0            # found missing after start: lost events (alert)
        self.rebuilt_total = 0          # ingested by the scan at start: the view rebuilt
        self.rejected_total = 0
        self.last_found = 0
        self.last_scan_ns = 0
        self.last_scan_s = 0.0
        self.last_listed = 0
        self.last_trigger = ""
        self.errors = 0
        self._run_id: str | None = None
        self._stream_len = 0
        self._lock = threading.Lock()   # one scan at a time

    # ---- one scan ---------------------------------------------------------------------------

    def scan(self, trigger: str = "manual") -> int:
        """List the store, ingest what the index lacks; returns how many were added."""
        with self._lock:
            t0 = time.monotonic()
            missing = []
            listed = 0
            for key in self.store.list("episodes/"):
                eid = manifest_episode_id(key)
                if eid is None:
                    continue
                listed += 1
                if self.index.wanted(eid):
                    missing.append(key)

            def load(key):
                try:
                    loaded = read_episode(self.store, key, self.limits)
                    self.ledger.check(loaded.manifest)  # rewritten since its first ingest: refused
                    return key, loaded, None
                except EpisodeRejected as e:
                    return key, None, e.reason

            added = 0
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="reconcile") as pool:
                for key, loaded, reason in pool.map(load, missing):
                    if loaded is None:
                        self.rejected_total += 1
                        log.warning("reconcile: %s rejected (%s)", key, reason)
                        continue
                    entry = entry_from_loaded(loaded)
                    if self.index.add(entry):
                        self.ledger.record(loaded.manifest)
                        added += 1
                        if self.on_indexed:
                            self.on_indexed(entry)
            self.scans += 1
            self.last_found = added
            self.last_listed, self.last_trigger = listed, trigger
            self.last_scan_ns, self.last_scan_s = time.time_ns(), round(time.monotonic() - t0, 3)
            if trigger == "start":
                self.rebuilt_total += added
                if added:
                    log.info("reconcile: the %s index rebuilt from the store: %d committed episodes "
                             "(%d listed)", self.name, added, listed)
            elif added:
                self.found_total += added
                log.error("ALERT reconcile: %d committed episodes were missing from the %s index (trigger: %s; "
                          "lost stream events?); ingested them from the store", added, self.name, trigger)
            return added

    # ---- when to scan -----------------------------------------------------------------------

    def redis_reset(self) -> str | None:
        """A reason if Redis looks like it lost data since the last look, else None."""
        if self.client is None:
            return None
        try:
            run_id = str(self.client.info("server").get("run_id", ""))
            length = int(self.client.xlen(self.stream))
            group_gone = False
            if self.group:
                try:
                    names = {(g["name"].decode() if isinstance(g["name"], bytes) else g["name"])
                             for g in self.client.xinfo_groups(self.stream)}
                    group_gone = self.group not in names
                except redis.ResponseError:
                    group_gone = True
        except redis.RedisError:
            return None  # unreachable now: look again when it is back
        why = None
        if self._run_id is not None and run_id != self._run_id:
            why = "redis restarted"
        elif length < self._stream_len:
            why = "episode stream shrank"
        elif group_gone and self._run_id is not None:
            why = "consumer group gone"
        self._run_id, self._stream_len = run_id, length
        return why

    def run(self, stop: threading.Event, initial: bool = True) -> None:
        last = time.monotonic()
        if initial:
            self._guarded_scan("start")
            self.redis_reset()
            last = time.monotonic()
        while not stop.wait(self.check_s):
            why = self.redis_reset()
            if why is None and time.monotonic() - last >= self.interval_s:
                why = "periodic"
            if why:
                self._guarded_scan(why)
                last = time.monotonic()

    def _guarded_scan(self, trigger: str) -> None:
        try:
            self.scan(trigger)
        except (StoreError, OSError, redis.RedisError) as e:
            self.errors += 1
            log.warning("reconcile scan (%s) failed: %s; next check retries", trigger, e)

    def start_thread(self, stop: threading.Event, initial: bool = True) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(stop, initial), name=f"reconcile-{self.name}", daemon=True)
        t.start()
        return t

    def stats(self) -> dict:
        return {"scans": self.scans, "found_total": self.found_total, "rebuilt_total": self.rebuilt_total,
                "last_found": self.last_found,
                "last_listed": self.last_listed, "last_scan_s": self.last_scan_s,
                "last_scan_ns": self.last_scan_ns, "last_trigger": self.last_trigger,
                "rejected_total": self.rejected_total, "errors": self.errors}
