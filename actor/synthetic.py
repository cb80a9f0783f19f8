"""A synthetic robot: records episodes of random bytes through the real actor pipeline
(recorder -> spool -> uploader -> store -> Redis). Used by `fleetloop bench ingest` and the
fault tests (run as a process: `python -m fleetloop.actor.synthetic ...`, so it can be killed)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np
import redis

from fleetloop.actor.recorder import EpisodeRecorder
from fleetloop.actor.spool import Spool
from fleetloop.actor.uploader import Uploader, recover_unsealed
from fleetloop.buffer.store import open_store
from fleetloop.proto.v1 import episode_pb2 as pb


def synthetic_steps(rng: np.random.Generator, episode_bytes: int, steps: int = 50, state_dim: int = 39,
                    action_dim: int = 4, noise: bytes | None = None):
    """Steps whose raw 'camera images' add up to about episode_bytes. Pixels are slices of a
    block of random bytes (`noise`, made once per robot: a camera costs the pipeline nothing
    to produce), so every episode's bytes differ but generating them is not what we measure."""
    per_step = max(3, episode_bytes // steps)
    side = int(np.sqrt(per_step / 3))
    n = side * side * 3
    if noise is None or len(noise) < n + 4096:
        noise = rng.bytes(n + 4096)
    for t in range(steps):
        offset = int(rng.integers(0, len(noise) - n))
        yield pb.Step(images=[pb.Image(camera="front", encoding="raw", height=side, width=side, channels=3,
                                       data=noise[offset:offset + n])],
                      state=rng.standard_normal(state_dim).astype(np.float32).tolist(),
                      action=rng.uniform(-1, 1, action_dim).astype(np.float32).tolist(),
                      intervention=10 <= t < 15)


class SyntheticActor:
    def __init__(self, robot_id: str, store_uri: str, redis_url: str, spool_dir: str,
                 spool_max_bytes: int = 4 * 1024 ** 3, chunk_bytes: int = 1 << 20):
        self.robot_id = robot_id
        self.spool = Spool(spool_dir, max_bytes=spool_max_bytes)
        recover_unsealed(self.spool)
        self.recorder = EpisodeRecorder(self.spool, robot_id, chunk_steps=1000, chunk_bytes=chunk_bytes)
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
        self.uploader = Uploader(self.spool, open_store(store_uri), self.client)
        self.stop = threading.Event()
        self.thread = self.uploader.start_thread(self.stop)
        self.dropped: list[str] = []   # episodes the spool refused (full): not in the ids file

    def record(self, episodes: int, episode_bytes: int, seed: int = 0, task_id: str = "synthetic-v0",
               on_end=None) -> list[str]:
        rng = np.random.default_rng(seed)
        noise = rng.bytes(episode_bytes // 50 + 8192)
        ids = []
        for _ in range(episodes):
            self.recorder.start(task_id, "do the synthetic thing", "v000000")
            for step in synthetic_steps(rng, episode_bytes, noise=noise):
                self.recorder.add_step(step)
            episode_id, _n = self.recorder.end(pb.OUTCOME_SUCCESS, pb.LABEL_SOURCE_ROBOT, "synthetic")
            if on_end:
                self.recorder.flush()  # report only what is durable in the spool
                if self.recorder.was_dropped(episode_id):
                    self.dropped.append(episode_id)  # the spool refused it: never committed
                    continue
                on_end(episode_id)
            ids.append(episode_id)
        if not on_end:  # the same rule for the returned ids: only what the spool holds
            self.recorder.flush()
            self.dropped.extend(e for e in ids if self.recorder.was_dropped(e))
            ids = [e for e in ids if not self.recorder.was_dropped(e)]
        return ids

    def wait_drained(self, timeout: float = 120.0) -> bool:
        self.recorder.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.spool.sealed() and not self.spool.unsealed():
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--robot-id", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--redis", required=True)
    p.add_argument("--spool", required=True)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--episode-kb", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ids-file", help="append each ended episode id here (one per line)")
    p.add_argument("--drain-only", action="store_true", help="only upload what the spool holds, then exit")
    p.add_argument("--start-key", help="wait until this Redis key exists before recording (a start barrier)")
    p.add_argument("--interval-s", type=float, default=0.0, help="pace: one episode per interval")
    p.add_argument("--spool-max-mb", type=float, default=4096.0, help="the spool's byte budget")
    p.add_argument("--dropped-file", help="append each episode the spool dropped here")
    a = p.parse_args(argv)
    actor = SyntheticActor(a.robot_id, a.store, a.redis, a.spool, spool_max_bytes=int(a.spool_max_mb * 1e6))
    if a.start_key:
        actor.client.sadd(a.start_key + ":ready", a.robot_id)
        while not actor.client.exists(a.start_key):
            time.sleep(0.005)
    if not a.drain_only:
        def note(eid):
            if a.ids_file:
                with open(a.ids_file, "a") as f:
                    f.write(eid + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        start = time.perf_counter()
        for k in range(a.episodes):
            if a.interval_s:
                time.sleep(max(0.0, start + k * a.interval_s - time.perf_counter()))
            actor.record(1, a.episode_kb * 1024, seed=a.seed * 100_003 + k, on_end=note)
    ok = actor.wait_drained()
    actor.close()
    if a.dropped_file and actor.dropped:
        with open(a.dropped_file, "a") as f:
            f.write("".join(e + "\n" for e in actor.dropped))
    print(json.dumps({"uploaded": actor.uploader.uploaded, "drained": ok, "dropped": len(actor.dropped)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
