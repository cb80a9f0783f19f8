"""`fleetloop up`: the cloud side in one process -- the Ray learner and the dashboard -- against
the configured Redis and store (embedded defaults: a private Redis started here, the local file
store). Robots connect their daemons to the same Redis URL and store it prints."""
from __future__ import annotations

import signal
import threading


def add_arguments(p) -> None:
    from fleetloop.learner import main as learner_main
    learner_main.add_arguments(p)
    p.set_defaults(redis=None)  # None: embedded default (FLEETLOOP_REDIS_URL or a private server)
    p.add_argument("--host", default="127.0.0.1", help="dashboard address")
    p.add_argument("--port", type=int, default=8080, help="dashboard port")
    p.add_argument("--ingest-port", type=int, default=None,
                   help="also serve the robot write gate (fleetloop ingest) on --host:PORT, for robots whose "
                        "issued Redis users may not write (docs/security.md); off by default")


def run(args) -> int:
    from fleetloop import config
    from fleetloop.services import RedisServer

    private = None
    redis_url = args.redis or config.default_redis_url()
    if redis_url is None:
        private = RedisServer(data_dir=str(config.home_dir() / "redis")).start()
        redis_url = private.url
    print(f"fleetloop up: redis {redis_url}  store {args.store}", flush=True)
    args.redis = redis_url
    try:
        import redis as redis_lib

        from fleetloop.buffer.store import open_store
        from fleetloop.dashboard.app import DashboardServer, build_app
        from fleetloop.dashboard.auth import OPERATOR, generated_operator_token, load_tokens
        from fleetloop.learner import main as learner_main
        tokens = load_tokens()
        if not len(tokens):
            token = generated_operator_token()
            tokens.add("local-operator", token, OPERATOR, "generated")
            print(f"fleetloop up: no tokens configured; this run's operator token is {token}", flush=True)
        app, _dash = build_app(redis_lib.Redis.from_url(redis_url, socket_timeout=10), open_store(args.store), tokens)
        dashboard = DashboardServer(app, host=args.host, port=args.port).start()
        print(f"fleetloop up: dashboard at {dashboard.url}", flush=True)
        gate = None
        if args.ingest_port is not None:
            from fleetloop.ingest import RedisAuth, RobotGate, make_app
            gate_app = make_app(RobotGate(redis_lib.Redis.from_url(redis_url, socket_timeout=10)), RedisAuth(redis_url))
            gate = DashboardServer(gate_app, host=args.host, port=args.ingest_port).start()
            print(f"fleetloop up: robot write gate at {gate.url}", flush=True)
        try:
            return learner_main.run(args)  # blocks until SIGINT/SIGTERM or the learner stops
        finally:
            dashboard.stop()
            if gate is not None:
                gate.stop()
    finally:
        if private is not None:
            private.stop()
