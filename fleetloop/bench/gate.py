"""`fleetloop bench gate`: what a robot's own credentials can push into the fleet's Redis (JSON).

A real redis-server on the ACL file `fleetloop credentials issue` writes, the write gate
(`fleetloop ingest`) on its own identity and a dashboard, all on loopback. Measures, with one
robot's credentials: the largest event the gate accepts, how fast a 100 MB event is refused (and
what it costs the gate's process), what a robot flooding announces from several threads gets
through per second, an honest announce's latency, and the dashboard's read times with 50,000
junk members in the robot set.
"""
from __future__ import annotations

import base64
import json
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--flood-seconds", type=float, default=5.0)
    p.add_argument("--flood-threads", type=int, default=4)
    p.add_argument("--junk", type=int, default=50_000, help="junk members put in the robot set")


def _event(robot: str, n: int, manifest_bytes: int = 0) -> dict:
    eid = f"20260101T000000-{robot}-{n:07d}"
    f = {"episode_id": eid, "manifest_key": f"episodes/{robot}/{eid}/manifest.json", "robot_id": robot,
         "task_id": "reach-v3", "ended_ns": str(time.time_ns()), "schema_version": "1"}
    if manifest_bytes:
        f["manifest_json"] = "x" * manifest_bytes
    return f


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args) -> int:
    import httpx
    import redis

    from fleetloop import config
    from fleetloop.buffer.store import LocalStore
    from fleetloop.credentials import issue
    from fleetloop.dashboard.app import DashboardServer, build_app
    from fleetloop.dashboard.auth import VIEWER, TokenTable
    from fleetloop.dashboard.heartbeat import ROBOTS_SET
    from fleetloop.ingest import (MAX_EVENT_BYTES, RATES, GatewayWrites, RedisAuth, Refused, RobotGate, Throttled,
                                  _size, make_app)
    from fleetloop.services import _wait_port, free_port, redis_server_binary

    out: dict = {"limits": {"max_event_bytes": MAX_EVENT_BYTES,
                            "rates": {k: {"per_s": r, "burst": b} for k, (r, b) in RATES.items()}}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        passwords = issue(tmp / "secrets", ["arm-1", "arm-2"], redis_host="127.0.0.1:0", keys=False)
        port = free_port()
        proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--aclfile", str(tmp / "secrets" / "redis" / "users.acl"),
                                 "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_port(port, proc, "redis-server")

            def connect(user):
                return redis.Redis(port=port, username=user, password=passwords[user], socket_timeout=30)
            admin = connect("fleetloop-admin")
            robot = connect("robot-arm-1")
            raw = {}
            for what, fn in {"xadd_max_id": lambda: robot.xadd(config.EPISODE_STREAM, {"a": "b"},
                                                               id="18446744073709551615-18446744073709551615"),
                             "xadd_maxlen_0": lambda: robot.xadd(config.EPISODE_STREAM, {"a": "b"}, maxlen=0),
                             "sadd_robot_set": lambda: robot.sadd(ROBOTS_SET, "fake")}.items():
                try:
                    fn()
                    raw[what] = "allowed"
                except redis.exceptions.NoPermissionError:
                    raw[what] = "refused (NOPERM)"
            out["robot_user_straight_at_redis"] = raw

            app = make_app(RobotGate(connect("ingest")), RedisAuth(f"redis://127.0.0.1:{port}/0"))
            with DashboardServer(app) as gate:
                arm = GatewayWrites(gate.url, "arm-1", "robot-arm-1", passwords["robot-arm-1"])
                # the largest event accepted: the limit counts field names and values
                base = _size(_event("arm-1", 0, 1))
                fits = MAX_EVENT_BYTES - base + 1
                arm._call("POST", "episodes", _event("arm-1", 1, fits))
                try:
                    arm._call("POST", "episodes", _event("arm-1", 2, fits + 1))
                    over = "accepted"
                except Refused as e:
                    over = f"refused {e.status}"
                out["event_size"] = {"largest_accepted_bytes": _size(_event("arm-1", 1, fits)),
                                     "one_byte_more": over}

                auth = {"Authorization": "Basic " + base64.b64encode(
                    f"robot-arm-1:{passwords['robot-arm-1']}".encode()).decode()}

                def body():
                    yield b'{"manifest_json": "'
                    for _ in range(100):
                        yield b"x" * (1 << 20)
                    yield b'"}'
                rss0 = _rss_mb()
                t0 = time.perf_counter()
                r = httpx.post(f"{gate.url}/v1/robots/arm-1/episodes", content=body(), headers=auth, timeout=120)
                out["event_100MB"] = {"status": r.status_code, "answered_s": round(time.perf_counter() - t0, 3),
                                      "process_peak_rss_growth_mb": round(_rss_mb() - rss0, 1)}

                admin.delete(config.EPISODE_STREAM)
                time.sleep(RATES["episode"][1] / RATES["episode"][0])  # the bucket refills
                lat = []
                for n in range(50):  # an honest robot, well under its rate
                    t0 = time.perf_counter()
                    arm.episode(_event("arm-1", 100 + n))
                    lat.append((time.perf_counter() - t0) * 1000)
                    time.sleep(0.06)
                out["announce_latency_ms"] = {"p50": round(statistics.median(lat), 2),
                                              "max": round(max(lat), 2), "n": len(lat)}

                admin.delete(config.EPISODE_STREAM)
                counts = {"accepted": 0, "throttled": 0}
                lock = threading.Lock()
                stop = time.monotonic() + args.flood_seconds

                def flood(k):
                    w = GatewayWrites(gate.url, "arm-1", "robot-arm-1", passwords["robot-arm-1"])
                    n = 0
                    while time.monotonic() < stop:
                        n += 1
                        try:
                            w.episode(_event("arm-1", k * 10_000_000 + n))
                            key = "accepted"
                        except Throttled:
                            key = "throttled"
                        with lock:
                            counts[key] += 1
                t0 = time.perf_counter()
                threads = [threading.Thread(target=flood, args=(k,)) for k in range(args.flood_threads)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.perf_counter() - t0
                out["flood_one_robot"] = {"seconds": round(elapsed, 2), "threads": args.flood_threads, **counts,
                                          "accepted_per_s": round(counts["accepted"] / elapsed, 1),
                                          "attempts_per_s": round(sum(counts.values()) / elapsed, 1),
                                          "stream_length": admin.xlen(config.EPISODE_STREAM)}

                arm.heartbeat({"robot_id": "arm-1", "last_seen_ns": time.time_ns()})
                junk = [f"fake-{i:06d}" for i in range(args.junk)]
                for i in range(0, len(junk), 5000):
                    admin.sadd(ROBOTS_SET, *junk[i:i + 5000])
                tokens = TokenTable()
                tokens.add("wall", "wall-viewer-token-0001", VIEWER)
                dapp, _dash = build_app(connect("dashboard"), LocalStore(tmp / "store"), tokens)
                with DashboardServer(dapp) as dash:
                    reads = {}
                    for path in ("/api/robots", "/api/fleet", "/metrics"):
                        t0 = time.perf_counter()
                        r = httpx.get(dash.url + path, headers={"Authorization": "Bearer wall-viewer-token-0001"},
                                      timeout=120)
                        reads[path] = {"status": r.status_code, "s": round(time.perf_counter() - t0, 3),
                                       "bytes": len(r.content)}
                    out["dashboard_with_junk_robot_set"] = {"junk_members": args.junk, **reads}
        finally:
            proc.terminate()
            proc.wait(10)
    print(json.dumps(out, indent=1))
    return 0
