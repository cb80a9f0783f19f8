"""The rollout gate's evidence and its test (the gate itself: fleetloop/release/rollout.py).

  EvidenceBook      per (version, task): autonomous success, interventions, episode length, from
                    the episodes the fleet records; operator labels override the robot's outcome
  EvidenceFollower  feeds the book from Redis: the episode stream (the manifest copy each event
                    carries; a plain XREAD cursor, no consumer group: it takes nothing from the
                    learner or the dashboard) and the label stream
  sprt()            the test: Wald's sequential probability ratio test on autonomous success,
                    per task against the fleet version's rate, log-likelihood ratios summed
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import redis

from fleetloop import config
from fleetloop.release.registry import _s, _seq

if TYPE_CHECKING:
    from fleetloop.release.rollout import RolloutSettings

log = logging.getLogger(__name__)


# ---- evidence -------------------------------------------------------------------------------

@dataclass
class EpisodeRecord:
    episode_id: str
    version: str
    task_id: str
    robot_id: str
    outcome: str            # success | failure | unknown: the robot's, or an operator's label
    intervened: bool        # a human drove at least one step
    steps: int
    ended_ns: int
    labelled_by: str = ""
    announced_ns: int = 0   # when the episode stream got it (Redis server clock; 0: not known)

    @property
    def autonomous(self) -> Optional[bool]:
        """Success without any human-driven step; None when the outcome is unknown."""
        if self.outcome == "unknown":
            return None
        return self.outcome == "success" and not self.intervened


@dataclass
class Tally:
    episodes: int = 0
    known: int = 0          # episodes with a known outcome
    autonomous: int = 0     # successes without intervention
    intervened: int = 0
    steps: int = 0

    def add(self, r: EpisodeRecord) -> None:
        self.episodes += 1
        a = r.autonomous
        if a is not None:
            self.known += 1
            self.autonomous += a
        self.intervened += r.intervened
        self.steps += r.steps

    def as_dict(self) -> dict:
        from fleetloop.stats import wilson_interval
        lo, hi = wilson_interval(self.autonomous, self.known)
        return {"episodes": self.episodes, "known": self.known, "autonomous_success": self.autonomous,
                "autonomous_success_rate": round(self.autonomous / self.known, 4) if self.known else None,
                "autonomous_success_ci95": [round(lo, 4), round(hi, 4)],
                "intervention_rate": round(self.intervened / self.episodes, 4) if self.episodes else None,
                "mean_steps": round(self.steps / self.episodes, 2) if self.episodes else None}


class EvidenceBook:
    """Thread-safe per-(version, task) evidence, deduplicated by episode id. Labels may arrive
    before or after their episode; the newest label wins."""

    def __init__(self, max_per_version_task: int = 5000):
        self._lock = threading.Lock()
        self._episodes: dict[str, EpisodeRecord] = {}
        self._by_vt: dict[tuple[str, str], deque] = {}
        self._labels: dict[str, tuple[int, str, str]] = {}  # episode_id -> (labelled_ns, outcome, by)
        self.max_per_vt = max_per_version_task
        self.changes = 0

    def add(self, r: EpisodeRecord) -> bool:
        with self._lock:
            if r.episode_id in self._episodes:
                return False
            label = self._labels.get(r.episode_id)
            if label:
                r.outcome, r.labelled_by = label[1], label[2]
            q = self._by_vt.setdefault((r.version, r.task_id), deque())
            q.append(r.episode_id)
            self._episodes[r.episode_id] = r
            while len(q) > self.max_per_vt:
                self._episodes.pop(q.popleft(), None)
            self.changes += 1
            return True

    def label(self, episode_id: str, outcome: str, by: str = "", labelled_ns: int = 0) -> None:
        if outcome not in ("success", "failure", "unknown"):
            return
        with self._lock:
            old = self._labels.get(episode_id)
            if old and old[0] > labelled_ns:
                return
            self._labels[episode_id] = (labelled_ns, outcome, by)
            r = self._episodes.get(episode_id)
            if r is not None:
                r.outcome, r.labelled_by = outcome, by
                self.changes += 1

    def records(self, version: str, task_id: Optional[str] = None, newest: Optional[int] = None,
                since_ns: int = 0) -> list[EpisodeRecord]:
        with self._lock:
            keys = [(v, t) for (v, t) in self._by_vt if v == version and (task_id is None or t == task_id)]
            out = []
            for k in keys:
                ids = list(self._by_vt[k])
                if newest is not None:
                    ids = ids[-newest:]
                out.extend(self._episodes[i] for i in ids if i in self._episodes
                           and (self._episodes[i].announced_ns or self._episodes[i].ended_ns) >= since_ns)
            return out

    def tally(self, version: str, task_id: Optional[str] = None, newest: Optional[int] = None,
              since_ns: int = 0) -> Tally:
        t = Tally()
        for r in self.records(version, task_id, newest, since_ns):
            t.add(r)
        return t

    def tasks(self, version: str) -> list[str]:
        with self._lock:
            return sorted({t for (v, t) in self._by_vt if v == version})

    def versions(self) -> list[str]:
        with self._lock:
            return sorted({v for (v, _t) in self._by_vt}, key=_seq)

    def __len__(self) -> int:
        return len(self._episodes)


def record_from_manifest(m) -> Optional[EpisodeRecord]:
    """An EpisodeManifest (fleetloop.v1) -> the gate's record; None for demonstrations and
    episodes without a policy version (they say nothing about a version)."""
    from fleetloop.proto.v1 import episode_pb2 as pb
    if m.kind == pb.EPISODE_KIND_DEMONSTRATION or not m.policy_version:
        return None
    outcome = {pb.OUTCOME_SUCCESS: "success", pb.OUTCOME_FAILURE: "failure"}.get(m.outcome, "unknown")
    if m.incomplete and m.outcome_source != pb.LABEL_SOURCE_OPERATOR:
        outcome = "unknown"  # cut short by a disconnect: no evidence either way
    labelled_by = m.outcome_labelled_by if m.outcome_source == pb.LABEL_SOURCE_OPERATOR else ""
    return EpisodeRecord(m.episode_id, m.policy_version, m.task_id, m.robot_id, outcome,
                         intervened=any(s.end_step > s.start_step for s in m.interventions),
                         steps=int(m.num_steps), ended_ns=int(m.ended_ns), labelled_by=labelled_by)


class EvidenceFollower:
    """Feeds an EvidenceBook from Redis: the episode stream (each event carries a copy of the
    committed manifest; when it does not, the manifest is read from the store) and the label
    stream. A plain XREAD cursor: no consumer group, so it takes no event from anyone and a
    restart simply re-reads the last `lookback_s` of the stream (ids are millisecond times)."""

    def __init__(self, client: redis.Redis, book: EvidenceBook, store=None, lookback_s: float = 6 * 3600.0):
        self.redis, self.book, self.store = client, book, store
        start_ms = max(0, int(time.time() * 1000 - lookback_s * 1000))
        self._cursors = {config.EPISODE_STREAM: f"{start_ms}-0", config.LABEL_STREAM: "0-0"}
        self.read = self.skipped = 0

    def poll(self, block_ms: int = 200, count: int = 1000) -> int:
        res = self.redis.xread(dict(self._cursors), count=count, block=block_ms or None)
        n = 0
        for stream, messages in res or []:
            stream = _s(stream)
            for msg_id, f in messages:
                self._cursors[stream] = _s(msg_id)
                f = {_s(k): _s(v) for k, v in (f or {}).items()}
                if stream == config.LABEL_STREAM:
                    self.book.label(f.get("episode_id", ""), f.get("outcome", ""), f.get("by", ""),
                                    int(f.get("labelled_ns") or 0))
                else:
                    self._episode(f, announced_ns=int(_s(msg_id).split("-")[0]) * 1_000_000)
                n += 1
        return n

    def drain(self) -> int:
        """Read everything there is now (no blocking)."""
        total = 0
        while True:
            n = self.poll(block_ms=0)
            total += n
            if n == 0:
                return total

    def _episode(self, f: dict, announced_ns: int = 0) -> None:
        from google.protobuf import json_format

        from fleetloop.buffer.codec import read_manifest
        from fleetloop.proto.v1 import episode_pb2 as pb
        try:
            if f.get("manifest_json"):
                # Only the fields the gate needs are read; verifying chunks is the consumer's job.
                m = json_format.Parse(f["manifest_json"], pb.EpisodeManifest(), ignore_unknown_fields=True)
                if not m.episode_id:
                    raise ValueError("manifest without an episode id")
            elif self.store is not None and f.get("manifest_key"):
                m = read_manifest(self.store, f["manifest_key"])
            else:
                self.skipped += 1
                return
        except Exception as e:  # a bad event is the consumer's to dead-letter; here it is no evidence
            self.skipped += 1
            log.warning("rollout: episode event %s unreadable (%s); not counted", f.get("episode_id"), e)
            return
        r = record_from_manifest(m)
        if r is not None:
            r.announced_ns = announced_ns
            self.read += self.book.add(r)


# ---- the test -------------------------------------------------------------------------------

def reference_rate(t: Tally) -> float:
    """The fleet version's autonomous success on a task, smoothed (Laplace) so 0/n and n/n still
    give a usable hypothesis."""
    return (t.autonomous + 1) / (t.known + 2)


def hypotheses(p_ref: float, margin: float) -> tuple[float, float]:
    """(p0, p1): H1 'not worse' = the reference rate, H0 'worse' = margin below it."""
    p1 = min(max(p_ref, 0.02), 0.98)
    p0 = max(p1 - margin, 0.01)
    return p0, p1


def sprt(candidate: dict[str, Tally], refs: dict[str, float], s: RolloutSettings) -> dict:
    """Wald's SPRT on autonomous success, summed over tasks with a frozen reference rate.
    Returns {llr, n, decision: promote|refuse|continue, per_task}."""
    llr, n, per_task = 0.0, 0, {}
    for task, t in sorted(candidate.items()):
        if task not in refs:
            per_task[task] = {**t.as_dict(), "reference": None, "llr": None}
            continue
        p0, p1 = hypotheses(refs[task], s.margin)
        k, f = t.autonomous, t.known - t.autonomous
        part = k * math.log(p1 / p0) + f * math.log((1 - p1) / (1 - p0))
        llr += part
        n += t.known
        per_task[task] = {**t.as_dict(), "reference": round(refs[task], 4), "h0": round(p0, 4), "h1": round(p1, 4),
                          "llr": round(part, 4)}
    # A task on which the candidate alone is already shown worse refuses it, however well it does
    # elsewhere (summing could otherwise trade one task away for another). This only adds
    # refusals: P(promote a worse version) stays <= alpha; P(refuse a good one) grows to at most
    # about beta per task.
    worse_tasks = sorted(t for t, d in per_task.items()
                         if d.get("llr") is not None and d["known"] >= s.min_episodes and d["llr"] <= s.lower)
    decision = "continue"
    if n >= s.min_episodes:
        if llr <= s.lower or worse_tasks:
            decision = "refuse"
        elif llr >= s.upper:
            decision = "promote"
    return {"llr": round(llr, 4), "n": n, "decision": decision, "worse_tasks": worse_tasks, "per_task": per_task}
