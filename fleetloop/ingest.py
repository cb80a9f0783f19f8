"""The robot write gate: the only way a robot's writes reach shared Redis keys.

Why a gate and not Redis ACLs alone: an ACL can allow or deny a command on a key, never its
arguments, so a robot allowed to XADD the episode stream may also XADD an id of
18446744073709551615-18446744073709551615 (no one can add after it), `MAXLEN 0` (empties the
stream), 100 MB fields or 200,000 events. A Redis function does not help: Redis runs the
commands inside a function with the *caller's* ACL (measured on Redis 7.0: "The user executing
the script can't run this command"), so a robot allowed to FCALL a function that XADDs must be
allowed to XADD itself. Robots therefore get no Redis write command at all (fleetloop/credentials.py)
and write through this gate, which holds its own Redis identity and enforces, per write:

  episode event  the fields of an EpisodeEvent only, as strings; episode_id a valid id; robot_id
                 the caller's own id (filled in when missing); manifest_key under
                 episodes/<caller>/<episode_id>/; at most MAX_EVENT_BYTES in all (the uploader
                 leaves out the manifest copy when it would not fit: the consumer then reads the
                 stored manifest); XADD with an id Redis generates ('*') and the gate's own
                 approximate cap.
  heartbeat      a JSON object naming the caller, at most MAX_HEARTBEAT_BYTES, finite numbers,
                 encodable text; HSET status on fleetloop:robot:<caller> and SADD <caller> to the
                 robot set (which is refused once it holds MAX_ROBOTS ids).
  control ack    command_id and result, short text; XADD '*' on the ack stream with its cap.

and a per-robot token bucket per kind (RATES). The embedded default (`fleetloop demo`, one machine,
a private Redis) runs the same checks in the daemon's process (`LocalWrites`, no rate limit); a robot with issued
credentials talks to `fleetloop ingest` over HTTP (`GatewayWrites`), authenticated with its own
Redis user name and password (checked by an AUTH against Redis, cached briefly).

    fleetloop ingest [--host 0.0.0.0] [--port 8090] [--tls-cert PEM --tls-key PEM]
                     (FLEETLOOP_REDIS_URL: the gate's own identity, env/ingest.env; robots verify an
                     https:// gate against the system CAs, or SSL_CERT_FILE)
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from typing import Optional
from urllib.parse import unquote, urlsplit

import redis

from fleetloop import config
from fleetloop.buffer.codec import check_id
from fleetloop.buffer.queue import EPISODE_STREAM_CAP, EVENT_FIELDS
from fleetloop.dashboard.heartbeat import MAX_ROBOTS, ROBOTS_SET  # ids the robot set may hold: as many as are listed

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 64 * 1024        # an event with its manifest copy; a long episode's manifest is ~30 KB
MAX_HEARTBEAT_BYTES = 16 * 1024    # a daemon's status is ~2 KB
MAX_ACK_TEXT = 256
ACK_STREAM_CAP = 10_000            # approximate MAXLEN of the ack stream (the episode stream's: EPISODE_STREAM_CAP)
ACK_STREAM = config.CONTROL_CHANNEL_PREFIX + "acks"
EPISODE_FIELDS = set(EVENT_FIELDS) | {"manifest_json"}
# per robot and kind: (sustained per second, burst). An episode lasts seconds; a spool draining
# after an outage uploads a few per second (each needs its chunks put first); a heartbeat every 2 s
# plus one per control command.
RATES = {"episode": (20.0, 200), "heartbeat": (10.0, 30), "ack": (10.0, 30)}


class Refused(ValueError):
    """A write the gate will never accept (shape, size, identity): HTTP 4xx, not retried."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Throttled(Refused):
    """Over the robot's rate: retry after `retry_after_s`."""

    def __init__(self, kind: str, retry_after_s: float):
        super().__init__(429, f"too many {kind} writes: retry in {retry_after_s:.2f}s")
        self.retry_after_s = retry_after_s


class GateUnavailable(OSError):
    """The gate (or Redis behind it) cannot be reached now: an outage, retried with backoff."""


class TokenBuckets:
    """One bucket per (robot, kind), refilled continuously. Thread-safe; only authenticated robot
    ids get a bucket, so there are as many as issued robots x kinds."""

    def __init__(self, rates: Optional[dict[str, tuple[float, int]]] = RATES, clock=time.monotonic):
        """rates None: no limit (the embedded default's own process, which holds a full Redis
        client anyway)."""
        self.rates, self.clock = rates, clock
        self._state: dict[tuple[str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, robot_id: str, kind: str) -> None:
        if self.rates is None:
            return
        rate, burst = self.rates[kind]
        now = self.clock()
        with self._lock:
            tokens, at = self._state.get((robot_id, kind), (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate)
            if tokens < 1.0:
                self._state[(robot_id, kind)] = (tokens, now)
                raise Throttled(kind, (1.0 - tokens) / rate)
            self._state[(robot_id, kind)] = (tokens - 1.0, now)


def _text(v, what: str, limit: int) -> str:
    if not isinstance(v, str):
        raise Refused(422, f"{what} must be a string")
    if len(v) > limit:
        raise Refused(413, f"{what} is longer than {limit} characters")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(422, f"{what} is not valid Unicode text (a lone surrogate?)") from None
    return v


def _id(v, what: str) -> str:
    try:
        return check_id(what, _text(v, what, 128))
    except ValueError as e:
        raise Refused(422, str(e)) from None


def _finite_json(v, depth: int = 0) -> None:
    """Refuse what a reader could not render: NaN/Infinity, lone surrogates, deep nesting."""
    if depth > 8:
        raise Refused(422, "heartbeat is nested too deeply")
    if isinstance(v, float) and not math.isfinite(v):
        raise Refused(422, "heartbeat holds a non-finite number")
    if isinstance(v, str):
        _text(v, "a heartbeat string", MAX_HEARTBEAT_BYTES)
    elif isinstance(v, dict):
        for k, x in v.items():
            _text(k, "a heartbeat key", 256)
            _finite_json(x, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _finite_json(x, depth + 1)


def _size(fields: dict[str, str]) -> int:
    return sum(len(k) + len(v.encode("utf-8")) for k, v in fields.items())


def jsonable(v, depth: int = 0):
    """The daemon's status as the gate accepts it: non-finite numbers as None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict) and depth < 8:
        return {str(k): jsonable(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)) and depth < 8:
        return [jsonable(x, depth + 1) for x in v]
    return v


def fit_event(fields: dict[str, str], max_bytes: int = MAX_EVENT_BYTES) -> dict[str, str]:
    """The event as the gate accepts it: without the manifest copy when the whole would be too big
    (the consumer then reads the committed manifest from the store)."""
    if _size(fields) > max_bytes and "manifest_json" in fields:
        return {k: v for k, v in fields.items() if k != "manifest_json"}
    return fields


class RobotGate:
    """Validates and performs one robot's write with the gate's own (trusted) Redis client."""

    def __init__(self, client: redis.Redis, buckets: Optional[TokenBuckets] = None):
        self.client = client
        self.buckets = buckets or TokenBuckets()

    def episode(self, robot_id: str, fields) -> str:
        if not isinstance(fields, dict):
            raise Refused(422, "an episode event is a JSON object of strings")
        unknown = set(fields) - EPISODE_FIELDS
        if unknown:
            raise Refused(422, f"unknown event fields {sorted(map(str, unknown))[:5]}")
        f = {k: _text(v, k, MAX_EVENT_BYTES) for k, v in fields.items()}
        if _size(f) > MAX_EVENT_BYTES:
            raise Refused(413, f"event is larger than {MAX_EVENT_BYTES} bytes")
        if f.setdefault("robot_id", robot_id) != robot_id:
            raise Refused(403, f"robot {robot_id!r} cannot announce an episode of robot {f['robot_id']!r}")
        episode_id = _id(f.get("episode_id"), "episode id")
        if not f.get("manifest_key", "").startswith(f"episodes/{robot_id}/{episode_id}/"):
            raise Refused(403, f"manifest_key must lie under episodes/{robot_id}/{episode_id}/")
        for k in ("ended_ns", "schema_version"):
            if k in f and not (f[k].isascii() and f[k].isdigit() and len(f[k]) <= 19):
                raise Refused(422, f"{k} must be a non-negative integer")
        self.buckets.take(robot_id, "episode")
        msg_id = self.client.xadd(config.EPISODE_STREAM, f, id="*", maxlen=EPISODE_STREAM_CAP, approximate=True)
        return msg_id.decode() if isinstance(msg_id, bytes) else msg_id

    def heartbeat(self, robot_id: str, status) -> None:
        text = status if isinstance(status, str) else json.dumps(status, allow_nan=True, default=str)
        if len(text.encode("utf-8", "surrogatepass")) > MAX_HEARTBEAT_BYTES:
            raise Refused(413, f"heartbeat is larger than {MAX_HEARTBEAT_BYTES} bytes")
        try:
            parsed = json.loads(text) if isinstance(status, str) else status
        except (ValueError, RecursionError):
            raise Refused(422, "heartbeat is not JSON") from None
        if not isinstance(parsed, dict) or parsed.get("robot_id") != robot_id:
            raise Refused(422, f"heartbeat must be a JSON object with robot_id {robot_id!r}")
        _finite_json(parsed)
        ns = parsed.get("last_seen_ns")
        if type(ns) is not int or not 0 < ns < 2 ** 63:
            raise Refused(422, "last_seen_ns must be a positive integer (nanoseconds)")
        self.buckets.take(robot_id, "heartbeat")
        pipe = self.client.pipeline(transaction=False)  # one round trip for both
        known, size = pipe.sismember(ROBOTS_SET, robot_id).scard(ROBOTS_SET).execute()
        if not known and size >= MAX_ROBOTS:
            raise Refused(507, f"the robot set already holds {MAX_ROBOTS} robots")
        pipe = self.client.pipeline()
        pipe.hset(config.HEARTBEAT_PREFIX + robot_id, mapping={"status": text})
        pipe.sadd(ROBOTS_SET, robot_id)
        pipe.execute()

    def ack(self, robot_id: str, command_id, result) -> str:
        fields = {"robot_id": robot_id, "command_id": _text(command_id, "command_id", 128),
                  "result": _text(result, "result", MAX_ACK_TEXT)}
        self.buckets.take(robot_id, "ack")
        msg_id = self.client.xadd(ACK_STREAM, fields, id="*", maxlen=ACK_STREAM_CAP, approximate=True)
        return msg_id.decode() if isinstance(msg_id, bytes) else msg_id


# ---- the robot's side ----------------------------------------------------------------------

class LocalWrites:
    """The gate's checks in this process, on this process's Redis client: the embedded default,
    where the daemon's client may write Redis anyway (so no rate limit: it would protect nothing
    and would slow `fleetloop bench ingest`)."""

    def __init__(self, client: redis.Redis, robot_id: Optional[str] = None):
        self.gate, self.robot_id = RobotGate(client, TokenBuckets(rates=None)), robot_id

    def episode(self, fields: dict[str, str]) -> str:
        return self.gate.episode(self.robot_id or fields.get("robot_id", ""), fit_event(fields))

    def heartbeat(self, status: dict) -> None:
        self.gate.heartbeat(self.robot_id, jsonable(status))  # the gate serializes it (once)

    def ack(self, command_id: str, result: str) -> str:
        return self.gate.ack(self.robot_id, command_id, result)


class GatewayWrites:
    """A robot's writes over HTTP to `fleetloop ingest`, as its own Redis user (robot-<id>)."""

    def __init__(self, url: str, robot_id: str, username: str, password: str, timeout_s: float = 10.0):
        self.base, self.robot_id, self.timeout_s = url.rstrip("/"), robot_id, timeout_s
        self._auth = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()

    @classmethod
    def from_redis_url(cls, url: str, robot_id: str, redis_url: str) -> "GatewayWrites":
        """The robot's credentials are those of its Redis URL (redis://robot-<id>:<password>@...)."""
        u = urlsplit(redis_url)
        return cls(url, robot_id, unquote(u.username or ""), unquote(u.password or ""))

    def _call(self, method: str, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{self.base}/v1/robots/{self.robot_id}/{path}", method=method,
                                     data=json.dumps(body).encode(),
                                     headers={"Authorization": self._auth, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read(4096)).get("detail", "")
            except (ValueError, AttributeError):
                detail = ""
            if e.code == 429:
                raise Throttled(path, float(e.headers.get("Retry-After") or 1)) from None
            if e.code in (401, 408) or e.code >= 500:  # wrong credentials, or the gate/Redis is down
                raise GateUnavailable(f"ingest gate: HTTP {e.code} {detail}".strip()) from None
            raise Refused(e.code, str(detail)[:500]) from None
        except (urllib.error.URLError, OSError) as e:
            raise GateUnavailable(f"ingest gate unreachable: {e}") from None

    def episode(self, fields: dict[str, str]) -> str:
        return self._call("POST", "episodes", fit_event(fields))["id"]

    def heartbeat(self, status: dict) -> None:
        self._call("PUT", "heartbeat", jsonable(status))

    def ack(self, command_id: str, result: str) -> str:
        return self._call("POST", "acks", {"command_id": command_id, "result": result})["id"]


def robot_writes(client: redis.Redis, robot_id: str, ingest_url: str = "", redis_url: str = ""):
    """GatewayWrites when an ingest gate is configured, else LocalWrites on the daemon's client."""
    if ingest_url:
        return GatewayWrites.from_redis_url(ingest_url, robot_id, redis_url)
    return LocalWrites(client, robot_id)


# ---- the HTTP gate -------------------------------------------------------------------------

class RedisAuth:
    """A robot's credentials are its Redis ACL user: checked by an AUTH against Redis (so revoking
    the ACL user revokes the gate too), a success remembered for `ttl_s`."""

    def __init__(self, redis_url: str, ttl_s: float = 60.0):
        self.redis_url, self.ttl_s = redis_url, ttl_s
        self._ok: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, username: str, password: str) -> bool:
        key = hashlib.sha256(f"{username}\0{password}".encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            if self._ok.get(key, 0.0) > now:
                return True
        u = urlsplit(self.redis_url)
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        # no retries: redis-py counts a refused AUTH as a connection error and would retry it (3.6 s)
        where = ({"unix_socket_path": u.path} if u.scheme == "unix" else
                 {"host": u.hostname or "127.0.0.1", "port": u.port or 6379, "ssl": u.scheme == "rediss"})
        conn = redis.Redis(**where, username=username, password=password, socket_timeout=5, socket_connect_timeout=3,
                           retry=Retry(NoBackoff(), 0))
        try:
            conn.ping()
        except redis.AuthenticationError:
            return False
        except redis.ResponseError as e:  # WRONGPASS / NOPERM on PING
            if "WRONGPASS" in str(e) or "invalid" in str(e).lower():
                return False
            raise
        finally:
            conn.close()
        with self._lock:
            if len(self._ok) > 4 * MAX_ROBOTS:
                self._ok.clear()
            self._ok[key] = now + self.ttl_s
        return True


def make_app(gate: RobotGate, auth: RedisAuth):
    """The gate's HTTP API (Starlette; one route per write, credentials checked before the body
    is read, the body read only up to its limit)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    limits = {"episodes": MAX_EVENT_BYTES + 4096, "heartbeat": MAX_HEARTBEAT_BYTES, "acks": 4096}

    def error(status: int, detail: str, **headers) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)

    async def read(request, path: str):
        """(robot_id, parsed body) or an error response: credentials first, then the size
        (Content-Length, then counted while reading), then JSON."""
        robot_id = request.path_params["robot_id"]
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
            user = password = ""
        if scheme.lower() != "basic" or not user:
            return error(401, "robot credentials required (HTTP Basic: robot-<id> and its Redis password)",
                         **{"WWW-Authenticate": "Basic"})
        try:
            ok = user == f"robot-{robot_id}" and await run_in_threadpool(auth.check, user, password)
        except redis.RedisError as e:
            log.warning("ingest gate: cannot check credentials: %s", e)
            return error(503, "Redis unavailable; retry")
        if not ok:
            return error(401, "wrong robot credentials for this robot", **{"WWW-Authenticate": "Basic"})
        limit = limits[path]
        declared = request.headers.get("content-length")
        if declared and (not declared.isdigit() or int(declared) > limit):
            return error(413, f"body larger than {limit} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                return error(413, f"body larger than {limit} bytes")
        try:
            return robot_id, json.loads(bytes(body))
        except (ValueError, RecursionError):
            return error(422, "body is not JSON")

    def route(path: str, method: str, call, answer):
        async def endpoint(request):
            got = await read(request, path)
            if isinstance(got, JSONResponse):
                return got
            try:
                out = await run_in_threadpool(call, *got)
            except Throttled as e:
                return error(429, e.detail, **{"Retry-After": f"{max(1, math.ceil(e.retry_after_s))}"})
            except Refused as e:
                return error(e.status, e.detail)
            except redis.RedisError as e:
                log.warning("ingest gate: Redis error: %s", e)
                return error(503, "Redis unavailable; retry")
            return JSONResponse(answer(out))
        return Route(f"/v1/robots/{{robot_id}}/{path}", endpoint, methods=[method])

    def ack(robot_id, body):
        body = body if isinstance(body, dict) else {}
        return gate.ack(robot_id, body.get("command_id"), body.get("result"))

    async def healthz(_request):
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/healthz", healthz, methods=["GET"]),
        route("episodes", "POST", gate.episode, lambda msg_id: {"id": msg_id}),
        route("heartbeat", "PUT", gate.heartbeat, lambda _none: {"ok": True}),
        route("acks", "POST", ack, lambda msg_id: {"id": msg_id}),
    ])


def add_arguments(p) -> None:
    p.add_argument("--host", default="0.0.0.0", help="address robots reach the gate at")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (chain); with --tls-key")
    p.add_argument("--tls-key", help="its PEM private key")


def run(args) -> int:
    import os

    import uvicorn
    url = os.environ.get("FLEETLOOP_REDIS_URL")
    if not url:
        print("fleetloop ingest: set FLEETLOOP_REDIS_URL (the gate's own identity, env/ingest.env)")
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("fleetloop ingest: --tls-cert and --tls-key go together")
        return 2
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
    uvicorn.run(make_app(RobotGate(client), RedisAuth(url)), host=args.host, port=args.port, log_level="info",
                ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)
    return 0
