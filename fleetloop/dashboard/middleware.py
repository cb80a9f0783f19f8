"""Access control and the audit log of the dashboard's API (fleetloop/dashboard/api.py), in one
ASGI middleware in front of every route, so a new route cannot forget either: it checks the
bearer token before anything else runs (before the body is even parsed), and records every write
request -- allowed, refused or failed -- on the audit stream before the caller gets its answer.
Routes only add what they did (action, target, result) to request.state.audit (audit_note).
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import Optional

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from fleetloop.dashboard.audit import AuditedSend
from fleetloop.dashboard.auth import ANONYMOUS, OPERATOR, VIEWER, Identity, TokenTable, bearer_token
from fleetloop.dashboard.service import Dashboard

log = logging.getLogger(__name__)

PUBLIC_PATHS = {"/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/api/health", "/favicon.ico"}
PUBLIC_PREFIXES = ("/static/",)
READ_METHODS = {"GET", "HEAD"}

MAX_BODY = 64 * 1024       # no write body needs more; larger ones are refused with 413 (and audited)
MAX_JSON_DEPTH = 16        # bodies nested deeper are refused with 422 (and audited)
AUDIT_PARAMS_MAX = 2048    # the audit log keeps a body's JSON up to this size, else a summary


class BodyRefused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number this API accepts: numbers must be finite")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:40]} is out of range: numbers must be finite")
    return v


def _depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion), stopping past limit."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            todo.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_body(body: bytes):
    """A write's body, checked before any route sees it: UTF-8 JSON, finite numbers only (no
    NaN/Infinity, nothing that overflows to infinity), at most MAX_JSON_DEPTH deep. Raises
    BodyRefused(422) with a short reason (never an echo of the body)."""
    if len(body) > MAX_BODY:
        raise BodyRefused(413, f"request body over {MAX_BODY} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyRefused(422, "body: not UTF-8 text (send a JSON body)") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise BodyRefused(422, f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        msg = str(e)
        if "finite" not in msg:
            msg = f"not valid JSON ({msg.split(':')[0][:80]})"
        raise BodyRefused(422, f"body: {msg}") from None
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BodyRefused(422, f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def audit_params(body: bytes, parsed, why: str = ""):
    """What the audit log keeps of a request body: the JSON itself when it is valid and small,
    else a one-line summary. Always JSON-serialisable with finite numbers."""
    if not body:
        return None
    if not why:
        try:
            text = json.dumps(parsed, allow_nan=False, separators=(",", ":"))
            if len(text) <= AUDIT_PARAMS_MAX:
                return parsed
            why = "too large to record"
        except (ValueError, TypeError, RecursionError):
            why = "not recordable"
    return f"<body of {len(body)} bytes not recorded: {why[:200]}>"


class AuthAuditMiddleware:
    def __init__(self, app, dash: Dashboard, tokens: TokenTable, open_read: bool):
        self.app, self.dash, self.tokens, self.open_read = app, dash, tokens, open_read

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await self.app(scope, receive, send)
        write = method not in READ_METHODS
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        token = bearer_token(headers.get("authorization"))
        identity = self.tokens.lookup(token)
        refusal = None
        if identity is None:
            if token or "authorization" in headers:
                refusal = (401, "invalid token: send 'Authorization: Bearer <token>' with a configured token")
            elif write or not self.open_read:
                refusal = (401, f"this needs {'an operator' if write else 'a viewer or operator'} token: "
                                f"send 'Authorization: Bearer <token>'")
            else:
                identity = Identity(ANONYMOUS.name, VIEWER)  # --open-read: reads without a token
        elif write and not identity.can(OPERATOR):
            refusal = (403, f"{identity.name!r} is a {identity.role}; this needs an operator token")
        state = scope.setdefault("state", {})
        state["identity"] = identity
        if refusal:
            status, detail = refusal
            response = JSONResponse({"detail": detail}, status_code=status,
                                    headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
            if write:  # recorded before the answer; the body is never read for a refused caller
                await self._audit(scope, identity, status, detail, None)
            await response(scope, receive, send)
            return
        if not write:
            return await self.app(scope, receive, send)

        # An operator's write: read the (bounded) body, check it, record it -- whatever it holds.
        body, parsed, refused = bytearray(), None, None
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            refused = BodyRefused(413, f"request body over {MAX_BODY} bytes")
        else:
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
                body.extend(message.get("body", b""))
                more = message.get("more_body", False)
                if len(body) > MAX_BODY:
                    refused = BodyRefused(413, f"request body over {MAX_BODY} bytes")
                    break
        body = bytes(body)
        if refused is None and body:
            try:
                parsed = parse_body(body)
            except BodyRefused as e:
                refused = e
        if refused is not None:
            response = JSONResponse({"detail": refused.detail}, status_code=refused.status)
            size = int(declared) if declared.isdigit() else len(body)
            await self._audit(scope, identity, refused.status, refused.detail,
                              f"<body of {size} bytes not recorded: {refused.detail[:200]}>" if size else None)
            await response(scope, receive, send)
            return

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def write_audit(status: int, error_body: bytes) -> None:
            detail = None
            if error_body:
                try:
                    detail = json.loads(error_body).get("detail")
                except (ValueError, AttributeError, RecursionError):
                    detail = error_body[:500].decode("utf-8", "replace")
            await self._audit(scope, identity, status, detail, audit_params(body, parsed))

        # The answer is held until its audit entry is written (fleetloop.dashboard.audit).
        sender = AuditedSend(send, write_audit)
        try:
            await self.app(scope, replay, sender)
        except BaseException:
            await sender.finish(release=False)  # the server answers 500 after this
            raise
        await sender.finish()

    async def _audit(self, scope, identity: Optional[Identity], status: int, detail, params) -> None:
        info = scope.get("state", {}).get("audit") or {}
        record = {
            "ts_ns": time.time_ns(), "who": identity.name if identity else ANONYMOUS.name,
            "role": identity.role if identity else "", "method": scope["method"], "path": scope["path"][:300],
            "action": info.get("action") or f"{scope['method']} {scope['path'][:300]}", "target": info.get("target"),
            "params": params, "status": status,
            "result": "ok" if status < 400 else ("denied" if status in (401, 403) else "error"),
            "detail": info.get("result") if status < 400 else detail,
        }
        try:
            await anyio.to_thread.run_sync(self.dash.audit, record)
        except Exception as e:  # never turn an audit hiccup into a lost response; say it loudly
            log.error("AUDIT RECORD LOST (%s): %s %s by %s -> %s", e, record["method"], record["path"],
                      record["who"], status)


def identity(request: Request) -> Identity:
    return request.state.identity


def audit_note(request: Request, action: str, target: str = "", result=None) -> None:
    request.state.audit = {"action": action, "target": target, "result": result}
