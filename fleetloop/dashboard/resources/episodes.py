"""Episodes, labels, tasks and time series: the dashboard's frame index and what is derived from it.

EpisodeResource is one part of fleetloop.dashboard.service.Dashboard, which holds the state it
uses (index, payloads, labels, the aggregate and cache locks, the stop event)."""
from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import redis

from fleetloop import config
from fleetloop.buffer.codec import EpisodeRejected, check_id, read_manifest
from fleetloop.buffer.index import ONLINE, EpisodeEntry
from fleetloop.dashboard.resources.common import BadRequest, CannotApply, NotFound, _s
from fleetloop.stats import wilson_interval

log = logging.getLogger(__name__)

OUTCOMES = ("success", "failure", "unknown")
LABEL_MAXLEN = 1_000_000


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



class EpisodeResource:
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
