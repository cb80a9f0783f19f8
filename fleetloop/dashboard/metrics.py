"""Prometheus metrics: a few dozen series computed at scrape time from the same reads the dashboard
already makes (no second registry of state), written out by prometheus_client.

  ingest      fleetloop_ingest_episodes_per_second, fleetloop_ingest_frames_per_second,
              fleetloop_episode_stream_length, fleetloop_dead_letter_length
  queue       fleetloop_queue_lag_messages{group}, fleetloop_queue_pending_messages{group}
  learner     fleetloop_learner_step, fleetloop_learner_step_rate, fleetloop_learner_samples_per_second,
              fleetloop_learner_stat{key} (every numeric value the learner reports, flattened)
  weights     fleetloop_weight_swap_seconds{robot_id,phase,stat}  (from the robots' heartbeats)
  success     fleetloop_task_episodes_total{task_id,outcome}, fleetloop_task_success_rate{task_id}
              (+ _lower/_upper: Wilson 95%), fleetloop_task_intervention_rate{task_id},
              fleetloop_policy_success_rate{version}
  robots      fleetloop_robots{state}, fleetloop_robot_online{robot_id}, fleetloop_robot_spool_episodes{robot_id}
  reconcile   fleetloop_reconcile_scans_total{index}, fleetloop_reconcile_found_total{index} (committed
              episodes the index lacked after start: alert when it grows), fleetloop_reconcile_rebuilt_total{index}
              (ingested by the scan at start: the view rebuilt), fleetloop_reconcile_rejected_total{index},
              fleetloop_reconcile_errors_total{index}, fleetloop_reconcile_last_found{index},
              fleetloop_reconcile_last_listed{index}, fleetloop_reconcile_last_scan_seconds{index},
              fleetloop_reconcile_last_scan_timestamp_seconds{index}; index="dashboard" (this process's
              reconciler) and index="learner" (from the learner's stats hash, while it reports one)
"""
from __future__ import annotations

import math
import time
from typing import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

# The classic text format, which every Prometheus version scrapes (all our names are ASCII).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _value(v) -> float:
    if v is None:
        return math.nan
    return float(v)  # bools become 0/1


class Exposition:
    """The series of one scrape, as prometheus_client metric families (a one-shot collector)."""

    def __init__(self):
        self._families: dict[str, Metric] = {}

    def metric(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict, object]]) -> None:
        family = self._families.get(name)
        if family is None:
            # a counter's family is named without _total; its samples keep the full name
            base = name[:-len("_total")] if kind == "counter" and name.endswith("_total") else name
            family = self._families[name] = Metric(base, help_text, kind)
        for labels, value in samples:
            family.add_sample(name, {k: str(v) for k, v in labels.items()}, _value(value))

    def collect(self):
        return list(self._families.values())

    def text(self) -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry).decode()


def _numeric_leaves(value, prefix: str = ""):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k))


def render(dash) -> str:
    out = Exposition()
    ingest = dash.ingest()
    queue = dash.queue()
    learner = dash.learner()
    robots = dash.robots()

    out.metric("fleetloop_ingest_episodes_per_second", "gauge",
               "Episodes that ended in the last minute and reached the index, per second.",
               [({}, ingest["episodes_per_s"])])
    out.metric("fleetloop_ingest_frames_per_second", "gauge",
               "Frames (steps) of those episodes, per second.", [({}, ingest["frames_per_s"])])
    out.metric("fleetloop_dashboard_indexed_episodes", "gauge",
               "Episodes in the dashboard's index.", [({}, ingest["indexed_total"])])
    out.metric("fleetloop_episode_stream_length", "gauge", "Events on the episode stream.",
               [({}, queue["stream_length"])])
    out.metric("fleetloop_dead_letter_length", "gauge", "Episodes parked on the dead-letter stream.",
               [({}, queue["dead_letters"])])
    out.metric("fleetloop_queue_lag_messages", "gauge",
               "Episode events not yet delivered to the consumer group (XINFO GROUPS lag).",
               [({"group": g["group"]}, g["lag"]) for g in queue["groups"]])
    out.metric("fleetloop_queue_pending_messages", "gauge",
               "Episode events delivered to the group but not acked yet (XINFO GROUPS pending).",
               [({"group": g["group"]}, g["pending"]) for g in queue["groups"]])

    out.metric("fleetloop_learner_up", "gauge", "1 when the learner's stats are fresh (updated in the last 30 s).",
               [({}, learner["fresh"])])
    if learner["age_s"] is not None:
        out.metric("fleetloop_learner_stats_age_seconds", "gauge", "Age of the learner's last stats write.",
                   [({}, learner["age_s"])])
    if learner["step"] is not None:
        out.metric("fleetloop_learner_step", "gauge", "The learner's optimisation step.", [({}, learner["step"])])
    if learner["step_rate"] is not None:
        out.metric("fleetloop_learner_step_rate", "gauge",
                   "Learner steps per second (the learner's figure, else measured by the dashboard).",
                   [({}, learner["step_rate"])])
    if learner["samples_per_s"] is not None:
        out.metric("fleetloop_learner_samples_per_second", "gauge", "Training samples per second (learner's figure).",
                   [({}, learner["samples_per_s"])])
    leaves = [({"key": k}, v) for k, v in _numeric_leaves(learner["stats"])]
    if leaves:
        out.metric("fleetloop_learner_stat", "gauge",
                   "Every numeric value in the learner's stats hash (losses, buffer sizes, staleness, w_on, ...).",
                   leaves)

    swaps = []  # the robot summaries leave swap stats out; they are in the heartbeats
    for rid, hb in dash.heartbeats().items():
        swap = (hb or {}).get("swap") or {}
        for phase in ("publish_to_loaded_s", "loaded_to_swapped_s"):
            summary = swap.get(phase) or {}
            for stat in ("last", "p50", "max"):
                if isinstance(summary.get(stat), (int, float)):
                    swaps.append(({"robot_id": rid, "phase": phase[:-2], "stat": stat}, summary[stat]))
    out.metric("fleetloop_weight_swap_seconds", "gauge",
               "Weight-swap latency per robot: publish->loaded (download, verify, build) and loaded->swapped "
               "(waiting for the episode boundary).", swaps)

    tasks = dash.tasks()
    out.metric("fleetloop_task_episodes_total", "counter", "Policy rollouts indexed, per task and outcome.",
               [({"task_id": t["task_id"], "outcome": o}, n) for t in tasks for o, n in
                (("success", t["success"]["k"]), ("failure", t["success"]["n"] - t["success"]["k"]),
                 ("unknown", t["episodes"] - t["success"]["n"]))])
    for suffix, key, text in (("", "rate", "Success rate per task (labelled rollouts)."),
                              ("_lower", "lo", "Lower end of the success rate's Wilson 95% interval."),
                              ("_upper", "hi", "Upper end of the success rate's Wilson 95% interval.")):
        out.metric(f"fleetloop_task_success_rate{suffix}", "gauge", text,
                   [({"task_id": t["task_id"]}, t["success"][key]) for t in tasks if t["success"]["n"]])
    out.metric("fleetloop_task_intervention_rate", "gauge", "Share of rollouts with a human intervention, per task.",
               [({"task_id": t["task_id"]}, t["intervention"]["rate"]) for t in tasks if t["episodes"]])
    agg = dash.aggregates()
    out.metric("fleetloop_policy_success_rate", "gauge", "On-robot success rate per policy version.",
               [({"version": v}, t.as_dict()["success"]["rate"]) for v, t in sorted(agg.by_version.items())
                if v and t.successes + t.failures])

    online = sum(r["online"] for r in robots)
    out.metric("fleetloop_robots", "gauge", "Robots by heartbeat state.",
               [({"state": "online"}, online), ({"state": "offline"}, len(robots) - online)])
    out.metric("fleetloop_robot_online", "gauge", "1 when the robot's heartbeat is fresh.",
               [({"robot_id": r["robot_id"]}, r["online"]) for r in robots])
    out.metric("fleetloop_robot_spool_episodes", "gauge", "Episodes waiting in the robot's spool for upload.",
               [({"robot_id": r["robot_id"]}, r["spool"]["episodes"]) for r in robots])
    out.metric("fleetloop_robot_spool_bytes", "gauge", "Bytes waiting in the robot's spool.",
               [({"robot_id": r["robot_id"]}, r["spool"]["bytes"]) for r in robots])
    out.metric("fleetloop_robot_spool_damaged_episodes", "gauge",
               "Sealed episodes the robot's uploader set aside as unreadable (kept on its disk).",
               [({"robot_id": r["robot_id"]}, r["spool"]["damaged_episodes"]) for r in robots])
    out.metric("fleetloop_robot_takeover_requested", "gauge", "1 while an operator takeover is requested.",
               [({"robot_id": r["robot_id"]}, r["takeover_requested"]) for r in robots])
    _reconcile(out, dash, learner)
    out.metric("fleetloop_scrape_timestamp_seconds", "gauge", "When this page was rendered.", [({}, time.time())])
    return out.text()


_RECONCILE = (  # (metric, kind, stats key, help)
    ("fleetloop_reconcile_scans_total", "counter", "scans",
     "Store-vs-index scans by the reconciler (buffer/reconcile.py), per index."),
    ("fleetloop_reconcile_found_total", "counter", "found_total",
     "Committed episodes the index lacked and the reconciler ingested (events lost, Redis reset): alert on increase."),
    ("fleetloop_reconcile_rebuilt_total", "counter", "rebuilt_total",
     "Committed episodes the reconciler's scan at start ingested (the view rebuilt: not a fault)."),
    ("fleetloop_reconcile_rejected_total", "counter", "rejected_total",
     "Episodes the reconciler found but refused (failed verification or limits)."),
    ("fleetloop_reconcile_errors_total", "counter", "errors", "Reconciler scans that failed (store or Redis errors)."),
    ("fleetloop_reconcile_last_found", "gauge", "last_found", "Episodes the last scan found missing."),
    ("fleetloop_reconcile_last_listed", "gauge", "last_listed", "Manifests the last scan listed in the store."),
    ("fleetloop_reconcile_last_scan_seconds", "gauge", "last_scan_s", "Duration of the last scan."),
)


def _reconcile(out: Exposition, dash, learner: dict) -> None:
    """The reconcilers' counts: the dashboard's own, and the learner's from its stats hash."""
    sources = []
    rec = getattr(dash, "reconciler", None)
    if rec is not None:
        try:
            sources.append(("dashboard", rec.stats()))
        except Exception:  # noqa: BLE001 -- a scrape never fails on one section
            pass
    learner_rec = (learner.get("stats") or {}).get("reconcile")
    if isinstance(learner_rec, dict):
        sources.append(("learner", learner_rec))
    if not sources:
        return
    for name, kind, key, help_text in _RECONCILE:
        out.metric(name, kind, help_text, [({"index": idx}, s[key]) for idx, s in sources
                                           if isinstance(s.get(key), (int, float)) and not isinstance(s.get(key), bool)])
    out.metric("fleetloop_reconcile_last_scan_timestamp_seconds", "gauge", "When the last scan ended (Unix time).",
               [({"index": idx}, s["last_scan_ns"] / 1e9) for idx, s in sources
                if isinstance(s.get("last_scan_ns"), (int, float)) and s.get("last_scan_ns")])
