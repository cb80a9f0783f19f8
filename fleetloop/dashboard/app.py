"""`fleetloop dashboard`: the operator dashboard (REST API + live web page) as one process.

With no configuration it comes up on the embedded defaults: Redis from FLEETLOOP_REDIS_URL, else
a private redis-server it starts; the store from FLEETLOOP_STORE, else the local file store. With
no tokens configured it makes a one-off operator token and prints the page's URL carrying it.

Other code (`fleetloop demo`, `fleetloop up`, tests) embeds it with build_app() + DashboardServer.
"""
from __future__ import annotations

import logging
import re
import signal
import threading
import time
from typing import Optional

import redis

from fleetloop import config
from fleetloop.dashboard.auth import OPERATOR, TokenConfigError, TokenTable, generated_operator_token, load_tokens

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--redis-url", default=None, help="Redis URL (default: FLEETLOOP_REDIS_URL, else a private Redis)")
    p.add_argument("--store", default=None, help="store URI (default: FLEETLOOP_STORE, else the local file store)")
    p.add_argument("--tokens", default=None,
                   help="token file, JSON or TOML: {operators: {name: token}, viewers: {name: token}} "
                        "(default: FLEETLOOP_TOKENS_FILE; FLEETLOOP_OPERATOR_TOKENS / FLEETLOOP_VIEWER_TOKENS "
                        "add name:token pairs)")
    p.add_argument("--open-read", action="store_true",
                   help="let anyone who reaches the port read without a token (local demos); writes still need "
                        "an operator token")
    p.add_argument("--offline-after", type=float, default=6.0,
                   help="a robot whose last heartbeat is older than this many seconds shows offline (default 6 = "
                        "3 heartbeat intervals)")
    p.add_argument("--group", default="dashboard",
                   help="the dashboard's consumer group on the episode stream; give each dashboard process its "
                        "own (default: dashboard)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")


_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|access_token|api_key|key)=)[^&#\s]*")


class RedactTokens(logging.Filter):
    """Access-log lines never carry a token: `?token=...` (a page URL someone pasted, a script)
    is logged as `?token=[redacted]`. Tokens in the Authorization header are never logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(_SECRET_QUERY.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                                for a in record.args)
        if isinstance(record.msg, str) and "=" in record.msg:
            record.msg = _SECRET_QUERY.sub(r"\1[redacted]", record.msg)
        return True


def build_app(redis_client: redis.Redis, store, tokens: TokenTable, open_read: bool = False,
              offline_after_s: float = 6.0, group: str = "dashboard", registry=None):
    """The FastAPI app and its Dashboard (background threads start with the app's lifespan)."""
    from fleetloop.dashboard.api import create_app
    from fleetloop.dashboard.service import Dashboard
    dash = Dashboard(redis_client, store, registry=registry, group=group, offline_after_s=offline_after_s)
    app = create_app(dash, tokens, open_read=open_read)
    from fleetloop.dashboard.rollout_api import add_rollout_routes  # the rollout gate (docs/rollout.md)
    add_rollout_routes(app, dash)
    return app, dash


class DashboardServer:
    """uvicorn in a background thread (tests, `fleetloop demo`). port=0 picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn
        from fleetloop.services import free_port
        self.host, self.port = host, port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    access_log=False, lifespan="on"))
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "DashboardServer":
        self.thread = threading.Thread(target=self.server.run, name="dashboard-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"dashboard did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread:
            self.thread.join(timeout=15)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def run(args) -> int:
    import uvicorn

    from fleetloop.buffer.store import open_store
    from fleetloop.services import RedisServer

    try:
        tokens = load_tokens(args.tokens)
    except TokenConfigError as e:
        print(f"fleetloop dashboard: token configuration error: {e}")
        return 2
    generated = None
    if not len(tokens):
        generated = generated_operator_token()
        tokens.add("local-operator", generated, OPERATOR, "generated")

    private_redis = None
    url = args.redis_url or config.default_redis_url()
    if url is None:
        private_redis = RedisServer().start()
        url = private_redis.url
        print(f"fleetloop dashboard: started a private Redis at {url} "
              f"(point actors and the learner at it with FLEETLOOP_REDIS_URL)")
    store = open_store(args.store or config.default_store_uri(), config.S3Settings())
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=3, health_check_interval=30)
    app, _dash = build_app(client, store, tokens, open_read=args.open_read, offline_after_s=args.offline_after,
                           group=args.group)
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    page = f"http://{shown_host}:{args.port}/"
    if generated:
        # The token rides in the URL fragment: browsers never send it to the server or its logs.
        print(f"fleetloop dashboard: no tokens configured; this run's operator token is {generated}\n"
              f"  open {page}#token={generated}")
    else:
        print(f"fleetloop dashboard: open {page} (tokens: {tokens.names()})")
    print(f"fleetloop dashboard: store {store.uri}, API docs at {page}docs, OpenAPI at {page}openapi.json")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal into the handler that was
    # installed before it: make that one unwind through `finally`, so the private Redis goes too.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        log_config = _uvicorn_log_config()
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=args.access_log,
                    log_config=log_config)
    except KeyboardInterrupt:
        pass
    finally:
        if private_redis:
            private_redis.stop()
    return 0


def _uvicorn_log_config() -> dict:
    """uvicorn's own logging setup, plus the token-redacting filter on its loggers' handlers
    (uvicorn replaces logger configuration at start-up, so a filter added earlier is lost)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG
    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg.setdefault("filters", {})["redact_tokens"] = {"()": RedactTokens}
    for handler in cfg.get("handlers", {}).values():
        handler.setdefault("filters", []).append("redact_tokens")
    return cfg


def _exit_cleanly(signum, _frame):
    raise SystemExit(0)
