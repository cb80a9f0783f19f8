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

import socket
import threading
import time
from collections import OrderedDict, deque
from typing import Optional

import redis

from fleetloop.buffer.consumer import DataConsumer
from fleetloop.buffer.index import FrameIndex, PayloadCache
from fleetloop.buffer.store import ObjectStore
from fleetloop.dashboard.resources.audit import AuditResource
from fleetloop.dashboard.resources.episodes import Aggregates, EpisodeResource
from fleetloop.dashboard.resources.learner import LearnerResource
from fleetloop.dashboard.resources.policies import PolicyResource
from fleetloop.dashboard.resources.robots import RobotResource
from fleetloop.release.registry import PolicyRegistry

GROUP = "dashboard"


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


class Dashboard(EpisodeResource, RobotResource, PolicyResource, LearnerResource, AuditResource):
    """The parts, one per resource (fleetloop/dashboard/resources/), over one state: the index,
    the caches and Redis are shared, so this class holds them, starts and stops the threads, and
    assembles the live snapshot from every part."""

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
