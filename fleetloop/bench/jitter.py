"""`fleetloop bench jitter`: does recording and uploading disturb the robot's control loop?

A robot control loop runs at --hz in its own process (as a robot stack would), talking to a
real actor daemon over the gRPC robot link: every step it reports the observation (a 64x64
camera image + state) and the executed action. It executes the time-aligned rows the daemon
returns as a queue and asks again after k executed rows or when the queue runs out. Meanwhile
the daemon's uploader streams the episodes, plus --background-mb of extra spooled episodes, to an
S3-protocol server. Prints one JSON object: the step-period deviation from the nominal period
(p50/p99/max, ms), with and without the background upload, what was uploaded, the robot-side Act
call times and the daemon's inference timing. Target: p99 deviation < 5 ms at 30 Hz.

--policy-latency-ms makes the bench policy sleep that long per chunk (a stand-in for a GPU VLA);
with --inference async (the default) the daemon computes the next chunk in the background, with
sync every Act waits for it. --compare-sync also runs sync mode and adds it under "sync". The
first Act of each episode is computed before the robot's loop starts ticking (the robot stands
still at episode start, as in SimRobot), so it is not counted as a control tick.
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
period, dev, act_ms = 1.0 / hz, [], []
episode_steps = 300


def observe():
    return Observation(images={"front": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)},
                       state=rng.standard_normal(39).astype(np.float32))


for t in range(steps):
    if t % episode_steps == 0:
        if t:
            c.end_episode(1)
        c.start_episode("reach-v3", "reach the goal")
        obs = observe()
        queue, since = list(c.act(obs)), 0  # the episode's first chunk: before the loop ticks
        prev, t_next = None, time.perf_counter()
    else:
        obs = observe()
    now = time.perf_counter()
    if prev is not None:  # |actual period - nominal period| between consecutive tick starts
        dev.append(abs(now - prev - period) * 1000)
    prev = now
    if not queue or since >= k:  # ask after k executed rows, or when the rows run out
        a = time.perf_counter()
        queue, since = list(c.act(obs)), 0
        act_ms.append((time.perf_counter() - a) * 1000)
    c.report_step(obs, queue.pop(0), intervention=False)
    since += 1
    t_next += period
    time.sleep(max(0.0, t_next - time.perf_counter()))
c.end_episode(1)
print(json.dumps({"deviation_ms": dev, "act_ms": act_ms}))
"""


def add_arguments(p) -> None:
    p.add_argument("--hz", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=20.0, help="control-loop duration per phase")
    p.add_argument("--execute-steps", type=int, default=4, help="k: actions executed per chunk")
    p.add_argument("--background-mb", type=int, default=400, help="extra episodes to upload during the loaded phase")
    p.add_argument("--policy-latency-ms", type=float, default=0.0,
                   help="the bench policy sleeps this long per chunk (a stand-in for a GPU VLA)")
    p.add_argument("--horizon", type=int, default=16, help="H: actions per chunk of the bench policy")
    p.add_argument("--inference", choices=("async", "sync"), default="async", help="the daemon's inference mode")
    p.add_argument("--compare-sync", action="store_true", help="also run --inference sync; adds \"sync\" to the JSON")
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

    horizon, latency_s = args.horizon, args.policy_latency_ms / 1000.0

    class SleepPolicy:  # zeros after a sleep: the latency of a real VLA without its compute
        version, action_dim = "v0", 4

        def __init__(self):
            self.horizon = horizon

        def act(self, obs, instruction, indicator=None):
            if latency_s:
                time.sleep(latency_s)
            return np.zeros((horizon, 4), np.float32)

    from fleetloop.actor.daemon import FixedPolicySource
    modes = [args.inference] + (["sync"] if args.compare_sync and args.inference != "sync" else [])
    result: dict = {"hz": args.hz, "execute_steps": args.execute_steps, "horizon": horizon,
                    "policy_latency_ms": args.policy_latency_ms, "inference_mode": args.inference}
    with MotoS3Server() as s3, RedisServer(appendonly=False) as rs, tempfile.TemporaryDirectory() as tmp:
        settings = S3Settings(endpoint_url=s3.endpoint, access_key="test", secret_key="test")
        client = redis.Redis.from_url(rs.url)
        steps = int(args.seconds * args.hz)
        rng = np.random.default_rng(1)

        def run_mode(mode: str) -> dict:
            spool = Spool(f"{tmp}/spool-{mode}")
            daemon = ActorDaemon("jitter-robot", S3Store("jitter", "fleet", settings), client, spool,
                                 FixedPolicySource(SleepPolicy()), grpc_address="127.0.0.1:0", inference=mode,
                                 control_hz=args.hz).start()

            def loop() -> dict:
                out = subprocess.run([sys.executable, "-c", ROBOT_LOOP, daemon.address, str(args.hz), str(steps),
                                      str(args.execute_steps)], capture_output=True, text=True,
                                     timeout=args.seconds * 5 + 60, env=dict(os.environ))
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-2000:])
                return json.loads(out.stdout.strip().splitlines()[-1])

            out: dict = {}
            try:
                quiet = loop()
                # Loaded phase: fill the spool with extra episodes (a robot catching up after an
                # outage) so the uploader is busy for the whole control run.
                filler = EpisodeRecorder(spool, "jitter-robot")
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
                inference = daemon.inference.status()
            finally:
                daemon.stop(drain_timeout_s=1)
            for name, r in (("quiet", quiet), ("uploading", loaded)):
                dev, act = r["deviation_ms"], r["act_ms"]
                out[name] = {"steps": len(dev) + 1, "deviation_ms_p50": _pct(dev, 0.5),
                             "deviation_ms_p99": _pct(dev, 0.99), "deviation_ms_max": round(max(dev), 3) if dev else None,
                             "act_calls": len(act), "act_ms_p50": _pct(act, 0.5), "act_ms_p99": _pct(act, 0.99),
                             "act_ms_max": round(max(act), 3) if act else None}
            out["uploaded_during_loop"] = {"episodes": uploaded, "mb": round(uploaded * 2.0, 1),
                                           "mb_per_s": round(uploaded * 2.0 / upload_s, 1)}
            out["inference"] = {k: inference[k] for k in (
                "mode", "inline", "latency_ms_p50", "latency_ms_p99", "chunks_computed", "chunks_used",
                "chunks_discarded", "sync_computes", "stalls", "chunk_age_steps_p50", "chunk_age_steps_max",
                "control_period_ms", "expected_latency_steps")}
            out["meets_target"] = bool(out["uploading"]["deviation_ms_p99"] is not None
                                       and out["uploading"]["deviation_ms_p99"] < 5.0)
            return out

        result.update(run_mode(modes[0]))
        result["target_p99_ms"] = 5.0
        for mode in modes[1:]:
            result[mode] = run_mode(mode)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
