"""The rollout gate on the dashboard (docs/rollout.md): what the gate is testing, its evidence,
every decision and why; a manual promote / reject and the on/off switch (operator writes,
audited by the API's middleware like every write); Prometheus series at /metrics/rollout.

The gate itself runs in the learner's process (fleetloop.release.rollout.GateService); this
router reads and changes the same Redis state through RolloutGate, under the gate's lock.
"""
from __future__ import annotations

import time
from typing import Optional

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPBearer
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from fleetloop.dashboard import metrics
from fleetloop.dashboard.api import READ_ERRORS, WRITE_ERRORS, Strict, errors, json_errors
from fleetloop.dashboard.auth import Identity
from fleetloop.dashboard.middleware import audit_note, identity
from fleetloop.dashboard.resources.common import CannotApply
from fleetloop.release.rollout import GateBusy, RolloutGate, RolloutSettings

DECISIONS = ("canary", "promote", "refuse", "expire", "abandon", "observe", "enable", "disable",
             "confirm", "settle", "rollback")


class RolloutDecisionBody(Strict):
    version: str = Field(min_length=1, max_length=64, description="policy version, e.g. v000012")
    reason: str = Field("", max_length=200, description="why (kept with the decision and in the audit log)")


class RolloutEnabledBody(Strict):
    enabled: bool = Field(description="true: gate new versions on canary evidence; false: every publish "
                                      "goes to every robot (the fleet is unpinned)")


def render_metrics(gate: RolloutGate) -> str:
    st = gate.status(decisions=0)
    out = metrics.Exposition()
    out.metric("fleetloop_rollout_enabled", "gauge", "1 when the rollout gate is switched on.",
               [({}, st["enabled"])])
    out.metric("fleetloop_rollout_gate_running", "gauge", "1 when a gate process stepped in the last 10 s.",
               [({}, st["gate_running"])])
    counts = {}
    for key, n in st["counters"].items():
        decision, _, by = key.partition("|")
        counts[(decision, by)] = n
    out.metric("fleetloop_rollout_decisions_total", "counter",
               "Gate decisions by kind (canary, promote, refuse, expire, abandon, ...) and by whom (gate | operator).",
               [({"decision": d, "by": b}, n) for (d, b), n in sorted(counts.items())])
    ev = st.get("evidence") or {}
    test = ev.get("test") or {}
    cand = st["candidate"]
    out.metric("fleetloop_rollout_candidate", "gauge", "1 for the version on the canaries under test.",
               [({"version": cand}, 1)] if cand else [])
    out.metric("fleetloop_rollout_candidate_episodes", "gauge",
               "Candidate episodes counted by the test (known outcome, task with a reference).",
               [({"version": cand}, test.get("n", 0))] if cand else [])
    out.metric("fleetloop_rollout_candidate_llr", "gauge",
               "The SPRT log-likelihood ratio (promote at/above promote_at, refuse at/below refuse_at).",
               [({"version": cand}, test.get("llr"))] if cand and test else [])
    out.metric("fleetloop_rollout_candidate_age_seconds", "gauge", "Seconds the candidate has been on the canaries.",
               [({"version": cand}, round((time.time_ns() - st["candidate_since_ns"]) / 1e9, 3))]
               if cand and st["candidate_since_ns"] else [])
    watched, wtest = st["watch"], (ev.get("watch") or {}).get("test") or {}
    out.metric("fleetloop_rollout_watch", "gauge",
               "1 for the fleet version under watch after its promotion (rolled back if shown worse).",
               [({"version": watched, "replaced": st["watch_replaced"] or ""}, 1)] if watched else [])
    out.metric("fleetloop_rollout_watch_episodes", "gauge", "Fleet episodes since the promotion counted by the watch.",
               [({"version": watched}, wtest.get("n", 0))] if watched else [])
    out.metric("fleetloop_rollout_watch_llr", "gauge", "The watch's SPRT log-likelihood ratio (rollback at/below refuse_at).",
               [({"version": watched}, wtest.get("llr"))] if watched and wtest else [])
    s = st["settings"]
    out.metric("fleetloop_rollout_threshold", "gauge", "The test's thresholds (log-LR) and settings.",
               [({"name": k}, s.get(k)) for k in ("promote_at_llr", "refuse_at_llr", "margin", "alpha", "beta",
                                                 "min_episodes", "max_episodes", "max_wait_s")
                if isinstance(s.get(k), (int, float))])
    return out.text()


def add_rollout_routes(app: FastAPI, dash, settings: Optional[RolloutSettings] = None) -> RolloutGate:
    gate = RolloutGate(dash.registry, settings or RolloutSettings.from_env())
    app.state.rollout = gate
    bearer = [Depends(HTTPBearer(auto_error=False))]

    def busy_is_409(fn, *a):
        try:
            return fn(*a)
        except GateBusy as e:
            raise CannotApply(str(e)) from None

    @app.get("/api/rollout", tags=["rollout"], dependencies=bearer, responses=errors(*READ_ERRORS),
             summary="The rollout gate: on/off, fleet version, candidate on the canaries, its evidence "
                     "(per task: autonomous success, interventions, episode length; SPRT log-LR), recent decisions")
    def rollout(decisions: int = Query(20, ge=0, le=500)):
        return gate.status(decisions=decisions)

    @app.get("/api/rollout/decisions", tags=["rollout"], dependencies=bearer, responses=errors(*READ_ERRORS),
             summary="The gate's decisions, newest first: what, which version, by whom (gate or operator), why, evidence")
    def rollout_decisions(limit: int = Query(100, ge=1, le=5000)):
        return {"decisions": gate.decisions(limit)}

    @app.post("/api/rollout/promote", tags=["rollout"], dependencies=bearer,
              responses=errors(*WRITE_ERRORS, 404, 409, 502),
              summary="Promote a version to the whole fleet now, whatever the evidence says (audited)")
    def rollout_promote(request: Request, body: RolloutDecisionBody, who: Identity = Depends(identity)):
        audit_note(request, "rollout.promote", body.version)
        d = busy_is_409(gate.manual_promote, body.version, who.name, body.reason)
        audit_note(request, "rollout.promote", body.version, {"reason": d["reason"]})
        return {"decision": d, "rollout": gate.status(decisions=5)}

    @app.post("/api/rollout/reject", tags=["rollout"], dependencies=bearer,
              responses=errors(*WRITE_ERRORS, 404, 409, 502),
              summary="Refuse a version: off the canaries now and never promoted by the gate (audited)")
    def rollout_reject(request: Request, body: RolloutDecisionBody, who: Identity = Depends(identity)):
        audit_note(request, "rollout.reject", body.version)
        d = busy_is_409(gate.manual_reject, body.version, who.name, body.reason)
        audit_note(request, "rollout.reject", body.version, {"reason": d["reason"]})
        return {"decision": d, "rollout": gate.status(decisions=5)}

    @app.put("/api/rollout/enabled", tags=["rollout"], dependencies=bearer, responses=errors(*WRITE_ERRORS, 409),
             summary="Switch the gate on (hold the fleet, canary every new version) or off (every publish goes "
                     "to every robot)")
    def rollout_enabled(request: Request, body: RolloutEnabledBody, who: Identity = Depends(identity)):
        audit_note(request, "rollout.enable" if body.enabled else "rollout.disable", "fleet")
        return busy_is_409(gate.set_enabled, body.enabled, who.name)

    @app.get("/metrics/rollout", tags=["meta"], dependencies=bearer, responses=json_errors(*READ_ERRORS),
             response_class=PlainTextResponse,
             summary="Prometheus text exposition of the rollout gate: decisions by kind, candidate evidence")
    async def rollout_metrics():
        text = await run_in_threadpool(render_metrics, gate)
        return PlainTextResponse(text, media_type=metrics.CONTENT_TYPE)

    return gate
