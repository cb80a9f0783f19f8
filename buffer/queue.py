"""The episode queue on Redis Streams: at-least-once delivery, a dead-letter stream.

Producer (actor):  announce() = XADD, called only after the manifest is committed.
Consumer (learner): XREADGROUP in a consumer group; XACK only after the episode is indexed;
XAUTOCLAIM takes over messages a dead consumer left pending; an event that can never be
processed goes to the dead-letter stream with its reason (and is then acked).
Exactly-once *indexing* comes from dedupe by episode id in the index (buffer/index.py).
"""
from __future__ import annotations

import logging
import socket
import os
import time
from dataclasses import dataclass

import redis

from fleetloop import config
from fleetloop.proto.v1 import episode_pb2 as pb

log = logging.getLogger(__name__)

EPISODE_STREAM_CAP = 1_000_000  # approximate MAXLEN of the episode stream (never a robot's choice)
MAX_EVENT_BYTES = 1 << 20  # what a consumer decodes at most (the write gate admits 64 KiB)
EVENT_FIELDS = ("episode_id", "manifest_key", "robot_id", "task_id", "ended_ns", "schema_version")


def event_to_fields(ev: pb.EpisodeEvent) -> dict[str, str]:
    fields = {f: str(getattr(ev, f)) for f in EVENT_FIELDS}
    if ev.manifest_json:
        fields["manifest_json"] = ev.manifest_json
    return fields


def fields_to_event(fields: dict) -> pb.EpisodeEvent:
    """Raises ValueError on a malformed event (also one larger than MAX_EVENT_BYTES: the write
    gate never adds one, so it came from elsewhere and is not decoded)."""
    size = sum(len(k) + len(v) for k, v in fields.items() if isinstance(v, (bytes, str)))
    if size > MAX_EVENT_BYTES:
        raise ValueError(f"event is {size} bytes, more than {MAX_EVENT_BYTES}")
    f = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
         for k, v in fields.items()}
    missing = [k for k in ("episode_id", "manifest_key") if not f.get(k)]
    if missing:
        raise ValueError(f"event lacks {missing}")
    return pb.EpisodeEvent(episode_id=f["episode_id"], manifest_key=f["manifest_key"],
                           robot_id=f.get("robot_id", ""), task_id=f.get("task_id", ""),
                           ended_ns=int(f.get("ended_ns") or 0), schema_version=int(f.get("schema_version") or 0),
                           manifest_json=f.get("manifest_json", ""))


class EpisodeAnnouncer:
    """Actor side: one XADD per committed episode. The stream is capped (approximately) so a
    fleet cannot grow Redis without bound; consumers keep up long before the cap matters."""

    def __init__(self, client: redis.Redis, stream: str = config.EPISODE_STREAM, maxlen: int = EPISODE_STREAM_CAP):
        self.client, self.stream, self.maxlen = client, stream, maxlen

    def announce(self, event: pb.EpisodeEvent) -> str:
        msg_id = self.client.xadd(self.stream, event_to_fields(event), maxlen=self.maxlen, approximate=True)
        return msg_id.decode() if isinstance(msg_id, bytes) else msg_id


@dataclass
class Delivery:
    msg_id: str
    fields: dict
    deliveries: int = 1  # how many times this message has been handed out (from XPENDING)


class EpisodeQueueConsumer:
    """Learner side of the stream, one instance per consumer process/actor."""

    def __init__(self, client: redis.Redis, group: str = config.CONSUMER_GROUP,
                 consumer: str | None = None, stream: str = config.EPISODE_STREAM,
                 dead_stream: str = config.DEAD_LETTER_STREAM, claim_idle_ms: int = 30_000,
                 max_deliveries: int = 5):
        self.client, self.group, self.stream, self.dead_stream = client, group, stream, dead_stream
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self._last_claim = 0.0
        self.ensure_group()

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _reclaim(self, count: int) -> list[Delivery]:
        """Take over messages another consumer read but never acked (it died)."""
        out: list[Delivery] = []
        start = "0-0"
        while len(out) < count:
            res = self.client.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms,
                                         start_id=start, count=count - len(out))
            next_id, messages = res[0], res[1]
            for msg_id, fields in messages:
                if fields is None:  # trimmed away while pending
                    self.client.xack(self.stream, self.group, msg_id)
                    continue
                out.append(Delivery(_s(msg_id), fields, deliveries=self._delivery_count(msg_id)))
            if _s(next_id) == "0-0" or not messages:
                break
            start = next_id
        return out

    def _delivery_count(self, msg_id) -> int:
        info = self.client.xpending_range(self.stream, self.group, min=msg_id, max=msg_id, count=1)
        return int(info[0]["times_delivered"]) if info else 1

    def poll(self, count: int = 32, block_ms: int = 100) -> list[Delivery]:
        """Reclaimed stale messages first (at most once per claim interval), then new ones."""
        now = time.monotonic()
        out: list[Delivery] = []
        if now - self._last_claim >= max(self.claim_idle_ms / 1000 / 2, 0.05):
            self._last_claim = now
            try:
                out = self._reclaim(count)
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):
                    self.ensure_group()
                else:
                    raise
        if out:
            return out
        try:
            res = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count,
                                         block=block_ms if block_ms > 0 else None)  # BLOCK 0 = forever
        except redis.ResponseError as e:
            if "NOGROUP" in str(e):  # Redis restarted without persistence: recreate and go on
                self.ensure_group()
                return []
            raise
        for _stream, messages in res or []:
            for msg_id, fields in messages:
                out.append(Delivery(_s(msg_id), fields))
        return out

    def ack(self, msg_id: str) -> None:
        self.client.xack(self.stream, self.group, msg_id)

    def dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Park an event that can never be processed, with the reason; then ack it."""
        fields = bounded_copy(delivery.fields)
        fields.update({"dead_reason": reason, "dead_detail": detail[:2000], "original_id": delivery.msg_id,
                       "dead_at_ns": str(time.time_ns()), "consumer": self.consumer})
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.dead_stream, fields, maxlen=100_000, approximate=True)
        pipe.xack(self.stream, self.group, delivery.msg_id)
        pipe.execute()
        log.warning("dead-lettered %s: %s: %s", delivery.msg_id, reason, detail)

    def lag(self) -> dict:
        """Pending (delivered, unacked) and not-yet-delivered counts for the group."""
        try:
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError:
            return {"pending": 0, "lag": 0}
        for g in groups:
            if _s(g["name"]) == self.group:
                return {"pending": int(g.get("pending") or 0), "lag": int(g.get("lag") or 0)}
        return {"pending": 0, "lag": 0}


DEAD_FIELD_MAX = 8 * 1024   # bytes kept of each field of a dead-lettered event
DEAD_FIELDS_MAX = 32        # fields kept of it


def bounded_copy(fields: dict) -> dict:
    """What the dead-letter stream keeps of an event: at most DEAD_FIELDS_MAX fields of at most
    DEAD_FIELD_MAX bytes each (an event anyone wrote 100 MB into is not copied whole); what was
    cut is named in `dead_truncated`."""
    out: dict = {}
    cut = []
    for i, (k, v) in enumerate(fields.items()):
        name = (k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k))[:128]
        if i >= DEAD_FIELDS_MAX:
            cut.append(f"+{len(fields) - DEAD_FIELDS_MAX} fields")
            break
        raw = v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogatepass")
        if len(raw) > DEAD_FIELD_MAX:
            cut.append(f"{name}:{len(raw)}")
            raw = raw[:DEAD_FIELD_MAX]
        out[name] = raw
    if cut:
        out["dead_truncated"] = ",".join(cut)[:1024]
    return out


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
