"""`fleetloop bench rollout`: safe continuous deployment against a deliberately broken version.

A simulated fleet (threads, each a robot with a real PolicySlot on the real registry: pins, canary
and fleet pointer resolve exactly as on robots) runs a 1-D reaching task: the policy's action is
gain * (goal - x) plus noise, the episode succeeds if the point ends near the goal, and a simulated
human takes over when it drifts far away (the episode then counts as intervened: no autonomous
success). A learner stand-in publishes versions through PolicyRegistry.publish like the learner;
a BROKEN version has its action sign-flipped (negative gain), so it drifts away every time.

Episodes go through the real episode event: an EpisodeManifest (policy version, task, outcome,
intervention segments, steps) announced on the Redis episode stream with EpisodeAnnouncer (the
uploader's XADD, manifest copy in the event); the simulated robots skip the chunk objects, which
the gate never reads. The gate (fleetloop.release.rollout.GateService) follows that stream.

Phases, each on a fresh fleet:
  gate on:  good v1 (bootstrap) -> broken version -> good version (+ two more published while it
            is under test, to show batching)
  watch:    good v1 -> an operator promotes a broken version by hand: every robot runs it, and
            the watch after the promotion rolls the fleet back (`watch` in the JSON)
  gate off: the same broken and good versions pushed to every robot at once (SOP)

Prints one JSON object: broken_episodes_before_rollback, broken_reached_non_canary,
fleet_success_during_incident (non-canary, gate on) vs fleet_success_during_incident_sop,
good_promoted, good_delay_s vs good_delay_immediate_s, ...
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from fleetloop import config

TASKS = {"reach-near": 0.05, "reach-far": 0.08}  # task -> action noise (different base rates)


@dataclass
class SimPolicy:
    gain: float
    version: str = ""

    def act(self, x: float, goal: float, rng: random.Random, noise: float) -> float:
        return self.gain * (goal - x) + rng.gauss(0.0, noise)


def weights_for(gain: float) -> bytes:
    from safetensors.numpy import save
    return save({"gain": np.array([gain], np.float32)})


def load_policy(config_json: str, weights: bytes, version: str) -> SimPolicy:
    from safetensors.numpy import load
    return SimPolicy(float(load(weights)["gain"][0]), version)


@dataclass
class Episode:
    robot_id: str
    version: str
    task_id: str
    autonomous: bool
    intervened: bool
    started: float
    ended: float


def run_episode(policy: SimPolicy, task: str, rng: random.Random, steps: int = 30) -> tuple[bool, bool, int]:
    """(success, intervened, steps) of one episode of the 1-D reach task."""
    x, goal, noise = rng.uniform(-1.0, 1.0), 0.0, TASKS[task]
    intervened = False
    for _ in range(steps):
        if not intervened and abs(x - goal) > 2.0:
            intervened = True  # the simulated human takes over a robot that drifted away
        a = 0.5 * (goal - x) if intervened else policy.act(x, goal, rng, noise)
        x += float(np.clip(a, -0.5, 0.5))
    return abs(x - goal) < 0.1, intervened, steps


class SimRobot:
    def __init__(self, fleet: "SimFleet", robot_id: str, seed: int):
        from fleetloop.actor.weights import PolicySlot
        self.fleet, self.robot_id = fleet, robot_id
        self.rng = random.Random(seed)
        self.slot = PolicySlot(fleet.registry, robot_id, load_policy, poll_interval_s=0.5)
        self.thread = threading.Thread(target=self._run, name=f"sim-{robot_id}", daemon=True)

    def _heartbeat(self) -> None:
        r = self.fleet.redis
        pipe = r.pipeline()
        pipe.hset(config.HEARTBEAT_PREFIX + self.robot_id,
                  mapping={"status": json.dumps({"robot_id": self.robot_id, "last_seen_ns": time.time_ns(),
                                                 "policy_version": self.slot.current_version or ""})})
        pipe.sadd(config.HEARTBEAT_PREFIX + "all", self.robot_id)
        pipe.execute()

    def _run(self) -> None:
        from fleetloop.actor.weights import NoPolicyYet
        f = self.fleet
        last_hb = 0.0
        while not f.stop.is_set():
            if time.monotonic() - last_hb > 0.5:
                self._heartbeat()
                last_hb = time.monotonic()
            try:
                policy, version = self.slot.begin_episode()
            except NoPolicyYet:
                time.sleep(0.01)
                continue
            task = self.rng.choice(sorted(TASKS))
            t0 = time.monotonic()
            success, intervened, steps = run_episode(policy, task, self.rng)
            time.sleep(f.episode_s)  # the robot's episode takes time
            t1 = time.monotonic()
            f.record(Episode(self.robot_id, version, task, success and not intervened, intervened, t0, t1),
                     success, steps)


class SimFleet:
    """N simulated robots + a learner stand-in, on a given Redis and a file:// store."""

    def __init__(self, redis_client, store_dir: str, robots: int = 8, episode_s: float = 0.02, seed: int = 0):
        from fleetloop.buffer.queue import EpisodeAnnouncer
        from fleetloop.buffer.store import open_store
        from fleetloop.release.registry import PolicyRegistry
        self.redis = redis_client
        self.store = open_store(Path(store_dir).resolve().as_uri())
        self.registry = PolicyRegistry(self.store, redis_client)
        self.announcer = EpisodeAnnouncer(redis_client)
        self.episode_s = episode_s
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.episodes: list[Episode] = []
        self.published: dict[str, float] = {}   # version -> monotonic time of publish
        self.robots = [SimRobot(self, f"sim-{i:02d}", seed * 1000 + i) for i in range(robots)]

    def start(self) -> "SimFleet":
        for r in self.robots:
            r._heartbeat()
            r.slot.start()
            r.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        for r in self.robots:
            r.thread.join(5)
            r.slot.stop()

    def publish(self, gain: float, step: int = 0) -> str:
        m = self.registry.publish(weights_for(gain), json.dumps({"kind": "sim-reach"}), learner_step=step,
                                  algorithm="sim", metrics={"gain": gain})
        self.published[m.version] = time.monotonic()
        return m.version

    def record(self, ep: Episode, success: bool, steps: int) -> None:
        from fleetloop.buffer.codec import manifest_to_bytes
        from fleetloop.proto.v1 import episode_pb2 as pb
        eid = f"{ep.robot_id}-{uuid.uuid4().hex[:12]}"
        m = pb.EpisodeManifest(
            schema_version=1, episode_id=eid, robot_id=ep.robot_id, task_id=ep.task_id,
            instruction=f"move to the goal ({ep.task_id})", policy_version=ep.version,
            kind=pb.EPISODE_KIND_ROLLOUT, outcome=pb.OUTCOME_SUCCESS if success else pb.OUTCOME_FAILURE,
            outcome_source=pb.LABEL_SOURCE_ROBOT, started_ns=time.time_ns() - int((ep.ended - ep.started) * 1e9),
            ended_ns=time.time_ns(), num_steps=steps, action_dim=1, state_dim=1)
        if ep.intervened:
            m.interventions.add(start_step=1, end_step=steps, operator="sim-human", reason="drift")
        key = f"episodes/{ep.robot_id}/{eid}/manifest.json"
        self.announcer.announce(pb.EpisodeEvent(episode_id=eid, manifest_key=key, robot_id=ep.robot_id,
                                                task_id=ep.task_id, ended_ns=m.ended_ns, schema_version=1,
                                                manifest_json=manifest_to_bytes(m).decode()))
        with self.lock:
            self.episodes.append(ep)

    # -- measuring --------------------------------------------------------------------------
    def snapshot(self) -> list[Episode]:
        with self.lock:
            return list(self.episodes)

    def wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def all_started(self, version: str, since: float) -> Optional[float]:
        """When every robot had begun an episode with `version` (or newer) after `since`."""
        from fleetloop.release.registry import _seq
        first: dict[str, float] = {}
        for e in self.snapshot():
            if e.started >= since and _seq(e.version) >= _seq(version):
                first.setdefault(e.robot_id, e.started)
        if len(first) < len(self.robots):
            return None
        return max(first.values())


def rate(eps: list[Episode]) -> dict:
    from fleetloop.stats import wilson_interval
    k, n = sum(e.autonomous for e in eps), len(eps)
    lo, hi = wilson_interval(k, n)
    return {"rate": round(k / n, 4) if n else None, "n": n, "ci95": [round(lo, 4), round(hi, 4)]}


@contextlib.contextmanager
def gated_fleet(redis_client, store_dir: str, robots: int, episode_s: float, seed: int, settings, timeout: float):
    """A simulated fleet on good v1 with the gate running, once the gate has a reference on every
    task; yields (fleet, gate service, v1) and stops both after."""
    from fleetloop.release.rollout import GateService, RolloutSettings
    settings = settings or RolloutSettings(tick_s=0.05)
    fleet = SimFleet(redis_client, store_dir, robots=robots, episode_s=episode_s, seed=seed)
    gate = None
    try:
        v1 = fleet.publish(0.3, step=1)
        gate = GateService(fleet.registry, settings, store=fleet.store).start()
        fleet.start()
        fleet.wait(lambda: gate.gate.state()["baseline"] == v1, timeout, "bootstrap")
        # enough fleet-version evidence on every task for a reference
        fleet.wait(lambda: all(gate.book.tally(v1, t).known >= 3 * settings.min_baseline for t in TASKS),
                   timeout, "baseline evidence")
        yield fleet, gate, v1
    finally:
        if gate is not None:
            gate.stop()
        fleet.close()


def scenario_gate(redis_client, store_dir: str, robots: int = 8, episode_s: float = 0.02, seed: int = 0,
                  settings=None, timeout: float = 60.0) -> dict:
    """Gate on: good v1 -> broken -> good (+ versions published while it is tested)."""
    with gated_fleet(redis_client, store_dir, robots, episode_s, seed, settings, timeout) as (fleet, gate, v1):
        g = gate.gate
        # -- the incident: a broken version
        t_bad = time.monotonic()
        bad = fleet.publish(-0.3, step=2)
        fleet.wait(lambda: g.decided().get(bad) is not None, timeout, "a decision on the broken version")
        t_decided = time.monotonic()
        canary_decision = next(d for d in reversed(g.decisions(200)) if d["decision"] == "canary" and d["version"] == bad)
        canaries = set(canary_decision.get("robots") or [])
        # a robot swaps only between episodes: once none runs it, every broken episode is recorded
        fleet.wait(lambda: all(r.slot.current_version != bad for r in fleet.robots), timeout,
                   "canaries back on the fleet version")
        t_clean = time.monotonic()
        time.sleep(0.2)
        eps = fleet.snapshot()
        bad_eps = [e for e in eps if e.version == bad]
        incident = [e for e in eps if t_bad <= e.started <= t_clean and e.robot_id not in canaries]
        before = [e for e in eps if e.started < t_bad and e.version == v1]
        bad_decision = g.decided()[bad]

        # -- a good version, and two more published while it is under test (batching)
        t_good = time.monotonic()
        good = fleet.publish(0.3, step=3)
        fleet.wait(lambda: g.state()["candidate"] == good or g.decided().get(good), timeout, "good on the canaries")
        skipped = fleet.publish(0.3, step=4)
        newest = fleet.publish(0.3, step=5)
        fleet.wait(lambda: g.decided().get(good) is not None, timeout, "a decision on the good version")
        good_decision = g.decided()[good]
        fleet.wait(lambda: fleet.all_started(good, t_good) is not None, timeout, "the whole fleet on the good version")
        good_delay = fleet.all_started(good, t_good) - t_good
        fleet.wait(lambda: g.decided().get(newest) is not None, timeout, "a decision on the newest version")
        decisions = g.decisions(500)
        all_eps = fleet.snapshot()
        mean_ep = sum(e.ended - e.started for e in all_eps) / max(1, len(all_eps))
        return {
            "episode_mean_s": round(mean_ep, 4),
            "good_delay_episode_lengths": round(good_delay / mean_ep, 1) if mean_ep else None,
            "v1": v1, "broken": bad, "good": good, "skipped": skipped, "newest": newest,
            "canaries": sorted(canaries),
            "broken_decision": bad_decision,
            "broken_episodes_before_rollback": len(bad_eps),
            "broken_robots": sorted({e.robot_id for e in bad_eps}),
            "broken_reached_non_canary": len({e.robot_id for e in bad_eps} - canaries),
            "incident_s": round(t_clean - t_bad, 3),
            "fleet_success_before": rate(before),
            "fleet_success_during_incident": rate(incident),
            "fleet_versions_during_incident": sorted({e.version for e in incident}),
            "good_decision": good_decision,
            "good_promoted": good_decision == "promote",
            "good_delay_s": round(good_delay, 3),
            "skipped_was_candidate": any(d["decision"] == "canary" and d["version"] == skipped for d in decisions),
            "newest_decision": g.decided().get(newest),
            "candidate_episodes_to_promote": next((d["evidence"]["n"] for d in reversed(decisions)
                                                   if d["decision"] == "promote" and d["version"] == good
                                                   and d.get("evidence")), None),
            "decisions": [{k: d[k] for k in ("decision", "version", "by", "reason")} for d in decisions],
        }


def scenario_watch(redis_client, store_dir: str, robots: int = 8, episode_s: float = 0.02, seed: int = 2,
                   settings=None, timeout: float = 60.0) -> dict:
    """Gate on: an operator promotes a broken version by hand (or a lucky canary test let one
    through): every robot runs it, and the watch after the promotion rolls the fleet back."""
    with gated_fleet(redis_client, store_dir, robots, episode_s, seed, settings, timeout) as (fleet, gate, v1):
        g = gate.gate
        bad = fleet.publish(-0.3, step=2)
        t_bad = time.monotonic()
        g.manual_promote(bad, by="operator", reason="promoted by hand, untested")
        fleet.wait(lambda: g.decided().get(bad) not in (None, "promote"), timeout, "the watch's decision")
        t_decided = time.monotonic()
        fleet.wait(lambda: all(r.slot.current_version != bad for r in fleet.robots), timeout,
                   "every robot back on the replaced version")
        t_clean = time.monotonic()
        time.sleep(0.2)
        eps = fleet.snapshot()
        bad_eps = [e for e in eps if e.version == bad]
        rollback = next((d for d in reversed(g.decisions(200)) if d["version"] == bad and d["decision"] == "rollback"),
                        None)
        return {"v1": v1, "broken": bad, "decision": g.decided()[bad],
                "rolled_back_to": rollback.get("to") if rollback else None,
                "episodes_counted": rollback["evidence"]["n"] if rollback and rollback.get("evidence") else None,
                "broken_episodes": len(bad_eps), "broken_robots": len({e.robot_id for e in bad_eps}),
                "broken_success": rate(bad_eps),
                "decided_after_s": round(t_decided - t_bad, 3), "fleet_clean_after_s": round(t_clean - t_bad, 3),
                "pointer": fleet.registry.pointer()["version"]}


def scenario_sop(redis_client, store_dir: str, robots: int = 8, episode_s: float = 0.02, seed: int = 1,
                 broken_s: float = 1.0, timeout: float = 60.0) -> dict:
    """Gate off (every publish moves the fleet, as in SOP and the demo): the same versions."""
    fleet = SimFleet(redis_client, store_dir, robots=robots, episode_s=episode_s, seed=seed)
    try:
        v1 = fleet.publish(0.3, step=1)
        fleet.start()
        fleet.wait(lambda: fleet.all_started(v1, 0.0) is not None, timeout, "fleet on v1")
        time.sleep(0.5)
        t_bad = time.monotonic()
        bad = fleet.publish(-0.3, step=2)
        time.sleep(broken_s)  # an operator would need far longer to notice and roll back
        t_good = time.monotonic()
        good = fleet.publish(0.3, step=3)
        fleet.wait(lambda: fleet.all_started(good, t_good) is not None, timeout, "fleet on the good version")
        delay = fleet.all_started(good, t_good) - t_good
        eps = fleet.snapshot()
        return {"broken": bad, "broken_s": broken_s,
                "broken_episodes": sum(e.version == bad for e in eps),
                "fleet_success_during_incident": rate([e for e in eps if t_bad <= e.started < t_good]),
                "good_delay_s": round(delay, 3)}
    finally:
        fleet.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--robots", type=int, default=8)
    p.add_argument("--episode-s", type=float, default=0.02, help="wall time of one simulated episode")
    p.add_argument("--canary-fraction", type=float, default=0.25)
    p.add_argument("--margin", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redis", default=None, help="Redis URL (default: a private redis-server)")
    p.add_argument("--json", action="store_true", help="(always JSON; accepted for symmetry)")
    p.add_argument("--verbose", action="store_true", help="include the decision log")


def run(args) -> int:
    import redis as redis_lib

    from fleetloop.release.rollout import RolloutSettings
    from fleetloop.services import RedisServer
    server = None
    url = args.redis
    if url is None:
        server = RedisServer().start()
        url = server.url
    try:
        client = redis_lib.Redis.from_url(url)
        settings = RolloutSettings(canary_fraction=args.canary_fraction, margin=args.margin, tick_s=0.05)
        with tempfile.TemporaryDirectory(prefix="fleetloop-rollout-") as tmp:
            client.flushdb()
            gated = scenario_gate(client, f"{tmp}/gate", robots=args.robots, episode_s=args.episode_s,
                                  seed=args.seed, settings=settings)
            client.flushdb()
            watch = scenario_watch(client, f"{tmp}/watch", robots=args.robots, episode_s=args.episode_s,
                                   seed=args.seed + 2, settings=settings)
            client.flushdb()
            sop = scenario_sop(client, f"{tmp}/sop", robots=args.robots, episode_s=args.episode_s,
                               seed=args.seed + 1)
        out = {
            "robots": args.robots, "episode_s": args.episode_s, "settings": settings.as_dict(),
            "canaries": gated["canaries"],
            "broken_episodes_before_rollback": gated["broken_episodes_before_rollback"],
            "broken_reached_non_canary": gated["broken_reached_non_canary"],
            "broken_decision": gated["broken_decision"],
            "incident_s": gated["incident_s"],
            "fleet_success_before": gated["fleet_success_before"],
            "fleet_success_during_incident": gated["fleet_success_during_incident"],
            "fleet_success_during_incident_sop": sop["fleet_success_during_incident"],
            "broken_episodes_sop": sop["broken_episodes"], "broken_s_sop": sop["broken_s"],
            "good_promoted": gated["good_promoted"],
            "good_delay_s": gated["good_delay_s"],
            "good_delay_immediate_s": sop["good_delay_s"],
            "good_delay_ratio": round(gated["good_delay_s"] / sop["good_delay_s"], 2) if sop["good_delay_s"] else None,
            "candidate_episodes_to_promote": gated["candidate_episodes_to_promote"],
            "episode_mean_s": gated["episode_mean_s"],
            "good_delay_episode_lengths": gated["good_delay_episode_lengths"],
            "batching": {"published_during_test": gated["skipped"], "tested": gated["skipped_was_candidate"],
                         "newest": gated["newest"], "newest_decision": gated["newest_decision"]},
            "watch": {k: watch[k] for k in ("decision", "rolled_back_to", "episodes_counted", "broken_episodes",
                                            "broken_robots", "broken_success", "decided_after_s",
                                            "fleet_clean_after_s")},
        }
        if args.verbose:
            out["decisions"] = gated["decisions"]
        print(json.dumps(out))
        return 0 if (out["good_promoted"] and out["broken_reached_non_canary"] == 0
                     and watch["decision"] == "rollback") else 1
    finally:
        if server is not None:
            server.stop()
