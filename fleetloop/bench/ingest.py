"""`fleetloop bench ingest`: N synthetic robots push episodes through the real episode path
(recorder -> spool -> uploader -> S3 protocol -> Redis stream -> consumer -> index) against a
local S3-protocol server (moto, its own process) and a private Redis on loopback.

Prints one JSON object. `efficiency` compares the pipeline's end-to-end MB/s with plain
concurrent boto3 put_object of the same bytes to the same server, measured in the same run.
"""
from __future__ import annotations

import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis

from fleetloop.buffer.consumer import DataConsumer
from fleetloop.buffer.index import FrameIndex
from fleetloop.buffer.store import S3Store
from fleetloop.config import S3Settings
from fleetloop.services import MotoS3Server, RedisServer


def add_arguments(p) -> None:
    p.add_argument("--robots", type=int, default=8)
    p.add_argument("--episodes", type=int, default=400, help="total across all robots")
    p.add_argument("--episode-mb", type=float, default=2.0)
    p.add_argument("--json", action="store_true", help="print only the JSON object")


def raw_put_rate(settings: S3Settings, robots: int, episodes: int, episode_bytes: int) -> float:
    store = S3Store("bench-raw", "", settings)
    payload = bytes(bytearray(range(256)) * (episode_bytes // 256 + 1))[:episode_bytes]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(robots) as pool:
        list(pool.map(lambda i: store._client.put_object(Bucket="bench-raw", Key=f"raw/{i}", Body=payload),
                      range(episodes)))
    return episodes * episode_bytes / 1e6 / (time.perf_counter() - t0)


def pipeline_phase(rs_url: str, settings: S3Settings, tmp: str, robots: int, per_robot: list[int],
                   episode_bytes: int, bucket: str, interval_s: float = 0.0) -> dict:
    """Run `robots` synthetic actors, each its own process (a robot is its own machine), through
    the whole path until every episode is indexed. interval_s > 0 paces each robot to one
    episode per interval (a sustainable load)."""
    import os
    import subprocess
    import sys
    client = redis.Redis.from_url(rs_url)
    index = FrameIndex()
    consumer = DataConsumer(S3Store(bucket, "fleet", settings), client, index)
    stop = threading.Event()
    consumer_thread = consumer.start_thread(stop)
    start_key = f"bench:{bucket}:go"
    procs, id_files = [], []
    for r in range(robots):
        ids = f"{tmp}/{bucket}-ids-{r}.txt"
        id_files.append(ids)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fleetloop.actor.synthetic", "--robot-id", f"robot-{r}",
             "--store", f"s3://{bucket}/fleet", "--redis", rs_url, "--spool", f"{tmp}/{bucket}-spool-{r}",
             "--episodes", str(per_robot[r]), "--episode-kb", str(episode_bytes // 1024), "--seed", str(r),
             "--ids-file", ids, "--start-key", start_key, "--interval-s", str(interval_s)],
            env=dict(os.environ), stdout=subprocess.DEVNULL))
    deadline = time.monotonic() + 120  # every robot process has started and waits at the barrier
    while time.monotonic() < deadline and client.scard(start_key + ":ready") < robots:
        time.sleep(0.05)
    t0 = time.perf_counter()
    client.set(start_key, "1")
    for p in procs:
        p.wait(timeout=900)
    expected = set()
    for f in id_files:
        if os.path.exists(f):
            expected |= set(open(f).read().split())
    deadline = time.monotonic() + 600
    while len(index) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    stop.set()
    consumer_thread.join(5)
    indexed = [e.episode_id for e in index.episodes()]
    return {"elapsed": elapsed, "expected": expected, "indexed": indexed, "stats": consumer.stats.as_dict(),
            "exit_codes": [p.returncode for p in procs]}


def run(args) -> int:
    import os
    episode_bytes = int(args.episode_mb * 1e6)
    per_robot = [args.episodes // args.robots + (1 if r < args.episodes % args.robots else 0) for r in range(args.robots)]
    with MotoS3Server() as s3, RedisServer(appendonly=False) as rs, tempfile.TemporaryDirectory() as tmp:
        settings = S3Settings(endpoint_url=s3.endpoint, access_key="test", secret_key="test")
        os.environ.update(s3.env())
        raw = raw_put_rate(settings, args.robots, args.episodes, episode_bytes)
        # Phase 1, throughput: every robot records as fast as it can.
        burst = pipeline_phase(rs.url, settings, tmp, args.robots, per_robot, episode_bytes, "bench-burst")
        total_mb = len(burst["expected"]) * episode_bytes / 1e6
        mb_per_s = total_mb / burst["elapsed"]
        # Phase 2, freshness: the same fleet paced at half the throughput just measured, so the
        # figure is pipeline latency, not time spent queued behind a backlog.
        paced_rate = 0.5 * len(burst["indexed"]) / burst["elapsed"]
        paced_n = [max(2, n // 4) for n in per_robot]  # a quarter of the episodes, paced
        paced = pipeline_phase(rs.url, settings, tmp, args.robots, paced_n, episode_bytes, "bench-paced",
                               interval_s=args.robots / paced_rate)
        lost = len(burst["expected"] - set(burst["indexed"])) + len(paced["expected"] - set(paced["indexed"]))
        dups = (len(burst["indexed"]) - len(set(burst["indexed"]))) + (len(paced["indexed"]) - len(set(paced["indexed"])))
        result = {
            "robots": args.robots, "episodes": len(burst["expected"]), "episode_mb": args.episode_mb,
            "elapsed_s": round(burst["elapsed"], 3),
            "episodes_per_s": round(len(burst["indexed"]) / burst["elapsed"], 2),
            "mb_per_s": round(mb_per_s, 2),
            "raw_put_mb_per_s": round(raw, 2),
            "efficiency": round(mb_per_s / raw, 3),
            "freshness_p50_s": round(paced["stats"]["freshness_p50_s"] or 0, 4),
            "freshness_p99_s": round(paced["stats"]["freshness_p99_s"] or 0, 4),
            "freshness_load_episodes_per_s": round(paced_rate, 2),
            "freshness_episodes": len(paced["expected"]),
            "burst_freshness_p99_s": round(burst["stats"]["freshness_p99_s"] or 0, 4),
            "lost": lost,
            "duplicates": dups,
            "redeliveries_absorbed": burst["stats"]["duplicates"] + paced["stats"]["duplicates"],
            "dead_lettered": burst["stats"]["dead_lettered"] + paced["stats"]["dead_lettered"],
        }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 else 1
