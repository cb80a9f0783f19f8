"""The dashboard's HTTP face: REST API (OpenAPI at /openapi.json), server-sent events, /metrics and
the web page, all from one FastAPI app.

Access control and the audit log live in one ASGI middleware in front of every route
(middleware.py), so a new route cannot forget either; a write's audit entry is written before the
caller gets its answer. Routes only add what they did (action, target, result) to
request.state.audit (audit_note).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import redis
from fastapi import Body, Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from fleetloop.buffer.codec import EpisodeRejected
from fleetloop.buffer.store import StoreError
from fleetloop.dashboard import metrics
from fleetloop.dashboard.auth import Identity, TokenTable
from fleetloop.dashboard.middleware import MAX_BODY, AuthAuditMiddleware, audit_note, identity
from fleetloop.dashboard.resources.common import BadRequest, CannotApply, NotDelivered, NotFound
from fleetloop.dashboard.resources.robots import CONTROL_ACTIONS
from fleetloop.dashboard.service import Dashboard
from fleetloop.release.registry import RegistryError, UnknownVersion, WeightsIntegrityError
from fleetloop.text import PRINTABLE_PATTERN, control_refusal

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
_STREAM_ID = re.compile(r"^[0-9]{1,19}(-[0-9]{1,19})?$")
_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # robot / task / episode ids (buffer.codec.check_id)


# ---- request bodies ----------------------------------------------------------------------

class Strict(BaseModel):
    # allow_inf_nan=False: NaN/Infinity never reach a handler (the middleware refuses them first too)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ControlBody(Strict):
    reason: str = Field("", max_length=200, description="why (recorded in the audit log); no control characters",
                        json_schema_extra={"pattern": PRINTABLE_PATTERN})

    @field_validator("reason")
    @classmethod
    def _printable(cls, v: str) -> str:
        refusal = control_refusal("reason", v)  # the audit log and the page show it
        if refusal:
            raise ValueError(refusal)
        return v


class LabelBody(Strict):
    outcome: Literal["success", "failure", "unknown"]


class VersionBody(Strict):
    version: str = Field(min_length=1, max_length=64, description="policy version, e.g. v000012")


class RollbackBody(Strict):
    pin: bool = Field(False, description="also pin the fleet, so the learner's next publish does not move it on")


class CanaryBody(Strict):
    # The schema says what the service checks: a canary names robots, or a fraction > 0, or both.
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["robot_ids"], "properties": {"robot_ids": {"minItems": 1}}},
        {"required": ["fraction"], "properties": {"fraction": {"exclusiveMinimum": 0}}}]})
    version: str = Field(min_length=1, max_length=64)
    robot_ids: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list, max_length=200)
    fraction: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                            description="a stable fraction of the fleet (0..1), finite")


# ---- error bodies (every non-2xx answer has this shape, bounded: never an echo of the request) --

class ErrorItem(BaseModel):
    loc: list[Union[str, int]] = Field(description="where: body / query / path, then the field")
    msg: str = Field(max_length=200)
    type: str = Field(max_length=64)


class ErrorBody(BaseModel):
    detail: str = Field(description="what went wrong, in one line (at most 1000 characters)", max_length=1000)
    errors: Optional[list[ErrorItem]] = Field(None, description="422 only: each invalid field (at most 20)",
                                              max_length=20)


ERROR_TEXT = {
    401: "No token, an unknown token or not a bearer token ('WWW-Authenticate: Bearer')",
    403: "A viewer token on a write: writes need an operator token",
    404: "Unknown robot, episode, policy version, task, step or camera (reserved ids such as 'all' included)",
    409: "The request cannot apply in the fleet's present state (robot offline, nothing to roll back to, ...)",
    413: f"Request body over {MAX_BODY} bytes",
    422: "Invalid request: a parameter or the body fails the schema, a number is not finite, JSON nested too deep",
    502: "Stored data failed its integrity check (episode frames, a policy manifest)",
    503: "Redis or the object store is unavailable",
}


def errors(*codes: int) -> dict:
    return {c: {"model": ErrorBody, "description": ERROR_TEXT[c]} for c in codes}


def json_errors(*codes: int) -> dict:
    """errors() for a route whose success is not JSON (PNG, text, event stream): the error bodies
    still are, and the document must say so."""
    ref = {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
    return {c: {"description": ERROR_TEXT[c], "content": {"application/json": ref}} for c in codes}


SSE_EVENT = {"type": "object", "description": "one server-sent event ('fleet': data is the /api/fleet JSON; "
                                             "'problem': data is {detail})",
             "properties": {"event": {"type": "string", "enum": ["fleet", "problem"]}, "data": {"type": "string"},
                            "id": {"type": "string"}}}
READ_ERRORS = (401, 422, 503)             # every authenticated read
WRITE_ERRORS = (401, 403, 413, 422, 503)  # every write


def _bounded(text, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 3] + "..."


# ---- the app -----------------------------------------------------------------------------

def create_app(dash: Dashboard, tokens: TokenTable, open_read: bool = False, manage_dashboard: bool = True) -> FastAPI:
    """manage_dashboard: start/stop the Dashboard's background threads with the app's lifespan."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        if manage_dashboard:
            await run_in_threadpool(dash.start)
        try:
            yield
        finally:
            if manage_dashboard:
                await run_in_threadpool(dash.stop)

    app = FastAPI(title="fleetloop dashboard", version="1", lifespan=lifespan,
                  description="Operate a fleet of robots that share one policy. Every /api and /metrics route "
                              "needs 'Authorization: Bearer <token>' (viewer: reads; operator: everything), "
                              "unless the server runs with --open-read (reads open). Writes are audited.")
    app.add_middleware(AuthAuditMiddleware, dash=dash, tokens=tokens, open_read=open_read)
    app.state.dashboard = dash
    bearer = [Depends(HTTPBearer(auto_error=False))]  # documents the scheme; the middleware enforces it

    # -- errors: 404 for anything unknown, 409 for steering that cannot apply, 503 when a backend is
    # down; every body is ErrorBody, bounded, and never repeats the request back.
    def error(status: int):
        async def handler(_request, exc):
            return JSONResponse({"detail": _bounded(exc, 1000)}, status_code=status)
        return handler

    for exc_type, status in ((NotFound, 404), (UnknownVersion, 404), (NotDelivered, 409), (CannotApply, 409),
                             (RegistryError, 409), (BadRequest, 422), (EpisodeRejected, 502),
                             (WeightsIntegrityError, 502), (StoreError, 503)):
        app.add_exception_handler(exc_type, error(status))

    @app.exception_handler(redis.RedisError)
    async def redis_down(_request, exc):
        return JSONResponse({"detail": _bounded(f"redis unavailable: {exc}", 1000)}, status_code=503)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # 404 unknown path, 405 method, ...
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Allow: every method of every route on this path, not just one route's
            # the most specific route template matching the path (/api/policies/rollback over
            # /api/policies/{version}), then every route with that template (POST and DELETE /pin)
            templates = [r.path for r in request.app.router.routes
                         if getattr(r, "methods", None) and r.matches(request.scope)[0] == Match.PARTIAL]
            template = min(templates, key=lambda t: t.count("{")) if templates else None
            allowed = set()
            for route in request.app.router.routes:
                if template is not None and getattr(route, "path", None) == template and getattr(route, "methods", None):
                    allowed |= set(route.methods)
            if allowed:
                headers["Allow"] = ", ".join(sorted(allowed))
        return JSONResponse({"detail": _bounded(exc.detail, 1000)}, status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        items = []
        for e in exc.errors()[:20]:  # loc, msg and type only: the offending input is not echoed
            loc = [p if isinstance(p, int) else _bounded(p, 64) for p in list(e.get("loc", ()))[:8]]
            items.append({"loc": loc, "msg": _bounded(e.get("msg", ""), 200), "type": _bounded(e.get("type", ""), 64)})
        parts = [f"{'.'.join(str(p) for p in i['loc'])}: {i['msg']}" for i in items]
        return JSONResponse({"detail": _bounded("; ".join(parts) or "invalid request", 1000), "errors": items},
                            status_code=422)

    @app.exception_handler(Exception)
    async def internal(_request, exc):  # a bug: say so briefly, log the rest
        log.exception("unhandled error: %s", exc)
        return JSONResponse({"detail": "internal error (logged on the server)"}, status_code=500)

    # -- page and health
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/api/health", tags=["meta"], responses=errors(503),  summary="Liveness (no token needed)")
    def health():
        dash.redis.ping()
        return {"ok": True, "indexed": len(dash.index)}

    @app.get("/api/whoami", tags=["meta"], dependencies=bearer, responses=errors(*READ_ERRORS),  summary="The caller's name and role")
    def whoami(who: Identity = Depends(identity)):
        return {"name": who.name, "role": who.role, "open_read": open_read}

    # -- fleet and robots
    @app.get("/api/fleet", tags=["robots"], dependencies=bearer, responses=errors(*READ_ERRORS, 502), 
             summary="The live snapshot the event stream sends: robots, fleet counts, policy, learner, queue")
    def fleet():
        return dash.snapshot()

    @app.get("/api/robots", tags=["robots"], dependencies=bearer, responses=errors(*READ_ERRORS), 
             summary="Every robot: online/offline, task, policy version, success (Wilson 95%), interventions, spool")
    def robots():
        return {"robots": dash.robots(), "offline_after_s": dash.offline_after_s}

    @app.get("/api/robots/{robot_id}", tags=["robots"], dependencies=bearer, responses=errors(*READ_ERRORS, 404), 
             summary="One robot: the summary plus counters, swap stats, success per version, recent episodes")
    def robot(robot_id: str = PathParam(max_length=128)):
        return dash.robot(robot_id)

    def control_route(action: str):
        def handler(request: Request, robot_id: str = PathParam(max_length=128),
                    body: Optional[ControlBody] = Body(None), who: Identity = Depends(identity)):
            reason = body.reason if body else ""
            audit_note(request, f"robot.{action}", robot_id)
            result = dash.control(robot_id, action, who.name)
            audit_note(request, f"robot.{action}", robot_id,
                       {"command_id": result["command_id"], "ack": result["ack"], "reason": reason})
            return result
        handler.__name__ = f"robot_{action}"
        return handler

    control_help = {
        "takeover": "Ask a human to take over (the robot link reports takeover_requested)",
        "release": "Withdraw a takeover request: the policy keeps control",
        "pause": "Pause the robot (the robot link reports paused)",
        "resume": "Resume a paused robot",
    }
    for action in CONTROL_ACTIONS:
        app.post(f"/api/robots/{{robot_id}}/{action}", tags=["control"], dependencies=bearer, responses=errors(*WRITE_ERRORS, 404, 409), 
                 summary=control_help[action])(control_route(action))

    @app.post("/api/robots/{robot_id}/pin", tags=["policies"], dependencies=bearer, responses=errors(*WRITE_ERRORS, 404, 502), 
              summary="Pin one robot to a policy version")
    def pin_robot(request: Request, body: VersionBody, robot_id: str = PathParam(max_length=128),
                  who: Identity = Depends(identity)):
        audit_note(request, "robot.pin", robot_id)
        return dash.pin_robot(robot_id, body.version, who.name)

    @app.delete("/api/robots/{robot_id}/pin", tags=["policies"], dependencies=bearer, responses=errors(*WRITE_ERRORS, 404), 
                summary="Unpin one robot (it follows canary / fleet again)")
    def unpin_robot(request: Request, robot_id: str = PathParam(max_length=128), who: Identity = Depends(identity)):
        audit_note(request, "robot.unpin", robot_id)
        return dash.unpin_robot(robot_id, who.name)

    # -- episodes
    @app.get("/api/episodes", tags=["episodes"], dependencies=bearer, responses=errors(*READ_ERRORS),  summary="Episodes, newest first, filtered")
    def episodes(robot_id: Optional[str] = Query(None, max_length=128), task_id: Optional[str] = Query(None, max_length=128),
                 policy_version: Optional[str] = Query(None, max_length=64),
                 outcome: Optional[Literal["success", "failure", "unknown"]] = None,
                 has_intervention: Optional[bool] = None, source: Optional[Literal["online", "offline"]] = None,
                 offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)):
        return dash.episodes(robot_id=robot_id, task_id=task_id, policy_version=policy_version, outcome=outcome,
                             has_intervention=has_intervention, source=source, offset=offset, limit=limit)

    @app.get("/api/episodes/{episode_id}", tags=["episodes"], dependencies=bearer, responses=errors(*READ_ERRORS, 404), 
             summary="One episode: outcome, label, intervention segments, steps to show as thumbnails")
    def episode(episode_id: str = PathParam(max_length=200)):
        return dash.episode(episode_id)

    @app.get("/api/episodes/{episode_id}/frames/{step}.png", tags=["episodes"], dependencies=bearer,
             summary="One camera frame as a PNG thumbnail (fetched lazily from the store, verified)",
             response_class=Response,
             responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                        **json_errors(*READ_ERRORS, 404, 502)})
    def frame(episode_id: str = PathParam(max_length=200), step: int = PathParam(ge=0),
              camera: Optional[str] = Query(None, pattern=_ID), size: int = Query(128, ge=16, le=512)):
        png = dash.thumbnail(episode_id, step, camera, size)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    @app.post("/api/episodes/{episode_id}/label", tags=["episodes"], dependencies=bearer, responses=errors(*WRITE_ERRORS, 404, 409), 
              summary="(Re)label an episode's outcome: LABEL_STREAM for the learner, labels/<id>.json in the store")
    def label(request: Request, body: LabelBody, episode_id: str = PathParam(max_length=200),
              who: Identity = Depends(identity)):
        audit_note(request, "episode.label", episode_id)
        result = dash.label(episode_id, body.outcome, who.name)
        audit_note(request, "episode.label", episode_id, {"from": result["previous"], "to": body.outcome})
        return result

    # -- tasks
    @app.get("/api/tasks", tags=["episodes"], dependencies=bearer, responses=errors(*READ_ERRORS),  summary="Success and intervention rate per task")
    def tasks():
        return {"tasks": dash.tasks()}

    @app.get("/api/series", tags=["episodes"], dependencies=bearer, responses=errors(*READ_ERRORS, 404), 
             summary="Per task, success and intervention rate over time (Wilson 95% intervals) + version timeline")
    def series(bucket_s: Optional[int] = Query(None, ge=1, le=30 * 86400),
               task_id: Optional[str] = Query(None, max_length=128)):
        return dash.series(bucket_s=bucket_s, task_id=task_id)

    # -- policies
    @app.get("/api/policies", tags=["policies"], dependencies=bearer, responses=errors(*READ_ERRORS, 502), 
             summary="Versions (newest first) with learner metrics and on-robot success; pointer, canary, pins, history")
    def policies(history: int = Query(100, ge=0, le=10_000)):
        return dash.policies(history=history)

    @app.get("/api/policies/{version}", tags=["policies"], dependencies=bearer, responses=errors(*READ_ERRORS, 404, 502), 
             summary="One version: manifest, metrics, on-robot success overall and per task")
    def policy(version: str = PathParam(max_length=64)):
        return dash.policy(version)

    @app.post("/api/policies/rollback", tags=["policies"], dependencies=bearer, responses=errors(*WRITE_ERRORS, 409), 
              summary="Point the fleet back at the version that was current before this one")
    def rollback(request: Request, body: Optional[RollbackBody] = Body(None), who: Identity = Depends(identity)):
        audit_note(request, "policy.rollback", "fleet")
        result = dash.rollback(who.name, pin=bool(body and body.pin))
        audit_note(request, "policy.rollback", "fleet", {"to": result["rolled_back_to"]})
        return result

    @app.post("/api/policies/{version}/promote", tags=["policies"], dependencies=bearer, responses=errors(*WRITE_ERRORS, 404, 502), 
              summary="Make a version the fleet's current one")
    def promote(request: Request, version: str = PathParam(max_length=64), who: Identity = Depends(identity)):
        audit_note(request, "policy.promote", version)
        return dash.promote(version, who.name)

    @app.post("/api/fleet/pin", tags=["policies"], dependencies=bearer, responses=errors(*WRITE_ERRORS, 404, 502), 
              summary="Pin the whole fleet to a version (publishes stop moving it)")
    def pin_fleet(request: Request, body: VersionBody, who: Identity = Depends(identity)):
        audit_note(request, "fleet.pin", body.version)
        return dash.pin_fleet(body.version, who.name)

    @app.delete("/api/fleet/pin", tags=["policies"], dependencies=bearer, responses=errors(*WRITE_ERRORS), 
                summary="Unpin the fleet: it jumps to the newest version and follows publishes again")
    def unpin_fleet(request: Request, who: Identity = Depends(identity)):
        audit_note(request, "fleet.unpin", "fleet")
        return dash.unpin_fleet(who.name)

    @app.put("/api/canary", tags=["policies"], dependencies=bearer, responses=errors(*WRITE_ERRORS, 404, 502), 
             summary="Run a version on listed robots and/or a stable fraction of the fleet first")
    def set_canary(request: Request, body: CanaryBody, who: Identity = Depends(identity)):
        audit_note(request, "canary.set", body.version)
        return dash.set_canary(body.version, body.robot_ids, body.fraction, who.name)

    @app.delete("/api/canary", tags=["policies"], dependencies=bearer, responses=errors(*WRITE_ERRORS),  summary="End the canary")
    def clear_canary(request: Request, who: Identity = Depends(identity)):
        audit_note(request, "canary.clear", "fleet")
        return dash.clear_canary(who.name)

    # -- learner, audit, live stream, metrics
    @app.get("/api/learner", tags=["learner"], dependencies=bearer, responses=errors(*READ_ERRORS), 
             summary="Learner step, step rate, samples/s, losses, buffer sizes, staleness; episode queue lag")
    def learner():
        return {**dash.learner(), "queue": dash.queue(), "ingest": dash.ingest()}

    @app.get("/api/audit", tags=["audit"], dependencies=bearer, responses=errors(*READ_ERRORS), 
             summary="The audit log, newest first (every write request: who, what, when, result)")
    def audit(limit: int = Query(100, ge=1, le=1000), before: Optional[str] = Query(None, max_length=40, pattern=_STREAM_ID.pattern,
                                                 description="an entry id like 1700000000000-0 (next_before)")):
        return dash.audit_log(limit=limit, before=before)

    @app.get("/api/events", tags=["live"], dependencies=bearer,
             summary="Server-sent events: a fleet snapshot (event 'fleet', same as /api/fleet) every interval",
             description="Streams while the client sends 'Accept: text/event-stream' (until max_events); "
                         "without that header the answer is one 'fleet' event.",
             response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}, **json_errors(*READ_ERRORS)})
    async def events(request: Request, interval_s: float = Query(1.0, ge=0.2, le=60.0, allow_inf_nan=False),
                     max_events: Optional[int] = Query(None, ge=1, le=1_000_000,
                                                       description="stop after this many (tests, curl)")):
        # A live stream only for clients that ask for one (EventSource and the page send
        # 'Accept: text/event-stream'); anything else (curl, an API tester) gets one snapshot
        # event and the response ends, so a generic client never hangs on an endless body.
        if "text/event-stream" not in request.headers.get("accept", ""):
            max_events = 1

        async def stream():
            yield "retry: 2000\n\n"
            sent = 0
            while True:
                try:
                    snap = await run_in_threadpool(dash.snapshot)
                    yield f"event: fleet\nid: {snap['ts_ns']}\ndata: {json.dumps(snap, separators=(',', ':'))}\n\n"
                except (redis.RedisError, StoreError) as e:  # keep the stream: the page shows the outage
                    yield f"event: problem\ndata: {json.dumps({'detail': f'backend unavailable: {e}'})}\n\n"
                sent += 1
                if max_events and sent >= max_events:
                    return
                await asyncio.sleep(interval_s)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/metrics", tags=["meta"], dependencies=bearer, responses=json_errors(*READ_ERRORS),  response_class=PlainTextResponse,
             summary="Prometheus text exposition: ingest rate, queue lag, learner step rate, swap latency, success")
    def prometheus():
        return PlainTextResponse(metrics.render(dash), media_type=metrics.CONTENT_TYPE)

    return app
