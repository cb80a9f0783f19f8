"""`fleetloop bench jitter`: does recording and uploading disturb the robot's control loop?

A robot control loop runs at --hz in its own process (as a robot stack would), talking to a
real actor daemon over the gRPC robot link: every step it reports the observation (a 64x64
camera image + state) and the executed action, and asks for a new action chunk every k steps.
Meanwhile the daemon's uploader streams the episodes, plus --background-mb of extra spooled
episodes, to an S3-protocol server. Prints one JSON object: the step-period deviation from the
nominal period (p50/p99/max, ms), with and without the background upload, and what was uploaded.
Target: p99 deviation < 5 ms at 30 Hz.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROBOT_LOOP = r"""
import json, sys, time
import numpy as np
from fleetloop.actor.link import RobotLinkClient
from fleetloop.policy.interface import Observation
address, hz, steps, k = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = RobotLinkClient(address, "jitter-robot", timeout_s=1.0, image_encoding="raw")
c.wait_ready()
rng = np.random.default_rng(0)
period, starts = 1.0 / hz, []
episode_steps = 300
t_next = time.perf_counter()
for t in range(steps):
    starts.append(time.perf_counter())
    if t % episode_steps == 0:
        if t:
            c.end_episode(1)
        c.start_episode("reach-v3", "reach the goal")
    obs = Observation(images={"front": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)},
                      state=rng.standard_normal(39).astype(np.float32))
    if t % k == 0:
        chunk = c.act(obs)
    c.report_step(obs, chunk[t % k], intervention=False)
    t_next += period
    time.sleep(max(0.0, t_next - time.perf_counter()))
c.end_episode(1)
# step-period deviation: |actual period - nominal period| between consecutive tick starts
print(json.dumps([abs(b - a - period) * 1000 for a, b in zip(starts, starts[1:])]))
"""


def add_arguments(p) -> None:
    p.add_argument("--hz", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=20.0, help="control-loop duration per phase")
    p.add_argument("--execute-steps", type=int, default=4, help="k: actions executed per chunk")
    p.add_argument("--background-mb", type=int, default=400, help="extra episodes to upload during the loaded phase")
    p.add_argument("--json", action="store_true")


def _pct(values, q):
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 3) if v else None


def run(args) -> int:
    import numpy as np
    import redis

    from fleetloop.actor.daemon import ActorDaemon
    from fleetloop.actor.recorder import EpisodeRecorder
    from fleetloop.actor.spool import Spool
    from fleetloop.actor.synthetic import synthetic_steps
    from fleetloop.buffer.store import S3Store
    from fleetloop.config import S3Settings
    from fleetloop.proto.v1 import episode_pb2 as pb
    from fleetloop.services import MotoS3Server, RedisServer

    class ZeroPolicy:
        version, horizon, action_dim = "v0", 8, 4

        def act(self, obs, instruction, indicator=None):
            return np.zeros((8, 4), np.float32)

    from fleetloop.actor.daemon import FixedPolicySource
    result: dict = {"hz": args.hz, "execute_steps": args.execute_steps}
    with MotoS3Server() as s3, RedisServer(appendonly=False) as rs, tempfile.TemporaryDirectory() as tmp:
        settings = S3Settings(endpoint_url=s3.endpoint, access_key="test", secret_key="test")
        client = redis.Redis.from_url(rs.url)
        spool = Spool(f"{tmp}/spool")
        daemon = ActorDaemon("jitter-robot", S3Store("jitter", "fleet", settings), client, spool,
                             FixedPolicySource(ZeroPolicy()), grpc_address="127.0.0.1:0").start()
        steps = int(args.seconds * args.hz)

        def loop() -> list[float]:
            out = subprocess.run([sys.executable, "-c", ROBOT_LOOP, daemon.address, str(args.hz), str(steps),
                                  str(args.execute_steps)], capture_output=True, text=True, timeout=args.seconds * 5 + 60,
                                 env=dict(os.environ))
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-2000:])
            return json.loads(out.stdout.strip().splitlines()[-1])

        quiet = loop()
        # Loaded phase: fill the spool with extra episodes (a robot catching up after an outage)
        # so the uploader is busy for the whole control run.
        filler = EpisodeRecorder(spool, "jitter-robot")
        rng = np.random.default_rng(1)
        for _ in range(max(1, args.background_mb // 2)):
            filler.start("filler-v0", "x", "v0", kind=pb.EPISODE_KIND_ROLLOUT)
            for step in synthetic_steps(rng, 2_000_000):
                filler.add_step(step)
            filler.end(pb.OUTCOME_SUCCESS)
        filler.flush(60)
        uploaded0, t0 = daemon.uploader.uploaded, time.perf_counter()
        loaded = loop()
        upload_s = time.perf_counter() - t0
        uploaded = daemon.uploader.uploaded - uploaded0
        daemon.stop(drain_timeout_s=1)
        for name, dev in (("quiet", quiet), ("uploading", loaded)):
            result[name] = {"steps": len(dev), "deviation_ms_p50": _pct(dev, 0.5), "deviation_ms_p99": _pct(dev, 0.99),
                            "deviation_ms_max": round(max(dev), 3) if dev else None}
        result["uploaded_during_loop"] = {"episodes": uploaded, "mb": round(uploaded * 2.0, 1),
                                          "mb_per_s": round(uploaded * 2.0 / upload_s, 1)}
        result["target_p99_ms"] = 5.0
        result["meets_target"] = bool(result["uploading"]["deviation_ms_p99"] is not None
                                      and result["uploading"]["deviation_ms_p99"] < 5.0)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
