"""The actor daemon: the one fleetloop process on a robot.

  robot control stack --gRPC RobotLink--> RobotLinkService --> EpisodeRecorder --> Spool
                                                      |                              |
                               PolicySlot (weights, swap at episode start)      Uploader --> store + Redis
  dashboard --Redis control channel--> ControlListener (takeover / release / pause / resume)
  Heartbeat --> Redis hash fleetloop:robot:<id> (what the dashboard shows)

The robot side stays thin: the daemon serves action chunks from whichever policy the slot
holds and records what the robot reports. With inference="async" (the default) the next chunk is
computed in the background while the robot executes the current one, and Act answers with the
rows of the newest chunk from the robot's current step on (fleetloop.actor.inference,
docs/robot-inference.md); inference="sync" computes every chunk on the Act call. Every call is answered without waiting on the
network; a robot that goes silent mid-episode gets its episode closed as incomplete by the
watchdog instead of leaving it open forever.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import grpc
import redis

from fleetloop import config
from fleetloop.actor.contract import DecodeBudget, LinkLimits, Rejected, Spec, StepChecker, check_id, check_text, short
from fleetloop.actor.inference import BadObservation, InferenceScheduler, InferenceSettings
from fleetloop.actor.recorder import EpisodeRecorder
from fleetloop.actor.spool import Spool
from fleetloop.actor.uploader import Uploader, recover_unsealed
from fleetloop.buffer.store import ObjectStore
from fleetloop.ingest import LocalWrites, robot_writes
from fleetloop.ingest import Refused as WriteRefused
from fleetloop.release.guidance import INDICATOR_SETTINGS, Guidance
from fleetloop.policy.interface import Policy
from fleetloop.proto.v1 import episode_pb2 as pb
from fleetloop.proto.v1 import policy_pb2
from fleetloop.proto.v1 import robot_link_pb2 as rl
from fleetloop.proto.v1 import robot_link_pb2_grpc as rl_grpc
from google.protobuf import json_format

log = logging.getLogger(__name__)


class FixedPolicySource:
    """A policy source that never changes (tests, offline robots). The real one is
    fleetloop.actor.weights.PolicySlot; both offer begin_episode() -> (policy, version)."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def begin_episode(self):
        return self.policy, str(self.policy.version)

    def next_policy(self):
        return self.begin_episode()  # a fixed policy: the next episode's is this one

    @property
    def current_policy(self) -> Policy:
        return self.policy

    def status(self) -> dict:
        return {"current_version": str(self.policy.version), "pending_version": None}

    def start(self):
        pass

    def stop(self):
        pass


@dataclass
class OpenEpisode:
    episode_id: str
    task_id: str
    instruction: str
    policy: Optional[Policy]   # None: a demonstration recorded before any policy was loaded
    policy_version: str
    checker: StepChecker
    last_call: float = field(default_factory=time.monotonic)
    intervening: bool = False
    intervention_steps: int = 0  # > 0 at the end: the episode counts in counters.intervention_episodes
    step_lock: threading.Lock = field(default_factory=threading.Lock)  # check + record of one step


@dataclass
class RobotCounters:
    episodes: int = 0
    successes: int = 0
    failures: int = 0
    incomplete: int = 0
    intervention_episodes: int = 0
    steps: int = 0
    intervention_steps: int = 0


def _abort(context, e: Rejected):
    context.abort(getattr(grpc.StatusCode, e.code), str(e))


class RobotLinkService(rl_grpc.RobotLinkServicer):
    """The gRPC face of the daemon. Errors are gRPC status codes with a short message that says
    what was wrong (docs/robot-link.md lists them): INVALID_ARGUMENT for bad input (nothing of
    the call is recorded; the episode stays open), FAILED_PRECONDITION for calls out of order
    (no episode open, the episode already ended, Act on a demonstration without a policy),
    NOT_FOUND for an episode id this robot never had open, OUT_OF_RANGE when the episode is
    full, UNAVAILABLE when no policy is loaded yet for a rollout."""

    def __init__(self, daemon: "ActorDaemon"):
        self.d = daemon

    def _episode(self, episode_id: str, context) -> OpenEpisode:
        ep = self.d.open_episode
        if ep is not None and ep.episode_id == episode_id:  # the hot path: the open episode's id is valid
            ep.last_call = time.monotonic()
            return ep
        try:
            check_text("episode_id", episode_id, self.d.limits.max_id_bytes, required=True)
        except Rejected as e:
            _abort(context, e)
        if episode_id in self.d.ended_episodes:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"episode {episode_id} has ended" + (f"; the open episode is {ep.episode_id}" if ep else ""))
        if ep is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"no episode is open on this robot (episode {short(episode_id)}): call StartEpisode first")
        context.abort(grpc.StatusCode.NOT_FOUND,
                      f"episode {short(episode_id)} is not open on this robot; the open episode is {ep.episode_id}")

    def StartEpisode(self, request, context):
        lim = self.d.limits
        try:
            if request.robot_id:
                check_text("robot_id", request.robot_id, lim.max_id_bytes)
                if request.robot_id != self.d.robot_id:
                    raise Rejected(f"this daemon serves robot {self.d.robot_id}, not {short(request.robot_id)}")
            check_id("task_id", request.task_id, lim)
            check_text("instruction", request.instruction, lim.max_instruction_bytes)
            if request.kind not in pb.EpisodeKind.values():
                raise Rejected(f"kind {request.kind} is not an EpisodeKind")
        except Rejected as e:
            _abort(context, e)
        kind = request.kind or pb.EPISODE_KIND_ROLLOUT
        demonstration = kind == pb.EPISODE_KIND_DEMONSTRATION
        with self.d.lock:
            if self.d.open_episode is not None:  # the robot restarted without ending: keep what we had
                self.d.close_open_episode(incomplete=True, why="a new episode started before EndEpisode")
            try:
                policy, version = self.d.policy_source.begin_episode()  # the only place weights swap
            except RuntimeError as e:  # e.g. nothing published yet: the robot should retry later
                if not demonstration:  # a human drives a demonstration: no policy needed
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"{e}; demonstrations can be recorded meanwhile")
                policy, version = None, ""
            # A demonstration was not produced by a policy: its manifest says "" (episode.proto).
            episode_id = self.d.recorder.start(request.task_id, request.instruction,
                                               "" if demonstration else version, kind=kind)
            checker = StepChecker(Spec.of(policy), lim, self.d.decode_budget)
            self.d.open_episode = OpenEpisode(episode_id, request.task_id, request.instruction, policy, version,
                                              checker)
            if policy is not None:
                # indicator None: the policy's own (its version's published guidance, or the
                # robot's override: fleetloop.release.runtime.PolicyLoader)
                self.d.inference.begin_episode(episode_id, policy, request.instruction, None)
        return rl.StartEpisodeResponse(episode_id=episode_id, policy_version=version)

    def Act(self, request, context):
        ep = self._episode(request.episode_id, context)
        if ep.policy is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"episode {ep.episode_id} is a demonstration recorded before any policy was loaded: "
                          "there are no actions to serve (report the demonstrator's actions with ReportStep)")
        try:  # checked, and its decoded size held in the daemon's budget until answered
            with ep.checker.admit(request.observation, for_act=True, timeout_s=context.time_remaining()):
                # time-aligned rows of the newest chunk (or a fresh one: first Act, sync mode, stall)
                served = self.d.inference.act(ep.episode_id, request.observation)
        except Rejected as e:
            _abort(context, e)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"episode {request.episode_id!r} ended during the call")
        except BadObservation as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)[:200])
        except ValueError as e:  # e.g. wrong state dimension for a policy that does not state its spec
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"policy rejected the observation: {str(e)[:200]}")
        rows = served.actions
        return rl.ActResponse(horizon=served.horizon, action_dim=rows.shape[1], actions=rows.ravel().tolist(),
                              rows=rows.shape[0], first_step=served.first_step, chunk_step=served.chunk_step,
                              policy_version=ep.policy_version, takeover_requested=self.d.takeover_requested,
                              paused=self.d.paused)

    def ReportStep(self, request, context):
        ep = self._episode(request.episode_id, context)
        with ep.step_lock:  # checked against the episode's shape, then recorded, one step at a time
            try:
                shape = ep.checker.check_step(request)
            except Rejected as e:
                _abort(context, e)
            step = pb.Step(images=request.observation.images, state=request.observation.state,
                           action=request.action, policy_chunk=request.policy_chunk,
                           intervention=request.intervention or ep.intervening, reward=request.reward)
            with self.d.lock:
                if self.d.open_episode is not ep:  # closed (watchdog, new StartEpisode) during the check
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"episode {ep.episode_id} has ended")
                # a segment the flag alone opens is named by the step's operator ("unknown" if none)
                self.d.recorder.add_step(step, operator=request.operator or "unknown", reason="unspecified")
                n = self.d.recorder.num_steps
                ep.intervention_steps += int(step.intervention)
                ep.checker.accept(shape, request.ByteSize())
        self.d.inference.on_step(ep.episode_id, request.observation)  # step count; may start an inference
        self.d.counters.steps += 1
        self.d.counters.intervention_steps += int(step.intervention)
        return rl.ReportStepResponse(steps_recorded=n, takeover_requested=self.d.takeover_requested,
                                     paused=self.d.paused)

    def BeginIntervention(self, request, context):
        ep = self._episode(request.episode_id, context)
        try:
            check_text("operator", request.operator, self.d.limits.max_text_bytes)
            check_text("reason", request.reason, self.d.limits.max_text_bytes)
        except Rejected as e:
            _abort(context, e)
        ep.intervening = True
        with self.d.lock:
            if self.d.open_episode is ep:
                self.d.recorder.annotate_intervention(request.operator or "unknown", request.reason or "unspecified")
        return rl.InterventionResponse(intervening=True)

    def EndIntervention(self, request, context):
        ep = self._episode(request.episode_id, context)
        ep.intervening = False
        self.d.takeover_requested = False  # the human handed back: the request is served
        return rl.InterventionResponse(intervening=False)

    def EndEpisode(self, request, context):
        ep = self._episode(request.episode_id, context)
        try:
            check_text("labelled_by", request.labelled_by, self.d.limits.max_text_bytes)
            if request.outcome not in pb.Outcome.values():
                raise Rejected(f"outcome {request.outcome} is not an Outcome")
            if request.outcome_source not in pb.LabelSource.values():
                raise Rejected(f"outcome_source {request.outcome_source} is not a LabelSource")
        except Rejected as e:
            _abort(context, e)
        with self.d.lock:
            if self.d.open_episode is not ep:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"episode {ep.episode_id} has ended")
            episode_id, n, spooled = self.d.close_open_episode(
                outcome=request.outcome, source=request.outcome_source or pb.LABEL_SOURCE_ROBOT,
                labelled_by=request.labelled_by)
        return rl.EndEpisodeResponse(episode_id=episode_id, num_steps=n, spooled=spooled)

    def Status(self, request, context):
        src = self.d.policy_source.status()
        backlog = self.d.spool.backlog()
        inf = self.d.inference.status()
        stats = rl.InferenceStats(mode=inf["mode"], chunks_computed=inf["chunks_computed"],
                                  chunks_used=inf["chunks_used"], stalls=inf["stalls"],
                                  chunk_age_steps_max=inf["chunk_age_steps_max"] or 0,
                                  control_period_ms=inf["control_period_ms"], sync_computes=inf["sync_computes"],
                                  chunks_discarded=inf["chunks_discarded"])
        for k in ("latency_ms_p50", "latency_ms_p99", "chunk_age_steps_p50"):
            if inf[k] is not None:
                setattr(stats, k, inf[k])
        return rl.StatusResponse(robot_id=self.d.robot_id, policy_version=src.get("current_version") or "",
                                 pending_version=src.get("pending_version") or "", spool_episodes=backlog["episodes"],
                                 spool_bytes=backlog["bytes"], takeover_requested=self.d.takeover_requested,
                                 paused=self.d.paused, inference=stats, spec=self.d.spec(),
                                 limits=self.d.limits.to_proto(self.d.episode_idle_timeout_s))

    def GetSpec(self, request, context):
        pending = self.d.policy_source.status().get("pending_version") or ""
        return rl.GetSpecResponse(robot_id=self.d.robot_id, spec=self.d.spec(), pending_version=pending,
                                  limits=self.d.limits.to_proto(self.d.episode_idle_timeout_s))


class ActorDaemon:
    def __init__(self, robot_id: str, store: ObjectStore, redis_client: redis.Redis, spool: Spool,
                 policy_source, grpc_address: str = "127.0.0.1:50051", episode_idle_timeout_s: float = 30.0,
                 heartbeat_interval_s: float = 2.0, chunk_steps: int = 256,
                 chunk_bytes: int = 4 << 20, inference: str = "async", inference_lead_steps: int = 2,
                 inference_replan_steps: Optional[int] = None, inference_inline_below_ms: float = 5.0,
                 control_hz: float = 30.0, limits: Optional[LinkLimits] = None,
                 link_security: Optional["LinkSecurity"] = None, writes=None):
        """inference: "async" (compute the next chunk in the background while the robot executes
        the current one) or "sync" (every Act computes). inference_lead_steps: start the next
        chunk when the current one has no more than expected-latency + this many steps left.
        inference_replan_steps: also refresh the chunk every this many steps (None: only when
        running low). inference_inline_below_ms: a policy faster than this runs on the Act
        call itself, from the freshest observation. control_hz: the robot's control rate assumed
        until measured from ReportStep spacing. See fleetloop.actor.inference. limits: the bounds on
        robot input (fleetloop.actor.contract.LinkLimits; reported by GetSpec). link_security: TLS /
        client certificates / bearer tokens on the robot link (fleetloop.actor.link.LinkSecurity;
        None: plaintext, which start() allows on loopback and unix sockets only). writes: how the
        daemon's episode events, heartbeats and control acks reach Redis (fleetloop.ingest; None:
        the write gate in this process on redis_client, the embedded default)."""
        self.limits = limits or LinkLimits()
        self.decode_budget = DecodeBudget(self.limits.max_decoded_bytes_in_flight)  # all calls' decoded images
        try:
            self.robot_id = check_id("robot id", robot_id, self.limits)
        except Rejected as e:
            raise ValueError(str(e)) from None
        self.store, self.redis, self.spool = store, redis_client, spool
        self.policy_source = policy_source
        self.episode_idle_timeout_s = episode_idle_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        recover_unsealed(spool)  # before any recording: close what a crash left open
        self.recorder = EpisodeRecorder(spool, robot_id, chunk_steps=chunk_steps, chunk_bytes=chunk_bytes)
        self.writes = writes or LocalWrites(redis_client, self.robot_id)
        self.uploader = Uploader(spool, store, redis_client, writes=self.writes)
        self.inference = InferenceScheduler(InferenceSettings(
            mode=inference, lead_steps=inference_lead_steps, replan_steps=inference_replan_steps,
            inline_below_ms=inference_inline_below_ms, control_hz=control_hz))
        self.lock = threading.RLock()
        self.open_episode: Optional[OpenEpisode] = None
        self.ended_episodes: collections.deque = collections.deque(maxlen=64)  # "has ended" vs "unknown"
        self.takeover_requested = False
        self.paused = False
        self.counters = RobotCounters()
        self.last_command: dict = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._grpc_address = grpc_address
        from fleetloop.actor.link import LinkSecurity
        self.link_security = link_security or LinkSecurity()
        self.link_security.check_address(grpc_address)  # refuse an open link before anything starts
        self.server: Optional[grpc.Server] = None
        self.port: Optional[int] = None

    # -- episode bookkeeping ---------------------------------------------------------------
    def close_open_episode(self, outcome: int = pb.OUTCOME_UNKNOWN, source: int = pb.LABEL_SOURCE_UNSPECIFIED,
                           labelled_by: str = "", incomplete: bool = False, why: str = "") -> tuple[str, int, bool]:
        ep = self.open_episode
        self.open_episode = None
        self.ended_episodes.append(ep.episode_id)
        self.inference.end_episode(ep.episode_id)  # drops its chunks; an inference in flight is discarded
        if incomplete:
            log.warning("episode %s closed incomplete: %s", ep.episode_id, why)
        episode_id, n = self.recorder.end(outcome, source, labelled_by, incomplete=incomplete)
        self.recorder.flush(timeout=5.0)
        spooled = not self.recorder.was_dropped(episode_id)
        c = self.counters
        c.episodes += 1
        c.successes += outcome == pb.OUTCOME_SUCCESS
        c.failures += outcome == pb.OUTCOME_FAILURE
        c.incomplete += incomplete
        c.intervention_episodes += ep.intervention_steps > 0
        self.takeover_requested = False
        return episode_id, n, spooled

    def spec(self) -> rl.PolicySpec:
        """The spec of the policy the robot runs: the open episode's, else the one the next
        episode starts with -- a pending version if one is loaded (unknown before any policy is)."""
        ep = self.open_episode
        if ep is not None and ep.policy is not None:
            return ep.checker.spec.to_proto(ep.policy_version)
        src = self.policy_source
        next_policy = getattr(src, "next_policy", None)  # PolicySlot, FixedPolicySource
        if next_policy is not None:
            policy, version = next_policy()
        else:  # a source that only offers begin_episode/status: its current policy, if it shows one
            policy = getattr(src, "current_policy", None) or getattr(src, "policy", None)
            version = str(src.status().get("current_version") or "")
        return Spec.of(policy).to_proto(version if policy is not None else "")

    # -- control channel ---------------------------------------------------------------------
    def apply_command(self, cmd: policy_pb2.ControlCommand) -> str:
        a = cmd.action
        if a == policy_pb2.CONTROL_ACTION_TAKEOVER:
            self.takeover_requested = True
        elif a == policy_pb2.CONTROL_ACTION_RELEASE:
            self.takeover_requested = False
        elif a == policy_pb2.CONTROL_ACTION_PAUSE:
            self.paused = True
        elif a == policy_pb2.CONTROL_ACTION_RESUME:
            self.paused = False
        else:
            return f"ignored: {policy_pb2.ControlAction.Name(a)} is handled by the policy registry"
        self.last_command = {"command_id": cmd.command_id, "action": policy_pb2.ControlAction.Name(a),
                             "operator": cmd.operator, "applied_ns": time.time_ns()}
        log.info("control: %s by %s", policy_pb2.ControlAction.Name(a), cmd.operator)
        return "applied"

    def _control_loop(self) -> None:
        channel = config.CONTROL_CHANNEL_PREFIX + self.robot_id
        backoff = 0.2
        while not self._stop.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel)
                backoff = 0.2
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is None:
                        continue
                    try:
                        cmd = json_format.Parse(msg["data"], policy_pb2.ControlCommand())
                    except (json_format.ParseError, TypeError, ValueError) as e:
                        log.warning("ignoring malformed control message on %s: %s", channel, e)
                        continue
                    result = self.apply_command(cmd)
                    try:
                        self.writes.ack(cmd.command_id, result)
                        self.heartbeat()
                    except (WriteRefused, OSError) as e:  # applied; the operator sees no ack
                        log.warning("control ack for %s not written: %s", cmd.command_id, e)
            except redis.RedisError as e:
                log.warning("control channel unavailable (%s); retrying", e)
                self._stop.wait(backoff)
                backoff = min(5.0, backoff * 2)

    # -- heartbeat and watchdog --------------------------------------------------------------
    def status(self) -> dict:
        src = self.policy_source.status()
        ep = self.open_episode
        c = self.counters
        # what runs: the open episode's policy, else the one the next episode starts with
        running = ep.policy if ep and ep.policy is not None else getattr(self.policy_source, "current_policy", None)
        guidance = getattr(running, "guidance", None)
        return {
            "robot_id": self.robot_id, "last_seen_ns": time.time_ns(),
            "episode_id": ep.episode_id if ep else "", "task_id": ep.task_id if ep else "",
            "policy_version": (ep.policy_version if ep else src.get("current_version")) or "",
            "pending_version": src.get("pending_version") or "",
            "takeover_requested": self.takeover_requested, "paused": self.paused,
            "spool": self.spool.backlog(), "uploads_failed": self.uploader.failures,
            "upload_error": self.uploader.last_error or "", "counters": c.__dict__,
            "swap": {k: v for k, v in src.items() if k not in ("current_version", "pending_version")},
            "last_command": self.last_command, "inference": self.inference.status(),
            "guidance": guidance.describe() if isinstance(guidance, Guidance) else None,
        }

    def heartbeat(self) -> None:
        """The status hash fleetloop:robot:<id> and the robot set, through the write gate."""
        self.writes.heartbeat(self.status())

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                self.heartbeat()
            except (redis.RedisError, OSError):
                pass  # the dashboard shows us offline; recording goes on
            except WriteRefused as e:
                log.warning("heartbeat refused by the write gate: %s", e)
            with self.lock:  # watchdog: a robot that went silent mid-episode
                ep = self.open_episode
                if ep and time.monotonic() - ep.last_call > self.episode_idle_timeout_s:
                    self.close_open_episode(incomplete=True, why=f"no call from the robot for "
                                                                 f"{self.episode_idle_timeout_s:.0f}s")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "ActorDaemon":
        self.policy_source.start()
        self.inference.start()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._control_loop, "control")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._threads.append(self.uploader.start_thread(self._stop))
        sec = self.link_security
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="robot-link"),
                                  interceptors=sec.interceptors(),
                                  options=[("grpc.max_receive_message_length", self.limits.max_message_bytes)])
        from fleetloop.actor.wire import add_robot_link  # text that is not UTF-8: INVALID_ARGUMENT, not INTERNAL
        add_robot_link(RobotLinkService(self), self.server, self.robot_id)
        creds = sec.server_credentials()
        try:
            self.port = (self.server.add_secure_port(self._grpc_address, creds) if creds is not None
                         else self.server.add_insecure_port(self._grpc_address))
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise RuntimeError(f"cannot listen on {self._grpc_address}")
        from fleetloop.actor.link import is_loopback
        if sec.tokens and not sec.tls and not is_loopback(self._grpc_address):
            log.warning("robot link on %s: the token travels in plaintext; add TLS (tls_cert, tls_key) "
                        "unless this network is private", self._grpc_address)
        elif not (sec.tls or sec.tokens) and not is_loopback(self._grpc_address):
            log.warning("robot link on %s has no authentication (insecure = true)", self._grpc_address)
        self.server.start()
        try:
            self.heartbeat()
        except (redis.RedisError, OSError, WriteRefused) as e:
            log.warning("heartbeat failed at start (%s); recording anyway", e)
        log.info("actor daemon for %s listening on port %d (%s)", self.robot_id, self.port, sec.describe())
        return self

    @property
    def address(self) -> str:
        host = self._grpc_address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        if self.server:
            self.server.stop(grace=1.0).wait()
        with self.lock:
            if self.open_episode is not None:
                self.close_open_episode(incomplete=True, why="daemon stopping")
        self.recorder.flush(timeout=drain_timeout_s)
        deadline = time.monotonic() + drain_timeout_s
        while self.spool.sealed() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self.inference.stop()
        self.policy_source.stop()
        for t in self._threads:
            t.join(timeout=5)


# -- CLI: `fleetloop actor` ---------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--config", help="actor config file (TOML); environment variables override it")
    p.add_argument("--policy", help="initial policy checkpoint dir (otherwise the fleet's current version)")
    p.add_argument("--indicator", choices=INDICATOR_SETTINGS, default=None,
                   help="RECAP improvement indicator the policy runs with: 'published' = what each version's "
                        "signed manifest says (RECAP versions: positive), or positive / negative / unset for "
                        "every version. Overrides [policy] indicator and FLEETLOOP_POLICY_INDICATOR "
                        "(default there: published)")
    p.add_argument("--guidance-beta", default=None, metavar="BETA",
                   help="classifier-free guidance weight, a = a_uncond + beta * (a_cond - a_uncond): a number "
                        "from 0 to 10 (1 = no guidance) or 'published' = each version's (RECAP publishes 1.5). "
                        "Overrides [policy] guidance_beta and FLEETLOOP_POLICY_GUIDANCE_BETA (default there: "
                        "published). The heartbeat's 'guidance' shows what runs")


def run(args) -> int:
    from fleetloop.actor.config import ConfigError, load_actor_config
    try:
        cfg = load_actor_config(args.config)
        daemon = build_daemon_from_config(cfg, args.policy, indicator=args.indicator,
                                          guidance_beta=args.guidance_beta)
    except ConfigError as e:
        print(f"fleetloop actor: configuration error: {e}")
        return 2
    daemon.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        daemon.stop()
    return 0


STEERING_STATE_FILE = ".policy-steering.json"  # in the spool directory (fleetloop.release.steering)


def build_daemon_from_config(cfg, initial_policy_dir: Optional[str] = None, indicator: Optional[str] = None,
                             guidance_beta: Optional[str] = None) -> ActorDaemon:
    """indicator / guidance_beta: the command line's overrides of cfg.policy_indicator /
    cfg.policy_guidance_beta (None: the configuration's); a bad value raises ConfigError."""
    from fleetloop.actor.config import ConfigError
    from fleetloop.actor.config_types import check_indicator, parse_guidance_beta
    from fleetloop.actor.weights import PolicySlot
    from fleetloop.buffer.store import open_store
    from fleetloop.release.registry import PolicyRegistry
    from fleetloop.release.runtime import PolicyLoader, PolicyRuntime

    try:  # before anything is opened: a bad override stops here
        indicator = cfg.policy_indicator if indicator is None else check_indicator(indicator)
        beta = cfg.policy_guidance_beta if guidance_beta is None else parse_guidance_beta(guidance_beta)
    except ValueError as e:
        raise ConfigError(f"command line: {e}") from None
    store = open_store(cfg.store_uri, cfg.s3_settings())
    client = redis.Redis.from_url(cfg.redis_url, socket_timeout=5, socket_connect_timeout=3)
    spool = Spool(cfg.spool_dir, max_bytes=cfg.spool_max_bytes, on_full=cfg.spool_on_full)
    # The config file's values reach the libraries that read them from the environment.
    if cfg.policy_bases:  # where the VLA backend looks for provisioned bases
        os.environ["FLEETLOOP_BASE_DIRS"] = cfg.policy_bases
    if cfg.trusted_keys:  # who may sign the policies this robot runs (fleetloop.release.signing)
        os.environ["FLEETLOOP_TRUSTED_KEYS"] = cfg.trusted_keys
    device = cfg.policy_device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loader = PolicyLoader(device=device, indicator=indicator, beta=beta)
    initial = (PolicyRuntime.from_checkpoint(initial_policy_dir, device=device, guidance=loader.guidance_for(None))
               if initial_policy_dir else None)
    # The newest steering records accepted live beside the spool (a dot file: not an episode), so
    # a restarted robot still refuses older, replayed ones.
    slot = PolicySlot(PolicyRegistry(store, client), cfg.robot_id, load_fn=loader,
                      initial_policy=initial, poll_interval_s=cfg.policy_poll_interval_s,
                      steering_state=Path(cfg.spool_dir) / STEERING_STATE_FILE)
    return ActorDaemon(cfg.robot_id, store, client, spool, slot, grpc_address=cfg.grpc_address,
                       chunk_steps=cfg.chunk_steps, chunk_bytes=cfg.chunk_bytes, inference=cfg.inference,
                       link_security=cfg.link_security(),
                       writes=robot_writes(client, cfg.robot_id, cfg.ingest_url, cfg.redis_url))
