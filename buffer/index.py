"""The frame index: what the learner knows about every ingested frame, without the images.

Per episode it keeps ids, task, robot, policy version, outcome, the intervention mask and the
small per-frame vectors (state, action). Images stay in the object store and are fetched
lazily through PayloadCache, so memory grows with the number of frames, not with pixels.
`add` is idempotent by episode id: the queue delivers at least once, the index counts once.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from fleetloop.buffer.codec import LoadedEpisode, decode_image, fetch_images, outcome_name
from fleetloop.buffer.store import ObjectStore
from fleetloop.proto.v1 import episode_pb2 as pb

ONLINE, OFFLINE = "online", "offline"


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

    def __init__(self):
        self._lock = threading.RLock()
        self._episodes: dict[str, EpisodeEntry] = {}
        self._by_task_source: dict[tuple[str, str], list[str]] = {}
        self.frames = 0
        self.version = 0  # bumps on every change; samplers cache on it

    def add(self, entry: EpisodeEntry) -> bool:
        """Index an episode once. Returns False (and changes nothing) for a duplicate."""
        with self._lock:
            if entry.episode_id in self._episodes:
                return False
            self._episodes[entry.episode_id] = entry
            self._by_task_source.setdefault((entry.task_id, entry.source), []).append(entry.episode_id)
            self.frames += entry.num_steps
            self.version += 1
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
            out: dict = {"episodes": len(self._episodes), "frames": self.frames, "tasks": {}}
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
