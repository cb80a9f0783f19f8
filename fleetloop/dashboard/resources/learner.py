"""The learner, the episode stream's queue and the ingest rate (the API's /api/learner).

LearnerResource is one part of fleetloop.dashboard.service.Dashboard, which holds the state it
uses (redis, index, consumer, the step samples) and gives it aggregates() (EpisodeResource)."""
from __future__ import annotations

import json
import time

import redis

from fleetloop import config
from fleetloop.dashboard.resources.common import _num, _s

LEARNER_STALE_S = 30.0  # learner stats older than this: the learner is not running


class LearnerResource:
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
