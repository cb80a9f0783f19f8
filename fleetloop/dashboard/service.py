"""The dashboard's model of the fleet: everything the REST API, the live stream and /metrics show,
and every operator action. No HTTP here (see api.py).

Where things come from:
  robots      heartbeat hashes the actor daemons write every ~2 s (fleetloop:robot:<id>)
  episodes    the dashboard's OWN frame index, fed by a DataConsumer in its own consumer group
              ("dashboard"), so it sees every verified episode without taking any from the learner;
              rewound to the start of the stream on start-up, so a restart rebuilds it
  labels      operator relabels: labels/<episode_id>.json in the store (durable) + LABEL_STREAM
              (what the learner applies, and how several dashboards stay in step)
  policies    the PolicyRegistry (store + Redis pointers)
  learner     LEARNER_STATS_KEY, written by the learner
  audit       AUDIT_STREAM
"""
from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import redis
from google.protobuf import json_format

from fleetloop import config
from fleetloop.buffer.codec import EpisodeRejected, check_id, read_manifest
from fleetloop.buffer.consumer import DataConsumer
from fleetloop.buffer.index import ONLINE, EpisodeEntry, FrameIndex, PayloadCache
from fleetloop.buffer.store import ObjectStore
from fleetloop.dashboard import audit as audit_form
from fleetloop.dashboard import heartbeat
from fleetloop.policy.registry import PolicyRegistry, UnknownVersion, canary_member
from fleetloop.proto.v1 import policy_pb2
from fleetloop.stats import wilson_interval

log = logging.getLogger(__name__)

GROUP = "dashboard"
ROBOTS_SET = config.HEARTBEAT_PREFIX + "all"
ACK_STREAM = config.CONTROL_CHANNEL_PREFIX + "acks"
OUTCOMES = ("success", "failure", "unknown")
CONTROL_ACTIONS = {
    "takeover": policy_pb2.CONTROL_ACTION_TAKEOVER,
    "release": policy_pb2.CONTROL_ACTION_RELEASE,
    "pause": policy_pb2.CONTROL_ACTION_PAUSE,
    "resume": policy_pb2.CONTROL_ACTION_RESUME,
}
AUDIT_MAXLEN = 100_000
LABEL_MAXLEN = 1_000_000
LEARNER_STALE_S = 30.0  # learner stats older than this: the learner is not running


class NotFound(LookupError):
    """An unknown robot, episode, version, step or camera (the API answers 404)."""

    def __init__(self, kind: str, key: str, why: str = ""):
        super().__init__(f"unknown {kind} {key!r}" + (f": {why}" if why else ""))
        self.kind, self.key = kind, key

    def __str__(self) -> str:
        return self.args[0]


class NotDelivered(RuntimeError):
    """A control command reached no daemon (the robot is offline); nothing was applied."""


class BadRequest(ValueError):
    """A request that is well-formed but cannot be applied as asked (the API answers 422)."""


class CannotApply(RuntimeError):
    """A valid request the fleet's present state does not allow (the API answers 409)."""


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def rate(k: int, n: int) -> dict:
    """A proportion with its Wilson 95% interval; rate is None when n == 0."""
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "lo": round(lo, 4), "hi": round(hi, 4)}


@dataclass
class Tally:
    """Policy rollouts only: demonstrations say nothing about how the policy does."""
    episodes: int = 0
    successes: int = 0
    failures: int = 0
    intervened: int = 0            # episodes with at least one human-driven step
    steps: int = 0
    intervention_steps: int = 0
    first_ns: int = 0
    last_ns: int = 0

    def add(self, e: EpisodeEntry, intervention_steps: int) -> None:
        self.episodes += 1
        self.successes += e.outcome == "success"
        self.failures += e.outcome == "failure"
        self.intervened += intervention_steps > 0
        self.steps += e.num_steps
        self.intervention_steps += intervention_steps
        self.first_ns = min(self.first_ns or e.ended_ns, e.ended_ns)
        self.last_ns = max(self.last_ns, e.ended_ns)

    def as_dict(self) -> dict:
        # Success among labelled episodes: an unknown outcome (incomplete, unlabelled) is no evidence.
        return {"episodes": self.episodes, "success": rate(self.successes, self.successes + self.failures),
                "intervention": rate(self.intervened, self.episodes),
                "intervention_step_rate": self.intervention_steps / self.steps if self.steps else None,
                "first_ns": self.first_ns, "last_ns": self.last_ns}


@dataclass
class Aggregates:
    """Everything derived from one version of the index, computed in one pass."""
    version: int = -1
    newest_first: list = field(default_factory=list)
    fleet: Tally = field(default_factory=Tally)
    by_robot: dict = field(default_factory=dict)
    by_task: dict = field(default_factory=dict)
    by_version: dict = field(default_factory=dict)
    by_version_task: dict = field(default_factory=dict)


def auto_bucket_s(span_s: float, min_s: float = 0.0, max_points: int = 30) -> int:
    """A round bucket width giving at most max_points buckets and at least min_s seconds."""
    for b in (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if span_s / b <= max_points and b >= min_s:
            return b
    return 7 * 86400


def sample_steps(num_steps: int, n: int = 12) -> list[int]:
    if num_steps <= 0:
        return []
    if num_steps <= n:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (n - 1)) for i in range(n)})


def mask_segments(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of True."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


class DashboardConsumer(DataConsumer):
    """A DataConsumer reading in the dashboard's own consumer group: every group sees every
    event, so the dashboard neither steals episodes from the learner nor waits on it."""

    def __init__(self, store: ObjectStore, client: redis.Redis, index: FrameIndex, group: str,
                 consumer_name: str, on_indexed):
        super().__init__(store, client, index, consumer_name=consumer_name, on_indexed=on_indexed, group=group)

    def rewind(self) -> None:
        """Re-deliver the whole stream to this group: the index lives in memory, so a restarted
        dashboard rebuilds it (duplicates are absorbed by the index's dedupe)."""
        self.queue.ensure_group()
        self.queue.client.xgroup_setid(self.queue.stream, self.queue.group, id="0")


class Dashboard:
    def __init__(self, redis_client: redis.Redis, store: ObjectStore, registry: Optional[PolicyRegistry] = None,
                 group: str = GROUP, consumer_name: Optional[str] = None, offline_after_s: float = 6.0,
                 image_cache_bytes: int = 64 << 20):
        self.redis, self.store = redis_client, store
        self.registry = registry or PolicyRegistry(store, redis_client)
        self.offline_after_s = offline_after_s
        self.index = FrameIndex()
        self.payloads = PayloadCache(store, max_bytes=image_cache_bytes)
        self.group = group
        self.consumer = DashboardConsumer(store, redis_client, self.index, group,
                                          consumer_name or f"{group}-{socket.gethostname()}", self._on_indexed)
        self.labels: dict[str, dict] = {}       # episode_id -> newest operator label
        self._label_lock = threading.Lock()
        self._agg = Aggregates()
        self._agg_lock = threading.Lock()
        self._agg_at, self._agg_cost = 0.0, 0.0
        self._snap: Optional[dict] = None
        self._snap_at = 0.0
        self._snap_lock = threading.Lock()
        self._step_samples: deque = deque(maxlen=120)  # (monotonic, learner step) for the step rate
        self._manifests: OrderedDict = OrderedDict()   # manifest_key -> EpisodeManifest (small LRU)
        self._thumbs: OrderedDict = OrderedDict()      # (episode, step, camera, size) -> PNG bytes
        self._cache_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self, rewind: bool = True) -> "Dashboard":
        if rewind:
            self.consumer.rewind()
        self._stop.clear()
        self._threads = [self.consumer.start_thread(self._stop)]
        # The store is the record of truth: rebuild the view from it at start (an old store behind
        # a new or emptied Redis) and whenever Redis looks reset (buffer/reconcile.py).
        from fleetloop.buffer.reconcile import Reconciler
        self.reconciler = Reconciler(self.store, self.index, name="dashboard", client=self.redis,
                                     on_indexed=self._on_indexed, group=self.group)
        self._threads.append(self.reconciler.start_thread(self._stop))
        t = threading.Thread(target=self._follow_labels, name="dashboard-labels", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []

    def wait_indexed(self, episode_id: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while episode_id not in self.index and time.monotonic() < deadline:
            time.sleep(0.02)
        return episode_id in self.index

    # ---- the index and what is derived from it --------------------------------------------

    def _on_indexed(self, entry: EpisodeEntry) -> None:
        with self._label_lock:
            label = self.labels.get(entry.episode_id)
            if label:
                self.index.relabel(entry.episode_id, label["outcome"])

    def aggregates(self) -> Aggregates:
        """Recomputed when the index changed; at most every 2x the last computation's cost, so a
        huge index under a fast stream costs a bounded share of one core."""
        with self._agg_lock:
            v = self.index.version
            if v == self._agg.version or time.monotonic() - self._agg_at < 2 * self._agg_cost:
                return self._agg
            t0 = time.monotonic()
            agg = Aggregates(version=v)
            entries = self.index.episodes()
            entries.sort(key=lambda e: e.ended_ns, reverse=True)
            agg.newest_first = entries
            for e in entries:
                if e.source != ONLINE:
                    continue
                n_int = int(e.intervention.sum())
                for table, key in ((agg.by_robot, e.robot_id), (agg.by_task, e.task_id),
                                   (agg.by_version, e.policy_version),
                                   (agg.by_version_task, (e.policy_version, e.task_id))):
                    table.setdefault(key, Tally()).add(e, n_int)
                agg.fleet.add(e, n_int)
            self._agg, self._agg_at = agg, time.monotonic()
            self._agg_cost = self._agg_at - t0
            return agg

    def entry(self, episode_id: str) -> EpisodeEntry:
        try:
            return self.index.get(episode_id)
        except KeyError:
            raise NotFound("episode", episode_id) from None

    def episode_summary(self, e: EpisodeEntry) -> dict:
        d = e.summary()
        d["has_intervention"] = e.has_intervention
        label = self.labels.get(e.episode_id)
        d["labelled_by"] = label["by"] if label else None
        return d

    def episodes(self, robot_id: Optional[str] = None, task_id: Optional[str] = None,
                 policy_version: Optional[str] = None, outcome: Optional[str] = None,
                 has_intervention: Optional[bool] = None, source: Optional[str] = None,
                 offset: int = 0, limit: int = 50) -> dict:
        matches = [e for e in self.aggregates().newest_first
                   if (robot_id is None or e.robot_id == robot_id) and (task_id is None or e.task_id == task_id)
                   and (policy_version is None or e.policy_version == policy_version)
                   and (outcome is None or e.outcome == outcome) and (source is None or e.source == source)
                   and (has_intervention is None or e.has_intervention == has_intervention)]
        page = matches[offset:offset + limit]
        return {"total": len(matches), "offset": offset, "limit": limit,
                "episodes": [self.episode_summary(e) for e in page]}

    def _manifest(self, key: str):
        with self._cache_lock:
            m = self._manifests.get(key)
            if m is not None:
                self._manifests.move_to_end(key)
                return m
        m = read_manifest(self.store, key)
        with self._cache_lock:
            self._manifests[key] = m
            while len(self._manifests) > 512:
                self._manifests.popitem(last=False)
        return m

    def episode(self, episode_id: str) -> dict:
        e = self.entry(episode_id)
        d = self.episode_summary(e)
        d["manifest_key"] = e.manifest_key
        d["label"] = self.labels.get(episode_id)
        segments = [{"start_step": a, "end_step": b, "operator": "", "reason": ""}
                    for a, b in mask_segments(e.intervention)]
        cameras: list[str] = []
        try:  # who intervened and why is only in the manifest; the index keeps the mask
            m = self._manifest(e.manifest_key)
            cameras = list(m.cameras)
            named = {(s.start_step, s.end_step): s for s in m.interventions}
            for s in segments:
                hit = named.get((s["start_step"], s["end_step"]))
                if hit:
                    s.update(operator=hit.operator, reason=hit.reason)
        except Exception as err:  # the detail still shows what the index knows
            log.warning("manifest %s unreadable for the detail view: %s", e.manifest_key, err)
            d["manifest_error"] = str(err)
        d["segments"] = segments
        d["has_images"] = any(ref.images_bytes for ref in e.chunks)
        if d["has_images"] and not cameras:  # manifests may leave `cameras` empty: ask the first frame
            try:
                cameras = sorted(self.payloads.images(e, 0))
            except Exception as err:
                log.warning("images of %s unreadable: %s", episode_id, err)
        d["cameras"] = cameras
        d["thumbnail_steps"] = sample_steps(e.num_steps) if d["has_images"] else []
        return d

    def thumbnail(self, episode_id: str, step: int, camera: Optional[str] = None, size: int = 128) -> bytes:
        """One camera frame as a PNG at most size x size, fetched lazily and verified against the
        manifest's digest (PayloadCache), then kept in a small LRU."""
        e = self.entry(episode_id)
        if not 0 <= step < e.num_steps:
            raise NotFound("step", f"{episode_id}/{step}", f"the episode has steps 0..{e.num_steps - 1}")
        key = (episode_id, step, camera, size)
        with self._cache_lock:
            png = self._thumbs.get(key)
            if png is not None:
                self._thumbs.move_to_end(key)
                return png
        try:
            images = self.payloads.images(e, step)  # EpisodeRejected when the bytes fail their digest
        except (ValueError, OSError) as err:  # verified bytes that still do not decode as an image
            raise EpisodeRejected("corrupt-image", f"{episode_id} step {step}: {err}") from None
        if not images:
            raise NotFound("image", f"{episode_id}/{step}", "this episode was recorded without camera images")
        cam = camera or sorted(images)[0]
        if cam not in images:
            raise NotFound("camera", cam, f"cameras are {sorted(images)}")
        from PIL import Image
        arr = images[cam]
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3])
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        png = buf.getvalue()
        with self._cache_lock:
            self._thumbs[key] = png
            while len(self._thumbs) > 4096:
                self._thumbs.popitem(last=False)
        return png

    # ---- labels ----------------------------------------------------------------------------

    def label(self, episode_id: str, outcome: str, by: str) -> dict:
        if outcome not in OUTCOMES:
            raise BadRequest(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        e = self.entry(episode_id)
        previous = e.outcome
        record = {"episode_id": episode_id, "outcome": outcome, "by": by, "labelled_ns": time.time_ns(),
                  "previous": previous}
        # The store copy first: a rebuilt index (new dashboard, new learner) finds it there even
        # when the stream was trimmed or Redis lost it; the stream is what the learner applies now.
        try:
            key = f"labels/{check_id('episode id', episode_id)}.json"
        except ValueError as err:  # an imported episode whose id cannot name a store object
            raise CannotApply(f"cannot store a label for this episode: {err}") from None
        self.store.put(key, json.dumps(record).encode())
        self.redis.xadd(config.LABEL_STREAM, {"episode_id": episode_id, "outcome": outcome, "by": by,
                                              "labelled_ns": record["labelled_ns"]},
                        maxlen=LABEL_MAXLEN, approximate=True)
        self._apply_label(record)
        return {"episode": self.episode_summary(self.entry(episode_id)), "previous": previous}

    def _apply_label(self, record: dict) -> None:
        eid, outcome = record.get("episode_id"), record.get("outcome")
        if not eid or outcome not in OUTCOMES:
            log.warning("ignoring malformed label %r", record)
            return
        with self._label_lock:
            old = self.labels.get(eid)
            if old and int(old.get("labelled_ns") or 0) > int(record.get("labelled_ns") or 0):
                return  # an older label arriving late (store copy after the stream's)
            self.labels[eid] = record
            if eid in self.index:
                self.index.relabel(eid, outcome)

    def _follow_labels(self) -> None:
        """Store labels once (durable), then follow LABEL_STREAM from its start: labels made by
        other dashboards reach this index too."""
        for attempt in range(5):
            try:
                for key in self.store.list("labels/"):
                    if key.endswith(".json"):
                        self._apply_label(json.loads(self.store.get(key)))
                break
            except Exception as e:  # a store outage must not stop the stream follower
                log.warning("cannot read stored labels (attempt %d): %s", attempt + 1, e)
                if self._stop.wait(min(5.0, 0.5 * 2 ** attempt)):
                    return
        last, backoff = "0-0", 0.2
        while not self._stop.is_set():
            try:
                res = self.redis.xread({config.LABEL_STREAM: last}, count=500, block=500)
                backoff = 0.2
            except redis.RedisError as e:
                log.warning("label stream unavailable (%s); retrying", e)
                self._stop.wait(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            for _stream, messages in res or []:
                for msg_id, fields in messages:
                    last = _s(msg_id)
                    self._apply_label({_s(k): _s(v) for k, v in fields.items()})

    # ---- robots ----------------------------------------------------------------------------

    def heartbeats(self) -> dict[str, Optional[dict]]:
        """Robots with a heartbeat, each validated and bounded (fleetloop.dashboard.heartbeat)."""
        return heartbeat.read_all(self.redis)

    def require_robot(self, robot_id: str) -> None:
        try:  # reserved names ('all' is the robot set's own key, 'acks' the ack stream) are never robots
            check_id("robot id", robot_id)
        except ValueError as err:
            raise NotFound("robot", robot_id, str(err).split(": ")[-1]) from None
        if not (self.redis.sismember(ROBOTS_SET, robot_id) or self.redis.exists(config.HEARTBEAT_PREFIX + robot_id)):
            raise NotFound("robot", robot_id)

    def _steering(self) -> dict:
        return {"pins": self.registry.robot_pins(), "canary": self.registry.canary(),
                "pointer": self.registry.pointer()}

    @staticmethod
    def _target(robot_id: str, steering: dict) -> tuple[Optional[str], Optional[str]]:
        """The registry's resolution (robot pin > canary > fleet pointer) evaluated locally for
        the whole fleet from one read of the steering state, instead of one round trip per robot."""
        pin = steering["pins"].get(robot_id)
        if pin:
            return pin, "robot_pin"
        c = steering["canary"]
        if c and (robot_id in c["robots"] or canary_member(robot_id, c["fraction"])):
            return c["version"], "canary"
        v = steering["pointer"].get("version")
        return (v, "fleet") if v else (None, None)

    def _robot_summary(self, robot_id: str, hb: Optional[dict], agg: Aggregates, steering: dict,
                       now_ns: int) -> dict:
        hb = hb or {}
        last = int(hb.get("last_seen_ns") or 0)
        age = max(0.0, (now_ns - last) / 1e9) if last else None
        tally: Tally = agg.by_robot.get(robot_id) or Tally()
        spool = hb.get("spool") or {}
        target, source = self._target(robot_id, steering)
        return {
            "robot_id": robot_id, "online": age is not None and age <= self.offline_after_s,
            "last_seen_ns": last or None, "age_s": None if age is None else round(age, 2),
            "task_id": hb.get("task_id") or "", "episode_id": hb.get("episode_id") or "",
            "policy_version": hb.get("policy_version") or "", "pending_version": hb.get("pending_version") or "",
            "target_version": target, "target_source": source,
            "takeover_requested": bool(hb.get("takeover_requested")), "paused": bool(hb.get("paused")),
            "spool": {"episodes": int(spool.get("episodes") or 0), "bytes": int(spool.get("bytes") or 0),
                      "max_bytes": spool.get("max_bytes"), "dropped_episodes": int(spool.get("dropped_episodes") or 0),
                      "damaged_episodes": int(spool.get("damaged_episodes") or 0)},
            "upload_error": hb.get("upload_error") or "",
            **tally.as_dict(),
        }

    def robots(self) -> list[dict]:
        hbs, agg, steering, now = self.heartbeats(), self.aggregates(), self._steering(), time.time_ns()
        return [self._robot_summary(rid, hb, agg, steering, now) for rid, hb in hbs.items()]

    def robot(self, robot_id: str, recent: int = 20) -> dict:
        self.require_robot(robot_id)
        hb = heartbeat.read_one(self.redis, robot_id)
        agg = self.aggregates()
        d = self._robot_summary(robot_id, hb, agg, self._steering(), time.time_ns())
        hb = hb or {}
        d["counters"] = hb.get("counters") or {}
        d["swap"] = hb.get("swap") or {}
        d["last_command"] = hb.get("last_command") or {}
        d["guidance"] = hb.get("guidance")  # the indicator / guidance beta its policy runs with
        d["by_version"] = {}
        for e in agg.newest_first:
            if e.robot_id == robot_id and e.source == ONLINE:
                d["by_version"].setdefault(e.policy_version, Tally()).add(e, int(e.intervention.sum()))
        d["by_version"] = {v: t.as_dict() for v, t in sorted(d["by_version"].items())}
        d["recent_episodes"] = self.episodes(robot_id=robot_id, limit=recent)["episodes"]
        return d

    # ---- operator control ------------------------------------------------------------------

    def control(self, robot_id: str, action: str, operator: str, wait_ack_s: float = 2.0) -> dict:
        """PUBLISH a ControlCommand on the robot's channel; the daemon applies it and acks on the
        acks stream. Waits briefly for the ack so the operator sees "applied", not just "sent"."""
        if action not in CONTROL_ACTIONS:
            raise BadRequest(f"unknown control action {action!r}")
        self.require_robot(robot_id)
        cmd = policy_pb2.ControlCommand(command_id=uuid.uuid4().hex, robot_id=robot_id,
                                        action=CONTROL_ACTIONS[action], operator=operator, issued_ns=time.time_ns())
        newest = self.redis.xrevrange(ACK_STREAM, count=1)
        after = _s(newest[0][0]) if newest else "0-0"  # acks from here on can be ours
        receivers = self.redis.publish(config.CONTROL_CHANNEL_PREFIX + robot_id, json_format.MessageToJson(cmd))
        if not receivers:
            raise NotDelivered(f"robot {robot_id!r} is not listening on its control channel (offline?); "
                               f"nothing was applied")
        ack = self._wait_ack(cmd.command_id, after, wait_ack_s)
        return {"command_id": cmd.command_id, "robot_id": robot_id, "action": action, "receivers": receivers,
                "ack": ack}

    def _wait_ack(self, command_id: str, after: str, timeout_s: float) -> Optional[str]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            res = self.redis.xread({ACK_STREAM: after}, count=100, block=max(1, int(left * 1000)))
            for _stream, messages in res or []:
                for msg_id, fields in messages:
                    after = _s(msg_id)
                    f = {_s(k): _s(v) for k, v in fields.items()}
                    if f.get("command_id") == command_id:
                        return f.get("result") or "applied"
        return None

    # ---- policies --------------------------------------------------------------------------

    def _running_versions(self, hbs: dict) -> Counter:
        now = time.time_ns()
        return Counter(hb.get("policy_version") for hb in hbs.values()
                       if hb and (now - int(hb.get("last_seen_ns") or 0)) / 1e9 <= self.offline_after_s)

    def policies(self, history: int = 100) -> dict:
        agg = self.aggregates()
        running = self._running_versions(self.heartbeats())
        steering = self._steering()
        pointer, canary, pins = steering["pointer"], steering["canary"], steering["pins"]
        registered = self.registry.list_versions()
        known = {v["version"] for v in registered}
        # Versions robots ran that the registry does not list (an initial checkpoint, another
        # registry): their on-robot success still matters.
        extra = [{"version": v} for v in agg.by_version if v and v not in known]
        out = []
        for v in registered + extra:
            name = v["version"]
            v = dict(v, registered=name in known)
            v["on_robot"] = (agg.by_version.get(name) or Tally()).as_dict()
            v["robots_running"] = running.get(name, 0)
            v["current"] = pointer.get("version") == name
            v["canary"] = bool(canary and canary["version"] == name)
            v["pinned_robots"] = sorted(r for r, pv in pins.items() if pv == name)
            out.append(v)
        out.sort(key=lambda v: v["version"], reverse=True)
        return {"versions": out, "pointer": pointer, "canary": canary, "robot_pins": pins,
                "latest": self.registry.latest_version(), "history": self.registry.history(history)}

    def policy(self, version: str) -> dict:
        agg = self.aggregates()
        try:
            m = self.registry.manifest(version)
            d = json_format.MessageToDict(m, preserving_proto_field_name=True)
            try:
                d["config"] = json.loads(d.pop("config_json", "") or "null")
            except ValueError:
                pass
            d["registered"] = True
        except UnknownVersion:
            if version not in agg.by_version:
                raise NotFound("policy version", version) from None
            d = {"version": version, "registered": False}
        steering = self._steering()
        d["on_robot"] = (agg.by_version.get(version) or Tally()).as_dict()
        d["by_task"] = {t: tally.as_dict() for (v, t), tally in sorted(agg.by_version_task.items()) if v == version}
        d["robots_running"] = self._running_versions(self.heartbeats()).get(version, 0)
        d["current"] = steering["pointer"].get("version") == version
        d["pinned_robots"] = sorted(r for r, pv in steering["pins"].items() if pv == version)
        return d

    def _require_version(self, version: str) -> None:
        if not self.registry.exists(version):
            raise NotFound("policy version", version)

    def promote(self, version: str, by: str) -> dict:
        self._require_version(version)
        self.registry.promote(version, by=by)
        return self.steering_state()

    def rollback(self, by: str, pin: bool = False) -> dict:
        version = self.registry.rollback(by=by, pin=pin)
        return dict(self.steering_state(), rolled_back_to=version)

    def pin_fleet(self, version: str, by: str) -> dict:
        self._require_version(version)
        self.registry.pin_fleet(version, by=by)
        return self.steering_state()

    def unpin_fleet(self, by: str) -> dict:
        self.registry.unpin_fleet(by=by)
        return self.steering_state()

    def pin_robot(self, robot_id: str, version: str, by: str) -> dict:
        self.require_robot(robot_id)
        self._require_version(version)
        self.registry.pin_robot(robot_id, version, by=by)
        return self.steering_state()

    def unpin_robot(self, robot_id: str, by: str) -> dict:
        self.require_robot(robot_id)
        self.registry.unpin_robot(robot_id, by=by)
        return self.steering_state()

    def set_canary(self, version: str, robot_ids: Iterable[str], fraction: float, by: str) -> dict:
        robot_ids = list(robot_ids)
        if not robot_ids and not fraction:
            raise BadRequest("a canary needs robot_ids or a fraction > 0")
        self._require_version(version)
        for rid in robot_ids:
            self.require_robot(rid)
        try:
            self.registry.set_canary(version, robot_ids=robot_ids, fraction=fraction, by=by)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return self.steering_state()

    def clear_canary(self, by: str) -> dict:
        self.registry.clear_canary(by=by)
        return self.steering_state()

    def steering_state(self) -> dict:
        s = self._steering()
        return {"pointer": s["pointer"], "canary": s["canary"], "robot_pins": s["pins"]}

    # ---- tasks and time series --------------------------------------------------------------

    def tasks(self) -> list[dict]:
        agg = self.aggregates()
        return [{"task_id": t, **tally.as_dict()} for t, tally in sorted(agg.by_task.items())]

    def series(self, bucket_s: Optional[int] = None, task_id: Optional[str] = None) -> dict:
        """Per task, success and intervention rates per time bucket (by episode end), each with
        its Wilson interval; plus when each policy version first and last ran (the timeline)."""
        agg = self.aggregates()
        rollouts = [e for e in agg.newest_first if e.source == ONLINE and (task_id is None or e.task_id == task_id)]
        if task_id is not None and task_id not in agg.by_task:
            raise NotFound("task", task_id)
        if not rollouts:
            return {"bucket_s": bucket_s or 60, "tasks": {}, "versions": []}
        t0, t1 = rollouts[-1].ended_ns, rollouts[0].ended_ns
        if not bucket_s:  # wide enough that the busiest task has ~5 episodes a bucket: a rate from 1 is noise
            busiest = max(Counter(e.task_id for e in rollouts).values())
            span_s = (t1 - t0) / 1e9
            bucket_s = auto_bucket_s(span_s, min_s=span_s * 5 / busiest)
        width = int(bucket_s * 1e9)
        cells: dict[tuple[str, int], Tally] = {}
        for e in rollouts:
            cells.setdefault((e.task_id, e.ended_ns // width * width), Tally()).add(e, int(e.intervention.sum()))
        tasks: dict[str, list] = {}
        for (task, start), tally in sorted(cells.items()):
            d = tally.as_dict()
            tasks.setdefault(task, []).append({"t_ns": start, "episodes": d["episodes"], "success": d["success"],
                                               "intervention": d["intervention"]})
        versions = sorted(({"version": v, "first_ns": t.first_ns, "last_ns": t.last_ns, "episodes": t.episodes}
                           for v, t in agg.by_version.items() if v), key=lambda x: x["first_ns"])
        return {"bucket_s": bucket_s, "t0_ns": t0 // width * width, "t1_ns": t1 // width * width + width,
                "tasks": tasks, "versions": versions}

    # ---- learner and queue -----------------------------------------------------------------

    def queue(self) -> dict:
        groups = []
        try:
            for g in self.redis.xinfo_groups(config.EPISODE_STREAM):
                groups.append({"group": _s(g["name"]), "consumers": int(g.get("consumers") or 0),
                               "pending": int(g.get("pending") or 0),
                               "lag": None if g.get("lag") is None else int(g["lag"]),
                               "last_delivered_id": _s(g.get("last-delivered-id"))})
        except redis.ResponseError:  # no stream yet
            pass
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(config.EPISODE_STREAM)
        pipe.xlen(config.DEAD_LETTER_STREAM)
        length, dead = pipe.execute()
        return {"stream_length": int(length), "dead_letters": int(dead), "groups": groups}

    def learner(self) -> dict:
        stats = {}
        for k, v in self.redis.hgetall(config.LEARNER_STATS_KEY).items():
            try:
                stats[_s(k)] = json.loads(v)
            except ValueError:
                stats[_s(k)] = _s(v)
        step = _num(stats.get("step"))
        now = time.monotonic()
        if step is not None:
            if self._step_samples and step < self._step_samples[-1][1]:
                self._step_samples.clear()  # the learner restarted
            if not self._step_samples or now - self._step_samples[-1][0] >= 0.5:
                self._step_samples.append((now, step))
        step_rate = _num(stats.get("steps_per_s"))  # the learner's own figure when it reports one
        window = [s for s in self._step_samples if now - s[0] <= 60]
        if step_rate is None and len(window) >= 2 and window[-1][0] - window[0][0] >= 1.0:
            step_rate = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
        updated = _num(stats.get("updated_ns"))
        age_s = round(max(0.0, (time.time_ns() - updated) / 1e9), 1) if updated else None
        fresh = bool(stats) and (age_s is None or age_s <= (_num(stats.get("stale_after_s")) or LEARNER_STALE_S))
        if stats and not fresh and stats.get("status") not in ("stopped", "failed", "fenced"):
            # a learner that died wrote no final status: do not go on showing "training"
            stats["reported_status"], stats["status"] = stats.get("status"), "stale"
        return {"available": bool(stats), "fresh": fresh,
                "age_s": age_s, "step": step, "step_rate": step_rate,
                "samples_per_s": _num(stats.get("samples_per_s")), "stats": stats}

    def ingest(self, window_s: float = 60.0) -> dict:
        """Episodes and frames that ended in the last window_s and are indexed, per second: the
        fleet's ingest rate as the buffer sees it (a start-up replay of old episodes is not counted)."""
        cutoff = time.time_ns() - int(window_s * 1e9)
        episodes = frames = 0
        for e in self.aggregates().newest_first:  # newest first: stop at the window's edge
            if e.ended_ns < cutoff:
                break
            episodes += 1
            frames += e.num_steps
        return {"window_s": window_s, "episodes_per_s": episodes / window_s, "frames_per_s": frames / window_s,
                "indexed_total": len(self.index), "consumer": self.consumer.stats.as_dict()}

    # ---- the live snapshot -----------------------------------------------------------------

    def snapshot(self, max_age_s: float = 0.5) -> dict:
        """What the page shows live; shared by all SSE clients (one Redis read per interval, not
        one per open browser tab)."""
        with self._snap_lock:
            if self._snap is not None and time.monotonic() - self._snap_at < max_age_s:
                return self._snap
            agg = self.aggregates()
            hbs, steering, now = self.heartbeats(), self._steering(), time.time_ns()
            robots = [self._robot_summary(rid, hb, agg, steering, now) for rid, hb in hbs.items()]
            online = [r for r in robots if r["online"]]
            snap = {
                "ts_ns": now,
                "robots": robots,
                "fleet": {"robots": len(robots), "online": len(online), "offline": len(robots) - len(online),
                          "takeovers": sum(r["takeover_requested"] for r in online),
                          "paused": sum(r["paused"] for r in online),
                          "spool_episodes": sum(r["spool"]["episodes"] for r in robots)},
                "episodes": {"indexed": len(self.index), "frames": self.index.frames, "index_version": agg.version,
                             **agg.fleet.as_dict()},
                "policy": {"pointer": steering["pointer"], "canary": steering["canary"],
                           "robot_pins": steering["pins"], "latest": self.registry.latest_version()},
                "learner": self.learner(),
                "queue": self.queue(),
                "ingest": {k: v for k, v in self.ingest().items() if k != "consumer"},
            }
            self._snap, self._snap_at = snap, time.monotonic()
            return snap

    # ---- audit -----------------------------------------------------------------------------

    def audit(self, record: dict) -> None:
        """One entry on AUDIT_STREAM. Whatever a request carried, the entry is flat UTF-8 strings
        of bounded size with finite JSON numbers (fleetloop.dashboard.audit), so it can always be
        written and listed."""
        self.redis.xadd(config.AUDIT_STREAM, audit_form.encode_fields(record), maxlen=AUDIT_MAXLEN, approximate=True)

    def audit_log(self, limit: int = 100, before: Optional[str] = None) -> dict:
        """Newest first. No stored byte sequence fails the page: an entry is decoded leniently and
        cleaned (fleetloop.dashboard.audit.decode_entry); one that cannot be read at all (written by
        hand, by an older version, cut short) is listed as {"id", "unreadable": true, "raw": {...}}."""
        top = f"({before}" if before else "+"
        try:
            rows = self.redis.xrevrange(config.AUDIT_STREAM, max=top, min="-", count=limit)
        except redis.ResponseError:  # before=0-0 (nothing is older) or an id past the 64-bit range
            if before is None:
                raise
            rows = []
        entries = [audit_form.decode_entry(msg_id, fields) for msg_id, fields in rows]
        return {"entries": entries, "next_before": entries[-1]["id"] if len(entries) == limit else None}
