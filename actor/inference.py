"""Asynchronous inference on the robot: compute the next action chunk while the robot executes
the current one, so a policy slower than one control period never stalls the control loop.

One `InferenceScheduler` per daemon, one background inference thread. Per open episode it holds
the *current chunk* -- computed from the observation of episode step t0, so row j is the action
for step t0 + j -- and at most one inference in flight. The daemon feeds it every ReportStep
(the step counter: the robot is at step t = number of steps reported) and every Act.

Act at step t (async mode):
  * first Act of the episode (nothing to execute yet): compute synchronously from its observation;
  * fast policy (recent latency under `inline_below_ms`, 5 ms): compute inline from the Act's
    observation -- the freshest one, at the cost of a few ms inside one control tick; the
    background is only worth it when inference costs a large part of a control period;
  * otherwise adopt the newest finished background chunk, and return the rows of the current chunk
    from step t on (skip t - t0 rows: never an action for a past step). If none remain (the policy
    fell more than H steps behind) wait for the in-flight inference when its rows still reach step
    t, else compute synchronously; both count as a stall.

Launching: after every Act and ReportStep, when the newest chunk has no more than
`expected latency in steps + lead_steps` rows left for the coming steps (latency: p90 of recent
inference times; the step period: mean spacing of ReportStep calls, `control_hz` until
measured), or when it is `replan_steps - latency` steps old (optional: fresh chunks every
`replan_steps`, like a synchronous broker re-planning every k), start one inference on the newest
observation the robot sent (Act or ReportStep; decoded only then, on the background thread).

The policy's act() is never called concurrently: the background thread and a synchronous
compute on a gRPC thread take the same lock. Policies swap only at StartEpisode (PolicySlot):
`begin_episode` starts a new generation and whatever is still in flight from the previous episode
is discarded when it finishes.

Sync mode (`mode="sync"`): every Act computes from its own observation and returns all H rows --
the behaviour before asynchronous inference.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from fleetloop.buffer.codec import decode_image
from fleetloop.policy.interface import Observation, Policy

log = logging.getLogger(__name__)

MODES = ("async", "sync")


def _cameras_read(policy) -> Optional[tuple]:
    """The cameras a policy that states its spec reads (None: it does not say, decode all)."""
    from fleetloop.actor.contract import Spec
    spec = Spec.of(policy)
    return spec.cameras if spec.known else None


class BadObservation(ValueError):
    """The robot sent an observation that cannot be decoded (a bad image)."""


def observation_from_proto(obs, cameras=None) -> Observation:
    """fleetloop.v1.Observation -> Observation (decodes the images; with `cameras`, only those:
    a ReportStep may carry cameras recorded for training that the policy never reads)."""
    try:
        images = {img.camera or f"cam{i}": decode_image(img) for i, img in enumerate(obs.images)
                  if cameras is None or img.camera in cameras}
    except (ValueError, OSError) as e:
        raise BadObservation(f"bad observation image: {e}") from e
    return Observation(images=images, state=np.asarray(obs.state, dtype=np.float32))


@dataclass
class InferenceSettings:
    mode: str = "async"            # "async" | "sync"
    lead_steps: int = 2            # async: safety margin (steps) on top of the expected latency
    replan_steps: Optional[int] = None  # async: also refresh the chunk every this many steps
    inline_below_ms: float = 5.0   # async: a policy faster than this runs inline on Act (see _inline)
    control_hz: float = 30.0       # assumed control rate until ReportStep spacing is measured
    window: int = 64               # samples kept for the latency / period / age statistics

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"inference mode must be one of {MODES}, got {self.mode!r}")
        if self.lead_steps < 0 or self.control_hz <= 0 or self.window < 1:
            raise ValueError("lead_steps must be >= 0, control_hz > 0, window >= 1")
        if self.replan_steps is not None and self.replan_steps < 1:
            raise ValueError("replan_steps must be >= 1 or None")


@dataclass
class Chunk:
    actions: np.ndarray  # [H, A]
    t0: int              # episode step of the observation it was computed from: row j is for step t0 + j
    used: bool = False

    @property
    def end(self) -> int:  # first step this chunk has no action for
        return self.t0 + self.actions.shape[0]


@dataclass
class Served:
    """What Act returns: `actions[0]` is for episode step `first_step`."""
    actions: np.ndarray  # [n, A], n <= horizon
    horizon: int
    first_step: int
    chunk_step: int      # the step of the observation the chunk was computed from (<= first_step)
    source: str          # "first" | "sync" | "inline" | "chunk" | "stall"


@dataclass
class _Episode:
    gen: int
    episode_id: str
    policy: Policy
    instruction: str
    indicator: Optional[bool]
    cameras: Optional[tuple] = None        # what the policy decodes (_cameras_read; None: all)
    step: int = 0                          # steps reported: the robot's current step
    current: Optional[Chunk] = None
    ready: Optional[Chunk] = None          # finished in the background, not served yet
    inflight_t0: Optional[int] = None      # observation step of the inference in flight
    newest_obs: Optional[tuple] = None     # (step, proto Observation), decoded only when launched
    last_launched_step: int = -1
    last_report: Optional[float] = None


@dataclass
class _Job:
    gen: int
    policy: Policy
    instruction: str
    indicator: Optional[bool]
    obs_proto: object
    t0: int
    cameras: Optional[tuple] = None


def _pct(values, q) -> Optional[float]:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else None


@dataclass
class InferenceCounters:
    chunks_computed: int = 0     # successful policy.act calls (background and synchronous)
    chunks_used: int = 0         # chunks whose rows were returned to the robot
    chunks_discarded: int = 0    # finished but never used (superseded, or from a previous episode)
    sync_computes: int = 0       # computed on the Act call itself (first Act, inline, stall, sync mode)
    stalls: int = 0              # async: an Act found no row for its step and had to wait on inference
    errors: int = 0              # background inferences that failed


class InferenceScheduler:
    def __init__(self, settings: Optional[InferenceSettings] = None):
        self.settings = settings or InferenceSettings()
        self._cv = threading.Condition()
        self._policy_lock = threading.Lock()
        self._ep: Optional[_Episode] = None
        self._gen = 0
        self._job: Optional[_Job] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        w = self.settings.window
        self._latency_s: collections.deque = collections.deque(maxlen=w)
        self._periods_s: collections.deque = collections.deque(maxlen=w)
        self._ages: collections.deque = collections.deque(maxlen=w)
        self.counters = InferenceCounters()

    @property
    def mode(self) -> str:
        return self.settings.mode

    def set_mode(self, mode: str) -> None:
        """Switch async/sync (takes effect from the next Act; meant for between episodes)."""
        if mode not in MODES:
            raise ValueError(f"inference mode must be one of {MODES}, got {mode!r}")
        with self._cv:
            self.settings.mode = mode

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "InferenceScheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="inference", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- episodes ----------------------------------------------------------------------------
    def begin_episode(self, episode_id: str, policy: Policy, instruction: str, indicator: Optional[bool]) -> None:
        cameras = _cameras_read(policy)  # once per episode, not on every policy call
        with self._cv:
            self._drop_episode()
            self._gen += 1
            self._ep = _Episode(self._gen, episode_id, policy, instruction, indicator, cameras)

    def end_episode(self, episode_id: str) -> None:
        with self._cv:
            if self._ep is not None and self._ep.episode_id == episode_id:
                self._drop_episode()
                s = self.status()
                log.info("inference (%s): latency p50 %s ms p99 %s ms, chunks computed %d used %d discarded %d, "
                         "stalls %d, chunk age p50 %s steps", s["mode"], s["latency_ms_p50"], s["latency_ms_p99"],
                         s["chunks_computed"], s["chunks_used"], s["chunks_discarded"], s["stalls"],
                         s["chunk_age_steps_p50"])

    def _drop_episode(self) -> None:
        ep = self._ep
        if ep is not None:
            if ep.ready is not None:
                self.counters.chunks_discarded += 1
            if self._job is not None and self._job.gen == ep.gen:  # queued, not started: never run it
                self._job = None
                self.counters.chunks_discarded += 1
        self._ep = None
        self._cv.notify_all()

    def _episode(self, episode_id: str) -> _Episode:
        ep = self._ep
        if ep is None or ep.episode_id != episode_id:
            raise KeyError(episode_id)
        return ep

    # -- the robot's calls -------------------------------------------------------------------
    def on_step(self, episode_id: str, obs_proto) -> int:
        """A ReportStep: the step's observation becomes the newest one; the robot moves on to the
        next step. Returns the new step index. Never blocks on inference."""
        now = time.monotonic()
        with self._cv:
            ep = self._ep
            if ep is None or ep.episode_id != episode_id:
                return 0
            if ep.last_report is not None:
                self._periods_s.append(now - ep.last_report)
            ep.last_report = now
            if ep.newest_obs is None or ep.newest_obs[0] <= ep.step:
                ep.newest_obs = (ep.step, obs_proto)
            ep.step += 1
            self._maybe_launch(ep)
            return ep.step

    def act(self, episode_id: str, obs_proto) -> Served:
        """Rows for the robot's current step on. Raises KeyError (episode not open here),
        BadObservation, or the policy's ValueError."""
        s = self.settings
        with self._cv:
            ep = self._episode(episode_id)
            t = ep.step
            ep.newest_obs = (t, obs_proto)  # the freshest observation there is
            if s.mode == "sync":
                source = "sync"
            elif ep.current is None and ep.ready is None:
                source = "first"
            elif self._inline():
                source = "inline"
            else:
                self._adopt(ep, t)
                if ep.current is not None and ep.current.end > t:
                    served = self._serve(ep, t, "chunk")
                    self._maybe_launch(ep)
                    return served
                self.counters.stalls += 1
                source = "stall"
                ep.last_launched_step = max(ep.last_launched_step, t)  # not this observation twice
                # the policy fell behind by more than H steps: wait for the one in flight if its
                # rows reach this step, else compute now
                while (ep.inflight_t0 is not None and self._ep is ep and not self._stop.is_set()
                       and ep.inflight_t0 + self._horizon_hint(ep) > t):
                    self._cv.wait(0.5)
                if self._ep is not ep:
                    raise KeyError(episode_id)
                self._adopt(ep, t)
                if ep.current is not None and ep.current.end > t:
                    served = self._serve(ep, t, "stall")
                    self._maybe_launch(ep)
                    return served
            gen, policy, instruction, indicator, cameras = ep.gen, ep.policy, ep.instruction, ep.indicator, ep.cameras
            ep.last_launched_step = max(ep.last_launched_step, t)  # computed here: not again in the background
        chunk = self._compute(policy, instruction, indicator, obs_proto, cameras)  # raises to the caller
        with self._cv:
            self.counters.sync_computes += 1
            if self._ep is None or self._ep.gen != gen:
                raise KeyError(episode_id)
            ep = self._ep
            new = Chunk(chunk, t)
            if ep.ready is not None and ep.ready.t0 <= t:
                ep.ready = None
                self.counters.chunks_discarded += 1
            ep.current = new
            served = self._serve(ep, ep.step, source)
            self._maybe_launch(ep)
            return served

    # -- internals (call with self._cv held unless said otherwise) -------------------------------
    def _horizon_hint(self, ep: _Episode) -> int:
        c = ep.current or ep.ready
        return c.actions.shape[0] if c is not None else 1

    def _adopt(self, ep: _Episode, t: int) -> None:
        r = ep.ready
        if r is not None and (ep.current is None or r.t0 > ep.current.t0):
            ep.ready = None
            if ep.current is not None and not ep.current.used:
                self.counters.chunks_discarded += 1
            ep.current = r
            self._ages.append(t - r.t0)

    def _serve(self, ep: _Episode, t: int, source: str) -> Served:
        c = ep.current
        if not c.used:
            c.used = True
            self.counters.chunks_used += 1
        rows = c.actions[t - c.t0:]
        return Served(rows, c.actions.shape[0], t, c.t0, source)

    def _inline(self) -> bool:
        """Fast policy: the least of the last 8 latencies is under inline_below_ms. The minimum,
        not a percentile: scheduling noise on a busy machine only ever adds latency, and one
        noisy sample must not flip a 0.1 ms policy out of inline mode (or a 100 ms one into it)."""
        recent = list(self._latency_s)[-8:]
        return bool(recent) and min(recent) * 1000.0 < self.settings.inline_below_ms

    def period_s(self) -> float:
        """The robot's control period: the mean spacing of recent ReportStep calls (a mean, not a
        median: a loop that catches up after a late tick keeps its average rate), ignoring gaps
        over a second (an operator's pause); `control_hz` until there are a few."""
        gaps = [p for p in self._periods_s if p < 1.0]
        return sum(gaps) / len(gaps) if len(gaps) >= 3 and sum(gaps) > 0 else 1.0 / self.settings.control_hz

    def expected_latency_steps(self) -> int:
        p90 = _pct(self._latency_s, 0.9)
        return int(math.ceil(p90 / self.period_s())) if p90 is not None else 1

    def _maybe_launch(self, ep: _Episode) -> None:
        s = self.settings
        if s.mode != "async" or ep.inflight_t0 is not None or ep.newest_obs is None or self._inline():
            return
        base = ep.ready if ep.ready is not None else ep.current
        if base is None:
            return  # before the first Act: it computes synchronously
        obs_step, obs_proto = ep.newest_obs
        if obs_step <= max(base.t0, ep.last_launched_step):
            return  # nothing newer to compute from
        latency = self.expected_latency_steps()
        remaining = base.end - ep.step
        due = remaining <= latency + s.lead_steps
        if s.replan_steps is not None:
            due = due or ep.step - base.t0 >= s.replan_steps - latency
        if not due:
            return
        ep.inflight_t0 = obs_step
        ep.last_launched_step = obs_step
        self._job = _Job(ep.gen, ep.policy, ep.instruction, ep.indicator, obs_proto, obs_step, ep.cameras)
        self._cv.notify_all()

    def _compute(self, policy: Policy, instruction: str, indicator, obs_proto, cameras=None) -> np.ndarray:
        """Decode (only `cameras`, None: all) and run the policy (no self._cv held). One policy
        call at a time."""
        with self._policy_lock:
            t0 = time.perf_counter()
            obs = observation_from_proto(obs_proto, cameras)
            chunk = np.asarray(policy.act(obs, instruction, indicator), dtype=np.float32)
            dt = time.perf_counter() - t0
        if chunk.ndim != 2 or chunk.shape[0] < 1:
            raise ValueError(f"policy {getattr(policy, 'version', '?')!r} returned a chunk of shape {chunk.shape}, "
                             "expected [H, A]")
        with self._cv:
            self._latency_s.append(dt)
            self.counters.chunks_computed += 1
        return chunk

    def _worker(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                while self._job is None and not self._stop.is_set():
                    self._cv.wait(0.5)
                job, self._job = self._job, None
            if job is None:
                continue
            chunk, err = None, None
            try:
                chunk = self._compute(job.policy, job.instruction, job.indicator, job.obs_proto, job.cameras)
            except Exception as e:  # noqa: BLE001 -- reported; the next Act computes synchronously
                err = e
            with self._cv:
                ep = self._ep
                if ep is None or ep.gen != job.gen:
                    self.counters.chunks_discarded += chunk is not None
                else:
                    ep.inflight_t0 = None
                    if err is not None:
                        self.counters.errors += 1
                        log.warning("background inference failed (step %d): %s", job.t0, err)
                    else:
                        newest = ep.ready if ep.ready is not None else ep.current
                        if newest is not None and newest.t0 >= job.t0:
                            self.counters.chunks_discarded += 1
                        else:
                            if ep.ready is not None:
                                self.counters.chunks_discarded += 1
                            ep.ready = Chunk(chunk, job.t0)
                        self._maybe_launch(ep)
                self._cv.notify_all()

    # -- what the heartbeat shows --------------------------------------------------------------
    def status(self) -> dict:
        with self._cv:
            lat = [x * 1000.0 for x in self._latency_s]
            c = self.counters

            def r(x, nd=2):
                return round(x, nd) if x is not None else None
            return {
                "mode": self.settings.mode, "inline": self._inline() if self.settings.mode == "async" else False,
                "latency_ms_p50": r(_pct(lat, 0.5)), "latency_ms_p90": r(_pct(lat, 0.9)),
                "latency_ms_p99": r(_pct(lat, 0.99)),
                "chunks_computed": c.chunks_computed, "chunks_used": c.chunks_used,
                "chunks_discarded": c.chunks_discarded, "sync_computes": c.sync_computes,
                "stalls": c.stalls, "errors": c.errors,
                "chunk_age_steps_p50": _pct(self._ages, 0.5), "chunk_age_steps_max": max(self._ages, default=None),
                "control_period_ms": r(self.period_s() * 1000.0), "expected_latency_steps": self.expected_latency_steps(),
                "lead_steps": self.settings.lead_steps, "in_flight": bool(self._ep and self._ep.inflight_t0 is not None),
            }
