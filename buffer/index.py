"""The frame index: what the learner knows about every ingested frame, without the images.

Per episode it keeps ids, task, robot, policy version, outcome, the intervention mask and the
small per-frame vectors (state, action). Images stay in the object store and are fetched
lazily through PayloadCache, so memory grows with the number of frames, not with pixels.
`add` is idempotent by episode id: the queue delivers at least once, the index counts once.

The online buffer is bounded (BufferLimits: frames, bytes, age; each optional). Eviction policy:
  - only ONLINE episodes are evicted; demonstrations (OFFLINE) are the fixed prior and stay;
  - oldest first by the episode's end time (ended_ns), whole episodes;
  - with hysteresis: once a frame/byte limit is exceeded, evict down to `low_water` (90%) of it,
    so the sampler rebuilds its pools once per ~10% of turnover, not on every add;
  - by age: any online episode that ended more than max_age_s ago, checked on add and enforce().
The store stays the record of truth: an evicted episode is still committed there (and in
exports, the dashboard, and a learner with a bigger buffer). `evicted_before_ns` is the high
watermark of evicted end times: the reconciler (buffer/reconcile.py) does not re-ingest
episodes older than it, since oldest-first eviction would drop them again at once.
"""
from __future__ import annotations

import heapq
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from fleetloop.buffer.codec import LoadedEpisode, decode_image, fetch_images, outcome_name
from fleetloop.buffer.store import ObjectStore
from fleetloop.proto.v1 import episode_pb2 as pb

ONLINE, OFFLINE = "online", "offline"

log = logging.getLogger(__name__)

_ID_TIME = re.compile(r"^(\d{8}T\d{6})-")


def episode_id_time_ns(episode_id: str) -> int | None:
    """The UTC start time a recorder put at the front of an episode id (actor/recorder.py:
    "20260101T120000-robot-..."), in ns; None for ids without one (imports, tests)."""
    m = _ID_TIME.match(episode_id)
    if not m:
        return None
    try:
        return int(time.mktime(time.strptime(m.group(1), "%Y%m%dT%H%M%S")) - time.timezone) * 1_000_000_000
    except (ValueError, OverflowError):
        return None


@dataclass
class BufferLimits:
    """Bounds of the ONLINE buffer (None: unbounded). Configure with `--buffer-frames`,
    `--buffer-mb`, `--buffer-age-s` (learner) or LearnerConfig.buffer."""
    max_frames: int | None = None
    max_bytes: int | None = None
    max_age_s: float | None = None
    low_water: float = 0.9

    def __post_init__(self):
        for name in ("max_frames", "max_bytes", "max_age_s"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive (or None)")
        if not 0.0 < self.low_water <= 1.0:
            raise ValueError("low_water must be in (0, 1]")

    @property
    def bounded(self) -> bool:
        return any(v is not None for v in (self.max_frames, self.max_bytes, self.max_age_s))


def entry_bytes(e: "EpisodeEntry") -> int:
    """What an entry holds in memory, approximately: its arrays, chunk refs, strings."""
    arrays = e.states.nbytes + e.actions.nbytes + e.intervention.nbytes + e.chunk_starts.nbytes
    return int(arrays + 320 * len(e.chunks) + 600)


@dataclass
class EpisodeEntry:
    episode_id: str
    manifest_key: str
    robot_id: str
    task_id: str
    instruction: str
    policy_version: str
    source: str                 # ONLINE (fleet rollouts) or OFFLINE (demonstrations)
    outcome: str                # success | failure | unknown
    outcome_source: str
    incomplete: bool
    states: np.ndarray          # [T, S] float32
    actions: np.ndarray         # [T, A] float32
    intervention: np.ndarray    # [T] bool
    chunks: list                # pb.ChunkRef per chunk (image objects are fetched lazily)
    chunk_starts: np.ndarray    # [num_chunks] first step of each chunk
    ended_ns: int
    indexed_at: float = field(default_factory=time.time)

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def has_intervention(self) -> bool:
        return bool(self.intervention.any())

    def summary(self) -> dict:
        return {"episode_id": self.episode_id, "robot_id": self.robot_id, "task_id": self.task_id,
                "instruction": self.instruction, "policy_version": self.policy_version, "source": self.source,
                "outcome": self.outcome, "outcome_source": self.outcome_source, "incomplete": self.incomplete,
                "num_steps": self.num_steps, "intervention_steps": int(self.intervention.sum()),
                "ended_ns": self.ended_ns, "indexed_at": self.indexed_at}


def entry_from_loaded(ep: LoadedEpisode) -> EpisodeEntry:
    m = ep.manifest
    source = OFFLINE if m.kind == pb.EPISODE_KIND_DEMONSTRATION else ONLINE
    return EpisodeEntry(
        episode_id=m.episode_id, manifest_key=ep.manifest_key, robot_id=m.robot_id, task_id=m.task_id,
        instruction=m.instruction, policy_version=m.policy_version, source=source,
        outcome=outcome_name(m.outcome), outcome_source=pb.LabelSource.Name(m.outcome_source),
        incomplete=m.incomplete, states=ep.states, actions=ep.actions, intervention=ep.intervention,
        chunks=list(m.chunks), chunk_starts=ep.chunk_starts, ended_ns=m.ended_ns)


class FrameIndex:
    """Thread-safe; the data consumer adds, the sampler reads."""

    def __init__(self, limits: BufferLimits | None = None):
        self._lock = threading.RLock()
        self._episodes: dict[str, EpisodeEntry] = {}
        self._by_task_source: dict[tuple[str, str], list[str]] = {}
        self.frames = 0
        self.version = 0  # bumps on every change; samplers cache on it
        self.limits = limits or BufferLimits()
        self.online_frames = 0
        self.online_bytes = 0
        self.bytes = 0
        self._online_heap: list[tuple[int, str]] = []  # (ended_ns, episode_id) of online episodes
        self.evicted = 0
        self.evicted_frames = 0
        self.evicted_before_ns = 0           # newest end time evicted so far
        self.evicted_ids: set[str] = set()   # evicted ids that carry no time (see episode_id_time_ns)
        self.too_old = 0                     # arrived after newer ones were already evicted: not kept
        self.too_old_ids: deque = deque(maxlen=100_000)

    def add(self, entry: EpisodeEntry) -> bool:
        """Index an episode once. Returns False (and changes nothing) for a duplicate, and for
        an online episode older than what the bounded buffer already evicted."""
        with self._lock:
            if entry.episode_id in self._episodes:
                return False
            if entry.source == ONLINE and self.limits.bounded and entry.ended_ns and \
                    entry.ended_ns < self.evicted_before_ns:
                self.too_old += 1   # it would be the next to go: leave it in the store
                self.too_old_ids.append(entry.episode_id)
                return False
            self._episodes[entry.episode_id] = entry
            self._by_task_source.setdefault((entry.task_id, entry.source), []).append(entry.episode_id)
            self.frames += entry.num_steps
            size = entry_bytes(entry)
            self.bytes += size
            if entry.source == ONLINE:
                self.online_frames += entry.num_steps
                self.online_bytes += size
                heapq.heappush(self._online_heap, (int(entry.ended_ns), entry.episode_id))
            self.version += 1
            if self.limits.bounded:
                self._enforce_locked()
            return True

    def enforce(self, now_ns: int | None = None) -> int:
        """Apply the limits now (age limits move with the clock). Returns episodes evicted."""
        with self._lock:
            return self._enforce_locked(now_ns)

    def _enforce_locked(self, now_ns: int | None = None) -> int:
        lim = self.limits
        over_frames = lim.max_frames is not None and self.online_frames > lim.max_frames
        over_bytes = lim.max_bytes is not None and self.online_bytes > lim.max_bytes
        cutoff = (now_ns or time.time_ns()) - int(lim.max_age_s * 1e9) if lim.max_age_s else None
        too_old = cutoff is not None and self._online_heap and self._online_heap[0][0] < cutoff
        if not (over_frames or over_bytes or too_old):
            return 0
        frames_goal = int(lim.max_frames * lim.low_water) if over_frames else None
        bytes_goal = int(lim.max_bytes * lim.low_water) if over_bytes else None
        gone: list[EpisodeEntry] = []
        while self._online_heap:
            ended, eid = self._online_heap[0]
            need = ((frames_goal is not None and self.online_frames > frames_goal)
                    or (bytes_goal is not None and self.online_bytes > bytes_goal)
                    or (cutoff is not None and ended < cutoff))
            if not need:
                break
            heapq.heappop(self._online_heap)
            e = self._episodes.pop(eid, None)
            if e is None:
                continue
            gone.append(e)
            size = entry_bytes(e)
            self.frames -= e.num_steps
            self.online_frames -= e.num_steps
            self.bytes -= size
            self.online_bytes -= size
            self.evicted_before_ns = max(self.evicted_before_ns, ended)
            if episode_id_time_ns(eid) is None:
                self.evicted_ids.add(eid)
        if gone:
            ids = {e.episode_id for e in gone}
            for key in {(e.task_id, e.source) for e in gone}:
                kept = [i for i in self._by_task_source[key] if i not in ids]
                if kept:
                    self._by_task_source[key] = kept
                else:
                    del self._by_task_source[key]
            self.evicted += len(gone)
            self.evicted_frames += sum(e.num_steps for e in gone)
            self.version += 1
            log.info("online buffer: evicted %d oldest episodes (%d frames); %d online frames, %.1f MB kept",
                     len(gone), sum(e.num_steps for e in gone), self.online_frames, self.online_bytes / 1e6)
        return len(gone)

    def wanted(self, episode_id: str, ended_ns: int | None = None) -> bool:
        """Would add() keep this episode? False if indexed, or evicted (or older than what was)."""
        if episode_id in self._episodes or episode_id in self.evicted_ids:
            return False
        if self.limits.bounded and self.evicted_before_ns:
            if ended_ns:
                return ended_ns >= self.evicted_before_ns
            started = episode_id_time_ns(episode_id)  # an id's time is the episode's START:
            if started is not None and started < self.evicted_before_ns - 3600 * 10**9:
                return False                           # allow an hour for it to have ended
        return True

    def __contains__(self, episode_id: str) -> bool:
        return episode_id in self._episodes

    def __len__(self) -> int:
        return len(self._episodes)

    def get(self, episode_id: str) -> EpisodeEntry:
        return self._episodes[episode_id]

    def episodes(self, task_id: str | None = None, source: str | None = None) -> list[EpisodeEntry]:
        with self._lock:
            if task_id is not None and source is not None:
                return [self._episodes[e] for e in self._by_task_source.get((task_id, source), [])]
            return [e for e in self._episodes.values()
                    if (task_id is None or e.task_id == task_id) and (source is None or e.source == source)]

    def tasks(self) -> list[str]:
        with self._lock:
            return sorted({t for (t, _s) in self._by_task_source})

    def relabel(self, episode_id: str, outcome: str, source: str = "LABEL_SOURCE_OPERATOR") -> EpisodeEntry:
        if outcome not in ("success", "failure", "unknown"):
            raise ValueError(f"outcome must be success, failure or unknown, not {outcome!r}")
        with self._lock:
            entry = self._episodes[episode_id]
            entry.outcome, entry.outcome_source = outcome, source
            self.version += 1
            return entry

    def stats(self) -> dict:
        with self._lock:
            out: dict = {"episodes": len(self._episodes), "frames": self.frames, "tasks": {},
                         "online_frames": self.online_frames, "bytes": self.bytes,
                         "online_bytes": self.online_bytes, "evicted": self.evicted,
                         "evicted_frames": self.evicted_frames, "too_old": self.too_old,
                         "limits": {"max_frames": self.limits.max_frames, "max_bytes": self.limits.max_bytes,
                                    "max_age_s": self.limits.max_age_s}}
            for (task, source), ids in self._by_task_source.items():
                t = out["tasks"].setdefault(task, {})
                t[source] = {"episodes": len(ids), "frames": sum(self._episodes[i].num_steps for i in ids)}
            return out


class PayloadCache:
    """Lazily fetched camera images, bounded by encoded size (LRU). Each image chunk is verified
    against its manifest digest on first read; a mismatch raises EpisodeRejected, so the
    caller can quarantine that episode."""

    def __init__(self, store: ObjectStore, max_bytes: int = 256 * 1024 * 1024):
        self.store, self.max_bytes = store, max_bytes
        self._lock = threading.Lock()
        self._chunks: OrderedDict[str, tuple[pb.ImageChunk, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def image_chunk(self, ref: pb.ChunkRef) -> pb.ImageChunk:
        key = ref.key
        with self._lock:
            hit = self._chunks.get(key)
            if hit is not None:
                self._chunks.move_to_end(key)
                self.hits += 1
                return hit[0]
        chunk = fetch_images(self.store, ref)  # outside the lock: concurrent fetches
        with self._lock:
            self.misses += 1
            if key not in self._chunks:
                self._chunks[key] = (chunk, ref.images_bytes)
                self.bytes += ref.images_bytes
            while self.bytes > self.max_bytes and len(self._chunks) > 1:
                _k, (_c, size) = self._chunks.popitem(last=False)
                self.bytes -= size
        return chunk

    def images(self, entry: EpisodeEntry, t: int) -> dict[str, np.ndarray]:
        i = int(np.searchsorted(entry.chunk_starts, t, side="right") - 1)
        ref = entry.chunks[i]
        if not ref.images_bytes:
            return {}
        holder = self.image_chunk(ref).steps[t - int(entry.chunk_starts[i])]
        return {img.camera: decode_image(img) for img in holder.images}
