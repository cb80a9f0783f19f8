"""/metrics exports the reconcilers' counts: the dashboard's own (an old store behind an empty
Redis: every episode is found by the reconciler) and the learner's, read from its stats hash."""
from __future__ import annotations

import json
import re
import time

import numpy as np

from fleetloop import config
from fleetloop.buffer.codec import commit_episode, encode_chunk
from fleetloop.buffer.store import LocalStore
from fleetloop.dashboard.metrics import render
from fleetloop.proto.v1 import episode_pb2 as pb


def commit(store, eid: str) -> str:
    st = np.random.default_rng(len(eid)).standard_normal((10, 6)).astype(np.float32)
    msgs = [pb.Step(index=t, state=st[t], action=np.tanh(st[t, :3])) for t in range(10)]
    m = pb.EpisodeManifest(episode_id=eid, robot_id="r0", task_id="t", instruction="do t",
                           kind=pb.EPISODE_KIND_ROLLOUT, outcome=pb.OUTCOME_SUCCESS, num_steps=10, action_dim=3,
                           state_dim=6, policy_version="v000001", ended_ns=time.time_ns())
    return commit_episode(store, m, [(encode_chunk(eid, 0, msgs), 10)])


def series(text: str, name: str) -> dict[str, float]:
    return {labels: float(v) for labels, v in re.findall(rf'^{name}\{{index="(\w+)"\}} (\S+)$', text, re.M)}


def test_metrics_export_the_reconcilers_counts(tmp_path, redis_client):
    from fleetloop.dashboard.service import Dashboard
    store = LocalStore(tmp_path / "store")
    for k in range(5):
        commit(store, f"old{k}")
    assert "fleetloop_reconcile_" not in render(Dashboard(redis_client, store))  # no reconciler yet: nothing
    redis_client.hset(config.LEARNER_STATS_KEY, mapping={
        "status": json.dumps("training"), "step": json.dumps(10), "updated_ns": json.dumps(time.time_ns()),
        "reconcile": json.dumps({"scans": 3, "found_total": 7, "last_found": 2, "last_listed": 40,
                                 "last_scan_s": 0.25, "last_scan_ns": time.time_ns(), "last_trigger": "start",
                                 "rejected_total": 1, "errors": 0})})
    dash = Dashboard(redis_client, store).start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and dash.reconciler.stats()["rebuilt_total"] < 5:
            time.sleep(0.05)
        text = render(dash)
    finally:
        dash.stop()
    assert re.search(r"^# TYPE fleetloop_reconcile_found(_total)? counter$", text, re.M)
    # the dashboard's start scan rebuilt its view: counted apart, so a restart does not fire the alert
    assert series(text, "fleetloop_reconcile_found_total") == {"dashboard": 0.0, "learner": 7.0}
    assert series(text, "fleetloop_reconcile_rebuilt_total") == {"dashboard": 5.0}
    assert series(text, "fleetloop_reconcile_scans_total")["dashboard"] >= 1
    assert series(text, "fleetloop_reconcile_rejected_total") == {"dashboard": 0.0, "learner": 1.0}
    assert series(text, "fleetloop_reconcile_last_listed") == {"dashboard": 5.0, "learner": 40.0}
    assert set(series(text, "fleetloop_reconcile_last_scan_timestamp_seconds")) == {"dashboard", "learner"}
