"""Robots: heartbeats, where each robot's policy comes from (pin, canary, fleet pointer), and
operator control (takeover, release, pause, resume).

RobotResource is one part of fleetloop.dashboard.service.Dashboard, which holds the state it uses
(redis, registry, offline_after_s) and gives it aggregates() and episodes() (EpisodeResource)."""
from __future__ import annotations

import time
import uuid
from typing import Optional

from google.protobuf import json_format

from fleetloop import config
from fleetloop.buffer.codec import check_id
from fleetloop.buffer.index import ONLINE
from fleetloop.dashboard import heartbeat
from fleetloop.dashboard.resources.common import BadRequest, NotDelivered, NotFound, _s
from fleetloop.dashboard.resources.episodes import Aggregates, Tally
from fleetloop.ingest import ACK_STREAM
from fleetloop.proto.v1 import policy_pb2
from fleetloop.release.registry import canary_member

CONTROL_ACTIONS = {
    "takeover": policy_pb2.CONTROL_ACTION_TAKEOVER,
    "release": policy_pb2.CONTROL_ACTION_RELEASE,
    "pause": policy_pb2.CONTROL_ACTION_PAUSE,
    "resume": policy_pb2.CONTROL_ACTION_RESUME,
}


class RobotResource:
    # ---- robots ----------------------------------------------------------------------------

    def heartbeats(self) -> dict[str, Optional[dict]]:
        """Robots with a heartbeat, each validated and bounded (fleetloop.dashboard.heartbeat)."""
        return heartbeat.read_all(self.redis)

    def require_robot(self, robot_id: str) -> None:
        try:  # reserved names ('all' is the robot set's own key, 'acks' the ack stream) are never robots
            check_id("robot id", robot_id)
        except ValueError as err:
            raise NotFound("robot", robot_id, str(err).split(": ")[-1]) from None
        if not (self.redis.sismember(heartbeat.ROBOTS_SET, robot_id)
                or self.redis.exists(config.HEARTBEAT_PREFIX + robot_id)):
            raise NotFound("robot", robot_id)

    def _steering(self) -> dict:
        return {"pins": self.registry.robot_pins(), "canary": self.registry.canary(),
                "pointer": self.registry.pointer()}

    @staticmethod
    def _target(robot_id: str, steering: dict) -> tuple[Optional[str], Optional[str]]:
        """The registry's resolution (robot pin > canary > fleet pointer) evaluated locally for
        the whole fleet from one read of the steering state, instead of one round trip per robot."""
        pin = steering["pins"].get(robot_id)
        if pin:
            return pin, "robot_pin"
        c = steering["canary"]
        if c and (robot_id in c["robots"] or canary_member(robot_id, c["fraction"])):
            return c["version"], "canary"
        v = steering["pointer"].get("version")
        return (v, "fleet") if v else (None, None)

    def _robot_summary(self, robot_id: str, hb: Optional[dict], agg: Aggregates, steering: dict,
                       now_ns: int) -> dict:
        hb = hb or {}  # parsed by fleetloop.dashboard.heartbeat: counts are ints; {} when unreadable
        last = hb.get("last_seen_ns") or 0
        age = max(0.0, (now_ns - last) / 1e9) if last else None
        tally: Tally = agg.by_robot.get(robot_id) or Tally()
        spool = hb.get("spool") or {}
        target, source = self._target(robot_id, steering)
        return {
            "robot_id": robot_id, "online": age is not None and age <= self.offline_after_s,
            "last_seen_ns": last or None, "age_s": None if age is None else round(age, 2),
            "task_id": hb.get("task_id") or "", "episode_id": hb.get("episode_id") or "",
            "policy_version": hb.get("policy_version") or "", "pending_version": hb.get("pending_version") or "",
            "target_version": target, "target_source": source,
            "takeover_requested": bool(hb.get("takeover_requested")), "paused": bool(hb.get("paused")),
            "spool": {"episodes": spool.get("episodes", 0), "bytes": spool.get("bytes", 0),
                      "max_bytes": spool.get("max_bytes"), "dropped_episodes": spool.get("dropped_episodes", 0),
                      "damaged_episodes": spool.get("damaged_episodes", 0)},
            "upload_error": hb.get("upload_error") or "",
            **tally.as_dict(),
        }

    def robots(self) -> list[dict]:
        hbs, agg, steering, now = self.heartbeats(), self.aggregates(), self._steering(), time.time_ns()
        return [self._robot_summary(rid, hb, agg, steering, now) for rid, hb in hbs.items()]

    def robot(self, robot_id: str, recent: int = 20) -> dict:
        self.require_robot(robot_id)
        hb = heartbeat.read_one(self.redis, robot_id)
        agg = self.aggregates()
        d = self._robot_summary(robot_id, hb, agg, self._steering(), time.time_ns())
        hb = hb or {}
        d["counters"] = hb.get("counters") or {}
        d["swap"] = hb.get("swap") or {}
        d["last_command"] = hb.get("last_command") or {}
        d["guidance"] = hb.get("guidance")  # the indicator / guidance beta its policy runs with
        d["by_version"] = {}
        for e in agg.newest_first:
            if e.robot_id == robot_id and e.source == ONLINE:
                d["by_version"].setdefault(e.policy_version, Tally()).add(e, int(e.intervention.sum()))
        d["by_version"] = {v: t.as_dict() for v, t in sorted(d["by_version"].items())}
        d["recent_episodes"] = self.episodes(robot_id=robot_id, limit=recent)["episodes"]
        return d

    # ---- operator control ------------------------------------------------------------------

    def control(self, robot_id: str, action: str, operator: str, wait_ack_s: float = 2.0) -> dict:
        """PUBLISH a ControlCommand on the robot's channel; the daemon applies it and acks on the
        acks stream. Waits briefly for the ack so the operator sees "applied", not just "sent"."""
        if action not in CONTROL_ACTIONS:
            raise BadRequest(f"unknown control action {action!r}")
        self.require_robot(robot_id)
        cmd = policy_pb2.ControlCommand(command_id=uuid.uuid4().hex, robot_id=robot_id,
                                        action=CONTROL_ACTIONS[action], operator=operator, issued_ns=time.time_ns())
        newest = self.redis.xrevrange(ACK_STREAM, count=1)
        after = _s(newest[0][0]) if newest else "0-0"  # acks from here on can be ours
        receivers = self.redis.publish(config.CONTROL_CHANNEL_PREFIX + robot_id, json_format.MessageToJson(cmd))
        if not receivers:
            raise NotDelivered(f"robot {robot_id!r} is not listening on its control channel (offline?); "
                               f"nothing was applied")
        ack = self._wait_ack(cmd.command_id, after, wait_ack_s)
        return {"command_id": cmd.command_id, "robot_id": robot_id, "action": action, "receivers": receivers,
                "ack": ack}

    def _wait_ack(self, command_id: str, after: str, timeout_s: float) -> Optional[str]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            res = self.redis.xread({ACK_STREAM: after}, count=100, block=max(1, int(left * 1000)))
            for _stream, messages in res or []:
                for msg_id, fields in messages:
                    after = _s(msg_id)
                    f = {_s(k): _s(v) for k, v in fields.items()}
                    if f.get("command_id") == command_id:
                        return f.get("result") or "applied"
        return None
