"""`fleetloop bench fleet`: how many robots one cloud side holds, and what grows with the fleet.

Per fleet size, on fresh servers: moto's S3 server (HTTP, its own process), a private Redis, a
cloud process (the learner's data side: DataConsumer(s) in the consumer group -> a bounded
FrameIndex -> a BufferSampler drawing batches the whole time, as the learner would), and robot
processes. Each synthetic robot records at `--hz` with one camera frame of `--frame-kb`
(incompressible bytes, the size of a compressed frame) per step; when an episode ends it does
what the uploader does after the spool: PUT its chunks, PUT the manifest (commit), XADD the
event. Robots start at random phases so ends are spread like a real fleet's.

Prints one JSON object: `sizes`, one entry per fleet size with robots, offered and ingested
episodes/s and MB/s, freshness p50/p99 (episode end -> indexed), queue lag (max, final), replay
RSS and index size, Redis memory, consumer CPU per episode, sampler throughput while ingesting,
per-process CPU, lost and duplicates; then `saturation`: the first size whose ingest fell behind
and the resource that ran out first.

Time is scaled: episodes last `--episode-s` (default 10 s instead of about a minute) so a run of a
minute or two sees several per robot; per-robot data rates (hz x frame size) are the real ones.
The JSON says so (`time_scaled`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

MACHINE_CORES = os.cpu_count() or 1


def add_arguments(p) -> None:
    p.add_argument("--robots", default="1,10,50,200", help="fleet sizes, comma-separated")
    p.add_argument("--minutes", type=float, default=1.0, help="recording time per fleet size")
    p.add_argument("--hz", type=float, default=30.0)
    p.add_argument("--frame-kb", type=float, default=15.0, help="one compressed camera frame")
    p.add_argument("--episode-s", type=float, default=10.0, help="episode length (real ones: ~60 s)")
    p.add_argument("--chunk-mb", type=float, default=8.0, help="robot chunk size (one PUT each)")
    p.add_argument("--consumers", type=int, default=1, help="consumers in the group (cloud side)")
    p.add_argument("--buffer-frames", type=int, default=100_000, help="bounded online buffer (frames)")
    p.add_argument("--robot-procs", type=int, default=2, help="processes the robots are spread over")
    p.add_argument("--drain-s", type=float, default=90.0, help="max wait for the backlog after recording")
    p.add_argument("--json", action="store_true")
    # internal roles
    p.add_argument("--role", choices=["main", "robots", "cloud"], default="main", help=argparse_hidden())
    p.add_argument("--redis", help=argparse_hidden())
    p.add_argument("--store", help=argparse_hidden())
    p.add_argument("--robot-ids", help=argparse_hidden())
    p.add_argument("--until", type=float, help=argparse_hidden())
    p.add_argument("--out", help=argparse_hidden())


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


# ---- helpers ------------------------------------------------------------------------------------

def _cpu_s(pid: int) -> float:
    """utime + stime of a process (and its reaped children) in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / tick
    except (OSError, IndexError, ValueError):
        return 0.0


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine (/proc/stat), all users' work included."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def _rss_mb(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _pct(values, q):
    v = sorted(x for x in values if x is not None)
    return round(v[min(len(v) - 1, int(q * len(v)))], 4) if v else None


# ---- robots -------------------------------------------------------------------------------------

def robots_main(args) -> int:
    """Robots as threads in one process: each records episodes at its pace and commits them."""
    import redis

    from fleetloop.buffer.codec import commit_episode, encode_chunk, manifest_to_bytes
    from fleetloop.buffer.queue import EpisodeAnnouncer
    from fleetloop.buffer.store import open_store
    from fleetloop.proto.v1 import SCHEMA_VERSION
    from fleetloop.proto.v1 import episode_pb2 as pb

    store = open_store(args.store)
    client = redis.Redis.from_url(args.redis, socket_timeout=30)
    announcer = EpisodeAnnouncer(client)
    ids = args.robot_ids.split(",")
    steps = max(1, int(round(args.hz * args.episode_s)))
    frame = int(args.frame_kb * 1024)
    side = max(1, int((frame / 3) ** 0.5))
    frame = side * side * 3
    per_chunk = max(1, int(args.chunk_mb * 1e6 // (frame + 200)))
    committed: list[str] = []
    upload_s: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = time.time()

    def robot(robot_id: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        noise = rng.bytes(frame * 4)
        phase = rng.uniform(0, args.episode_s)
        n = 0
        while True:
            t_start = start + phase + n * args.episode_s - args.episode_s  # the first ends at phase
            t_end = t_start + args.episode_s
            if t_end > args.until:
                return
            time.sleep(max(0.0, t_end - time.time()))
            eid = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(max(t_start, start)))}-{robot_id}-{n:05d}"
            state = rng.standard_normal((steps, 39)).astype(np.float32)
            act = np.tanh(state[:, :4])
            step_msgs = []
            for t in range(steps):
                off = (t * 7919) % (len(noise) - frame)
                step_msgs.append(pb.Step(index=t, timestamp_ns=int((t_start + t / args.hz) * 1e9),
                                         state=state[t], action=act[t], intervention=10 <= t < 40,
                                         images=[pb.Image(camera="front", encoding="raw", height=side,
                                                          width=side, channels=3,
                                                          data=noise[off:off + frame])]))
            chunks = [(encode_chunk(eid, i // per_chunk, step_msgs[i:i + per_chunk]), len(step_msgs[i:i + per_chunk]))
                      for i in range(0, steps, per_chunk)]
            ended_ns = int(t_end * 1e9)
            m = pb.EpisodeManifest(schema_version=SCHEMA_VERSION, episode_id=eid, robot_id=robot_id,
                                   task_id=f"task-{seed % 3}", instruction=f"do task {seed % 3}",
                                   policy_version="v000001", kind=pb.EPISODE_KIND_ROLLOUT,
                                   outcome=pb.OUTCOME_SUCCESS, outcome_source=pb.LABEL_SOURCE_ROBOT,
                                   started_ns=int(t_start * 1e9), ended_ns=ended_ns, num_steps=steps,
                                   state_dim=39, action_dim=4, cameras=["front"])
            m.interventions.add(start_step=10, end_step=min(40, steps))
            t0 = time.perf_counter()
            for attempt in range(20):  # the uploader retries until the cloud takes it
                try:
                    key = commit_episode(store, m, chunks)
                    announcer.announce(pb.EpisodeEvent(
                        episode_id=eid, manifest_key=key, robot_id=robot_id, task_id=m.task_id,
                        ended_ns=ended_ns, schema_version=SCHEMA_VERSION,
                        manifest_json=manifest_to_bytes(m).decode()))
                    break
                except Exception:  # noqa: BLE001
                    with lock:
                        errors[0] += 1
                    time.sleep(min(5.0, 0.1 * 2 ** attempt))
            else:
                n += 1
                continue
            with lock:
                committed.append(eid)
                upload_s.append(time.perf_counter() - t0)
            n += 1

    threads = [threading.Thread(target=robot, args=(rid, int(rid.rsplit("-", 1)[1])), daemon=True) for rid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(args.out, "w") as f:
        json.dump({"committed": committed, "upload_p50_s": _pct(upload_s, 0.5), "upload_p99_s": _pct(upload_s, 0.99),
                   "errors": errors[0], "frame_bytes": frame, "steps": steps,
                   "chunks_per_episode": -(-steps // per_chunk)}, f)
    return 0


# ---- the cloud side -----------------------------------------------------------------------------

def cloud_main(args) -> int:
    """DataConsumer(s) -> bounded FrameIndex -> BufferSampler, until told to stop and drained."""
    import redis

    from fleetloop.buffer.consumer import DataConsumer
    from fleetloop.buffer.index import BufferLimits, FrameIndex
    from fleetloop.buffer.sampler import BufferSampler, SamplerConfig
    from fleetloop.buffer.store import open_store

    client = redis.Redis.from_url(args.redis, socket_timeout=30)
    store = open_store(args.store)
    index = FrameIndex(BufferLimits(max_frames=args.buffer_frames))
    seen: set[str] = set()
    dups = [0]
    lock = threading.Lock()

    def on_indexed(entry) -> None:
        with lock:
            if entry.episode_id in seen:
                dups[0] += 1
            seen.add(entry.episode_id)

    cpu_ready = time.process_time()  # imports and set-up are not per-episode costs
    consumers = [DataConsumer(store, client, index, consumer_name=f"cloud-{i}", on_indexed=on_indexed,
                              fetch_workers=4) for i in range(args.consumers)]
    stop = threading.Event()
    threads = [c.start_thread(stop) for c in consumers]
    sampled = {"frames": 0, "batches": 0, "cpu_s": 0.0, "busy_s": 0.0}

    def sample_loop() -> None:
        sampler = BufferSampler(index, SamplerConfig(refresh_s=1.0), encode=lambda s: np.zeros(384, np.float32))
        c0 = time.thread_time()
        while not stop.is_set():
            t0 = time.perf_counter()
            b = sampler.sample(256)
            if b is None:
                time.sleep(0.05)
                continue
            sampled["busy_s"] += time.perf_counter() - t0
            sampled["frames"] += 256
            sampled["batches"] += 1
            time.sleep(0.01)  # a learner step's worth of pause between batches
        sampled["cpu_s"] = time.thread_time() - c0

    st = threading.Thread(target=sample_loop, daemon=True)
    st.start()
    t_start = time.perf_counter()
    rss_max = 0.0
    while not client.exists("bench:stop"):
        rss_max = max(rss_max, _rss_mb())
        time.sleep(0.5)
    expected = int(client.get("bench:stop"))
    deadline = time.monotonic() + args.drain_s
    while len(seen) < expected and time.monotonic() < deadline:
        rss_max = max(rss_max, _rss_mb())
        time.sleep(0.1)
    elapsed = time.perf_counter() - t_start
    rss_end = _rss_mb()
    stop.set()
    for t in threads:
        t.join(10)
    st.join(10)
    cpu = time.process_time() - cpu_ready
    fresh = [x for c in consumers for x in c.stats.freshness_s]
    out = {"indexed_ids": sorted(seen), "duplicates": dups[0], "too_old_ids": list(index.too_old_ids),
           "redeliveries_absorbed": sum(c.stats.duplicates for c in consumers),
           "dead_lettered": sum(c.stats.dead_lettered for c in consumers),
           "per_consumer_indexed": [c.stats.indexed for c in consumers],
           "freshness_p50_s": _pct(fresh, 0.5), "freshness_p99_s": _pct(fresh, 0.99),
           "process_cpu_s": cpu, "sampler_cpu_s": sampled["cpu_s"], "elapsed_s": elapsed,
           "sampled_frames": sampled["frames"], "sampler_busy_s": sampled["busy_s"],
           "rss_mb": round(rss_end, 1), "rss_max_mb": round(rss_max, 1), "index": index.stats()}
    out["index"].pop("tasks", None)
    with open(args.out, "w") as f:
        json.dump(out, f)
    return 0


# ---- the driver ---------------------------------------------------------------------------------

def one_size(args, robots: int, tmp: str) -> dict:
    import redis

    from fleetloop.config import S3Settings
    from fleetloop.services import MotoS3Server, RedisServer

    with MotoS3Server() as s3, RedisServer(appendonly=False) as rs:
        env = {**os.environ, **s3.env()}
        settings = S3Settings(endpoint_url=s3.endpoint, access_key="test", secret_key="test")
        from fleetloop.buffer.store import S3Store
        S3Store("fleet", "", settings)  # create the bucket once
        store_uri = "s3://fleet/fleet"
        client = redis.Redis.from_url(rs.url)
        base = [sys.executable, "-m", "fleetloop.cli", "bench", "fleet"]
        common = ["--redis", rs.url, "--store", store_uri, "--hz", str(args.hz), "--frame-kb", str(args.frame_kb),
                  "--episode-s", str(args.episode_s), "--chunk-mb", str(args.chunk_mb)]
        cloud_out = f"{tmp}/cloud-{robots}.json"
        cloud = subprocess.Popen(base + ["--role", "cloud", "--out", cloud_out, "--consumers", str(args.consumers),
                                         "--buffer-frames", str(args.buffer_frames), "--drain-s",
                                         str(args.drain_s)] + common, env=env)
        time.sleep(3.0)  # the cloud side is up before the fleet
        until = time.time() + 2.0 + args.minutes * 60
        nprocs = max(1, min(args.robot_procs, robots))
        groups = [[f"robot-{r}" for r in range(robots) if r % nprocs == p] for p in range(nprocs)]
        robot_outs = [f"{tmp}/robots-{robots}-{p}.json" for p in range(nprocs)]
        procs = [subprocess.Popen(base + ["--role", "robots", "--robot-ids", ",".join(g), "--until", str(until),
                                          "--out", o] + common, env=env) for g, o in zip(groups, robot_outs)]
        pids = {"s3": s3.proc.pid, "redis": rs.proc.pid, "cloud": cloud.pid}
        cpu0 = {k: _cpu_s(p) for k, p in pids.items()}
        rob0 = sum(_cpu_s(p.pid) for p in procs)
        m0 = _machine_busy()
        t0 = time.monotonic()
        lag, redis_mem = [], []
        while any(p.poll() is None for p in procs):
            try:
                g = [x for x in client.xinfo_groups("fleetloop:episodes") if x["name"] in (b"learner", "learner")]
                lag.append(int((g[0].get("lag") or 0) + (g[0].get("pending") or 0)) if g else 0)
                redis_mem.append(int(client.info("memory")["used_memory"]))
            except redis.RedisError:
                pass
            rob_cpu = sum(_cpu_s(p.pid) for p in procs)  # sampled while they live
            time.sleep(1.0)
        record_s = time.monotonic() - t0
        m1 = _machine_busy()
        machine_busy = (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
        cpu_rec = {k: _cpu_s(p) - cpu0[k] for k, p in pids.items()}
        cpu_rec["robots"] = rob_cpu - rob0
        robot_res = [json.load(open(o)) for o in robot_outs]
        committed = [e for r in robot_res for e in r["committed"]]
        client.set("bench:stop", str(len(committed)))
        t_drain = time.monotonic()
        while cloud.poll() is None:
            try:
                g = [x for x in client.xinfo_groups("fleetloop:episodes") if x["name"] in (b"learner", "learner")]
                lag.append(int((g[0].get("lag") or 0) + (g[0].get("pending") or 0)) if g else 0)
                redis_mem.append(int(client.info("memory")["used_memory"]))
                cpu_rec["cloud_total"] = _cpu_s(cloud.pid) - cpu0["cloud"]
            except redis.RedisError:
                pass
            time.sleep(0.5)
        drain_s = time.monotonic() - t_drain
        cloud_res = json.load(open(cloud_out))
        final_lag = lag[-1] if lag else 0
        redis_used = int(client.info("memory")["used_memory"])
    indexed = set(cloud_res["indexed_ids"])
    too_old = set(cloud_res["too_old_ids"]) - indexed
    r0 = robot_res[0]
    ep_mb = r0["steps"] * (r0["frame_bytes"] + 200) / 1e6
    n_idx = len(indexed & set(committed))
    consumer_cpu = cloud_res["process_cpu_s"] - cloud_res["sampler_cpu_s"]
    busy = {k: round(v / record_s / MACHINE_CORES, 3) for k, v in cpu_rec.items() if k in ("s3", "redis", "cloud", "robots")}
    offered = robots / args.episode_s
    return {
        "robots": robots,
        "offered_episodes_per_s": round(offered, 3),
        "episodes": len(committed),
        "episodes_per_s": round(n_idx / (record_s + drain_s), 3),
        "episodes_per_s_while_recording": round(len(committed) / record_s, 3),
        "mb_per_s": round(n_idx * ep_mb / (record_s + drain_s), 2),
        "offered_mb_per_s": round(offered * ep_mb, 2),
        "episode_mb": round(ep_mb, 2),
        "freshness_p50_s": cloud_res["freshness_p50_s"],
        "freshness_p99_s": cloud_res["freshness_p99_s"],
        "robot_upload_p50_s": r0["upload_p50_s"],
        "queue_lag_max": max(lag) if lag else 0,
        "queue_lag_final": final_lag,
        "drain_s": round(drain_s, 1),
        "replay_rss_mb": cloud_res["rss_mb"],
        "replay_rss_max_mb": cloud_res["rss_max_mb"],
        "index_online_frames": cloud_res["index"]["online_frames"],
        "index_mb": round(cloud_res["index"]["bytes"] / 1e6, 2),
        "evicted_episodes": cloud_res["index"]["evicted"],
        "redis_used_mb": round(redis_used / 1e6, 2),
        "redis_used_max_mb": round(max(redis_mem + [redis_used]) / 1e6, 2),
        "consumer_cpu_ms_per_episode": round(1e3 * consumer_cpu / max(1, n_idx), 2),
        "sampler_frames_per_s": round(cloud_res["sampled_frames"] / max(1e-9, cloud_res["elapsed_s"]), 1),
        "sampler_batch_ms": round(1e3 * cloud_res["sampler_busy_s"] / max(1, cloud_res["sampled_frames"] / 256), 2),
        "cpu_share_while_recording": busy,
        "machine_cpu_busy_while_recording": round(machine_busy, 3),
        "s3_requests_per_episode": {"put": r0["chunks_per_episode"] + 1,
                                    "get": r0["chunks_per_episode"] * 1},
        "per_consumer_indexed": cloud_res["per_consumer_indexed"],
        "robot_upload_errors": sum(r["errors"] for r in robot_res),
        "delivered_but_older_than_buffer": len(too_old & set(committed)),
        "lost": len(set(committed) - indexed - too_old),
        "duplicates": cloud_res["duplicates"] + (len(committed) - len(set(committed))),
        "redeliveries_absorbed": cloud_res["redeliveries_absorbed"],
        "dead_lettered": cloud_res["dead_lettered"],
    }


def saturation(sizes: list[dict], episode_s: float) -> dict:
    """The first size that fell behind: freshness p99 beyond one episode length (a backlog is
    building), or a drain after recording longer than 10 s."""
    for s in sizes:
        behind = (s["freshness_p99_s"] or 0) > episode_s or s["drain_s"] > 10 or s["lost"] > 0
        if behind:
            busy = s["cpu_share_while_recording"]
            top = max(busy, key=busy.get)
            m = s["machine_cpu_busy_while_recording"]
            first = "cpu" if m > 0.85 else "s3-server latency"
            return {"robots": s["robots"], "first_exhausted": first,
                    "why": (f"{MACHINE_CORES} cores {100 * m:.0f}% busy (all processes on the machine); "
                            f"of it fleetloop's: {', '.join(f'{k} {100 * v:.0f}%' for k, v in busy.items())}; "
                            f"largest: {top}. Robot upload p50 {s['robot_upload_p50_s']} s for a "
                            f"{s['episode_mb']} MB episode: the S3 server (moto, one Python process) "
                            "answers slower as concurrent PUTs grow"),
                    "cpu_share": busy}
    return {"robots": None, "why": "no size tested fell behind"}


def run(args) -> int:
    if args.role == "robots":
        return robots_main(args)
    if args.role == "cloud":
        return cloud_main(args)
    sizes = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in str(args.robots).split(",") if x.strip()]:
            sizes.append(one_size(args, n, tmp))
            if not args.json:
                print(json.dumps(sizes[-1]), file=sys.stderr)
    result = {
        "benchmark": "fleet", "machine_cores": MACHINE_CORES, "minutes_per_size": args.minutes,
        "hz": args.hz, "frame_kb": args.frame_kb, "episode_s": args.episode_s,
        "time_scaled": args.episode_s < 60,
        "time_scale_note": (f"episodes last {args.episode_s:g} s instead of about 60 s so a short run sees "
                            f"several per robot; per-robot data rate ({args.hz:g} Hz x {args.frame_kb:g} KB) "
                            "is the real one") if args.episode_s < 60 else "",
        "consumers": args.consumers, "buffer_frames": args.buffer_frames, "chunk_mb": args.chunk_mb,
        "sizes": sizes, "saturation": saturation(sizes, args.episode_s),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if all(s["lost"] == 0 and s["duplicates"] == 0 for s in sizes) else 1
