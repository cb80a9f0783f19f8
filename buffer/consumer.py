"""The data consumer: Redis stream -> verified episode -> frame index, exactly once.

For each event: skip if the episode is already indexed (a redelivery), else fetch and verify
the whole episode (buffer.codec.read_episode), index it, and only then XACK. An episode that
can never be ingested goes to the dead-letter stream with its reason; a transient store error
leaves the message pending and it is retried with backoff (never dropped).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import redis

from fleetloop import config

from fleetloop.buffer.codec import EpisodeRejected, Limits, check_id, manifest_from_bytes, read_episode
from fleetloop.buffer.index import EpisodeEntry, FrameIndex, entry_from_loaded
from fleetloop.buffer.ledger import IngestLedger
from fleetloop.buffer.queue import Delivery, EpisodeQueueConsumer, fields_to_event
from fleetloop.buffer.store import ObjectStore, StoreError

log = logging.getLogger(__name__)


def episode_writer(manifest_key: str, episode_id: str) -> tuple[str | None, str]:
    """The robot that wrote an episode: the <robot_id> of episodes/<robot_id>/<episode_id>/
    manifest.json (only that robot's credentials may write there). (None, why) if the key is
    not exactly that shape."""
    parts = (manifest_key or "").split("/")
    if len(parts) != 4 or parts[0] != "episodes" or parts[3] != "manifest.json":
        return None, f"manifest key {manifest_key[:200]!r} is not episodes/<robot_id>/<episode_id>/manifest.json"
    try:
        check_id("robot id", parts[1])
    except ValueError as e:
        return None, str(e)[:200]
    if parts[2] != episode_id:
        return None, f"manifest key {manifest_key[:200]!r} is not for episode {episode_id[:128]!r}"
    return parts[1], ""


@dataclass
class ConsumerStats:
    indexed: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    transient_errors: int = 0
    freshness_s: deque = field(default_factory=lambda: deque(maxlen=10_000))  # episode end -> indexed
    dead_reasons: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        f = sorted(self.freshness_s)
        pct = (lambda q: f[min(len(f) - 1, int(q * len(f)))] if f else None)
        return {"indexed": self.indexed, "duplicates": self.duplicates, "dead_lettered": self.dead_lettered,
                "transient_errors": self.transient_errors, "dead_reasons": dict(self.dead_reasons),
                "freshness_p50_s": pct(0.5), "freshness_p99_s": pct(0.99)}


class DataConsumer:
    def __init__(self, store: ObjectStore, client: redis.Redis, index: FrameIndex,
                 limits: Limits = Limits(), consumer_name: str | None = None,
                 on_indexed: Callable[[EpisodeEntry], None] | None = None, claim_idle_ms: int = 30_000,
                 fetch_workers: int = 8, group: str = config.CONSUMER_GROUP):
        self.store, self.index, self.limits = store, index, limits
        # Each group sees every episode once: the learner's group feeds training; the dashboard
        # reads the same stream in a group of its own.
        self.queue = EpisodeQueueConsumer(client, group=group, consumer=consumer_name, claim_idle_ms=claim_idle_ms)
        self.ledger = IngestLedger(client)  # a committed episode rewritten later is refused
        self.on_indexed = on_indexed
        self.stats = ConsumerStats()
        self._retry: list[tuple[float, int, Delivery]] = []  # (due, attempt, delivery)
        self._pool = ThreadPoolExecutor(max_workers=fetch_workers, thread_name_prefix="episode-fetch")

    def _load(self, d: Delivery):
        """Fetch and verify one delivery (runs in the I/O pool). Returns what _finish needs."""
        try:
            event = fields_to_event(d.fields)
        except ValueError as e:
            return "dead", ("bad-event", str(e)), None
        writer, why = episode_writer(event.manifest_key, event.episode_id)
        if writer is None or (event.robot_id and event.robot_id != writer):
            return "dead", ("robot-mismatch", why or f"event says robot {event.robot_id!r}, but its episode is "
                                                     f"under episodes/{writer}/"), event
        if event.episode_id in self.index:
            return "duplicate", None, event
        try:
            manifest = None
            if event.manifest_json:  # the event carries a copy of the committed manifest
                manifest = manifest_from_bytes(event.manifest_json.encode(), event.manifest_key)
            loaded = read_episode(self.store, event.manifest_key, self.limits, manifest=manifest)
            if loaded.manifest.episode_id != event.episode_id:
                raise EpisodeRejected("inconsistent", f"event names {event.episode_id}, manifest "
                                                      f"{loaded.manifest.episode_id}")
            # The robot that wrote it is the one whose prefix holds it (each robot's store
            # credentials may write only episodes/<its id>/): the manifest must name that robot
            # and every chunk must lie under that episode's prefix.
            prefix = f"episodes/{writer}/{event.episode_id}/"
            if loaded.manifest.robot_id != writer:
                raise EpisodeRejected("robot-mismatch", f"manifest says robot {loaded.manifest.robot_id!r}, but "
                                                        f"robot {writer!r} wrote it ({event.manifest_key})")
            stray = [ref.key for ref in loaded.manifest.chunks if not ref.key.startswith(prefix)]
            if stray:
                raise EpisodeRejected("robot-mismatch", f"chunks outside {prefix}: {stray[:3]}")
            self.ledger.check(loaded.manifest)  # ingested before? then it must be the same episode
            return "ok", loaded, event
        except EpisodeRejected as e:
            return "dead", (e.reason, e.detail), event
        except (StoreError, OSError, redis.RedisError) as e:
            return "retry", e, event

    def _finish(self, d: Delivery, attempt: int, outcome: str, value, event) -> None:
        if outcome == "dead":
            self._dead(d, *value)
        elif outcome == "duplicate":
            self.stats.duplicates += 1
            self.queue.ack(d.msg_id)
        elif outcome == "retry":
            # Transient: keep the message pending and try again later; never drop it.
            self.stats.transient_errors += 1
            delay = min(5.0, 0.1 * 2 ** attempt)
            self._retry.append((time.monotonic() + delay, attempt + 1, d))
            log.warning("store error on %s (attempt %d, retry in %.1fs): %s", event.episode_id, attempt + 1, delay, value)
        else:
            entry = entry_from_loaded(value)
            if self.index.add(entry):
                self.ledger.record(value.manifest)
                self.stats.indexed += 1
                if event.ended_ns:
                    self.stats.freshness_s.append(max(0.0, (time.time_ns() - event.ended_ns) / 1e9))
                if self.on_indexed:
                    self.on_indexed(entry)
            else:
                self.stats.duplicates += 1
            self.queue.ack(d.msg_id)

    def handle_batch(self, batch: list[tuple[Delivery, int]]) -> None:
        """Fetch a batch concurrently (object-store latency dominates), then index and ack in
        order, one at a time."""
        if len(batch) == 1:
            results = [self._load(batch[0][0])]
        else:
            results = list(self._pool.map(lambda item: self._load(item[0]), batch))
        for (d, attempt), (outcome, value, event) in zip(batch, results):
            self._finish(d, attempt, outcome, value, event)

    def handle(self, d: Delivery, attempt: int = 0) -> None:
        self.handle_batch([(d, attempt)])

    def _dead(self, d: Delivery, reason: str, detail: str) -> None:
        self.stats.dead_lettered += 1
        self.stats.dead_reasons[reason] = self.stats.dead_reasons.get(reason, 0) + 1
        self.queue.dead_letter(d, reason, detail)

    def poll_once(self, block_ms: int = 100, count: int = 32) -> int:
        """Process what is due for retry and one batch of deliveries; returns how many."""
        now = time.monotonic()
        due = [r for r in self._retry if r[0] <= now]
        self._retry = [r for r in self._retry if r[0] > now]
        if due:
            self.handle_batch([(d, attempt) for _due, attempt, d in due])
        pending_ids = {r[2].msg_id for r in self._retry}
        batch = [d for d in self.queue.poll(count=count, block_ms=0 if self._retry else block_ms)
                 if d.msg_id not in pending_ids]
        if batch:
            self.handle_batch([(d, 0) for d in batch])
        if not batch and not due and self._retry:
            time.sleep(min(0.05, max(0.0, min(r[0] for r in self._retry) - time.monotonic())))
        return len(batch) + len(due)

    def run(self, stop: threading.Event, block_ms: int = 100) -> None:
        """Loop until `stop` is set, surviving Redis restarts (reconnect with backoff)."""
        backoff = 0.1
        while not stop.is_set():
            try:
                self.poll_once(block_ms=block_ms)
                backoff = 0.1
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("redis unavailable (%s); retrying in %.1fs", e, backoff)
                stop.wait(backoff)
                backoff = min(5.0, backoff * 2)
                try:
                    self.queue.ensure_group()
                except redis.RedisError:
                    pass

    def start_thread(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(stop,), name="data-consumer", daemon=True)
        t.start()
        return t
