"""`fleetloop bench decode`: the actor daemon's memory under concurrent Act calls whose small PNGs
decode to large frames (issue 21: 8 cameras of 2048x2048 RGBA zeros are ~115 KB on the wire and
128 MiB decoded). A real daemon and gRPC server in this process, a private Redis, a file store;
prints one JSON object: resident memory before and at peak (sampled every 5 ms), and how the
calls were answered.

  fleetloop bench decode --cameras 8 --size 2048 --concurrency 16 --rounds 3
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cameras", type=int, default=8)
    p.add_argument("--size", type=int, default=2048, help="frame height and width (RGBA)")
    p.add_argument("--concurrency", type=int, default=16, help="Act calls in flight at once")
    p.add_argument("--rounds", type=int, default=3)


class _StatelessPolicy:
    """A policy that does not state its spec, so every camera sent reaches it."""
    version = "v000001"
    horizon, action_dim = 4, 4

    def act(self, obs, instruction, indicator=None):
        return np.zeros((4, 4), np.float32)


def _png_zeros(size: int) -> bytes:
    from PIL import Image as PILImage
    buf = io.BytesIO()
    PILImage.fromarray(np.zeros((size, size, 4), np.uint8)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def run(args) -> int:
    from fleetloop.actor.daemon import ActorDaemon, FixedPolicySource
    from fleetloop.actor.link import RobotLinkClient
    from fleetloop.actor.spool import Spool
    from fleetloop.bench.fleet import _rss_mb
    from fleetloop.buffer.store import LocalStore
    from fleetloop.proto.v1 import episode_pb2 as pb
    from fleetloop.proto.v1 import robot_link_pb2 as rl
    from fleetloop.services import RedisServer

    data = _png_zeros(args.size)
    obs = rl.Observation(images=[pb.Image(camera=f"cam{i}", encoding="png", height=args.size, width=args.size,
                                          channels=4, data=data) for i in range(args.cameras)],
                         state=[0.0] * 6)
    import redis
    server = RedisServer(appendonly=False).start()
    with tempfile.TemporaryDirectory() as tmp:
        client = redis.Redis.from_url(server.url)
        d = ActorDaemon("bench-1", LocalStore(Path(tmp) / "store"), client, Spool(Path(tmp) / "spool"),
                        FixedPolicySource(_StatelessPolicy()), grpc_address="127.0.0.1:0").start()
        try:
            link = RobotLinkClient(d.address, "bench-1", timeout_s=60)
            eid = link.start_episode("reach", "reach")
            req = rl.ActRequest(episode_id=eid, observation=obs)
            time.sleep(0.5)
            before = _rss_mb()
            peak, stop = [before], threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], _rss_mb())
                    time.sleep(0.005)

            def call(_):
                try:
                    link.stub.Act(req, timeout=60)
                    return "OK"
                except grpc.RpcError as e:
                    return e.code().name

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            codes: Counter = Counter()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                for _ in range(args.rounds):
                    codes.update(pool.map(call, range(args.concurrency)))
            wall = time.perf_counter() - t0
            stop.set()
            sampler.join()
            peak[0] = max(peak[0], _rss_mb())
            link.end_episode(pb.OUTCOME_UNKNOWN)
        finally:
            d.stop()
            server.stop()
    print(json.dumps({"benchmark": "decode", "cameras": args.cameras, "size": args.size,
                      "request_bytes": req.ByteSize(), "decoded_bytes_per_call": args.cameras * args.size ** 2 * 4,
                      "concurrency": args.concurrency, "calls": args.concurrency * args.rounds,
                      "answers": dict(codes), "rss_before_mb": round(before, 1),
                      "rss_peak_mb": round(peak[0], 1), "wall_s": round(wall, 2)}))
    return 0
