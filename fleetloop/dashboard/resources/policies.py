"""Policy versions: what the registry lists and how each did on the robots, and the operator's
steering (promote, roll back, pins, canary).

PolicyResource is one part of fleetloop.dashboard.service.Dashboard, which holds the state it
uses (registry, offline_after_s) and gives it aggregates() (EpisodeResource), heartbeats(),
require_robot() and _steering() (RobotResource)."""
from __future__ import annotations

import json
import time
from collections import Counter
from typing import Iterable

from google.protobuf import json_format

from fleetloop.dashboard.resources.common import BadRequest, NotFound
from fleetloop.dashboard.resources.episodes import Tally
from fleetloop.release.registry import UnknownVersion


class PolicyResource:
    # ---- policies --------------------------------------------------------------------------

    def _running_versions(self, hbs: dict) -> Counter:
        now = time.time_ns()
        return Counter(hb.get("policy_version") for hb in hbs.values()
                       if hb and (now - int(hb.get("last_seen_ns") or 0)) / 1e9 <= self.offline_after_s)

    def policies(self, history: int = 100) -> dict:
        agg = self.aggregates()
        running = self._running_versions(self.heartbeats())
        steering = self._steering()
        pointer, canary, pins = steering["pointer"], steering["canary"], steering["pins"]
        registered = self.registry.list_versions()
        known = {v["version"] for v in registered}
        # Versions robots ran that the registry does not list (an initial checkpoint, another
        # registry): their on-robot success still matters.
        extra = [{"version": v} for v in agg.by_version if v and v not in known]
        out = []
        for v in registered + extra:
            name = v["version"]
            v = dict(v, registered=name in known)
            v["on_robot"] = (agg.by_version.get(name) or Tally()).as_dict()
            v["robots_running"] = running.get(name, 0)
            v["current"] = pointer.get("version") == name
            v["canary"] = bool(canary and canary["version"] == name)
            v["pinned_robots"] = sorted(r for r, pv in pins.items() if pv == name)
            out.append(v)
        out.sort(key=lambda v: v["version"], reverse=True)
        return {"versions": out, "pointer": pointer, "canary": canary, "robot_pins": pins,
                "latest": self.registry.latest_version(), "history": self.registry.history(history)}

    def policy(self, version: str) -> dict:
        agg = self.aggregates()
        try:
            m = self.registry.manifest(version)
            d = json_format.MessageToDict(m, preserving_proto_field_name=True)
            try:
                d["config"] = json.loads(d.pop("config_json", "") or "null")
            except ValueError:
                pass
            d["registered"] = True
        except UnknownVersion:
            if version not in agg.by_version:
                raise NotFound("policy version", version) from None
            d = {"version": version, "registered": False}
        steering = self._steering()
        d["on_robot"] = (agg.by_version.get(version) or Tally()).as_dict()
        d["by_task"] = {t: tally.as_dict() for (v, t), tally in sorted(agg.by_version_task.items()) if v == version}
        d["robots_running"] = self._running_versions(self.heartbeats()).get(version, 0)
        d["current"] = steering["pointer"].get("version") == version
        d["pinned_robots"] = sorted(r for r, pv in steering["pins"].items() if pv == version)
        return d

    def _require_version(self, version: str) -> None:
        if not self.registry.exists(version):
            raise NotFound("policy version", version)

    def promote(self, version: str, by: str) -> dict:
        self._require_version(version)
        self.registry.promote(version, by=by)
        return self.steering_state()

    def rollback(self, by: str, pin: bool = False) -> dict:
        version = self.registry.rollback(by=by, pin=pin)
        return dict(self.steering_state(), rolled_back_to=version)

    def pin_fleet(self, version: str, by: str) -> dict:
        self._require_version(version)
        self.registry.pin_fleet(version, by=by)
        return self.steering_state()

    def unpin_fleet(self, by: str) -> dict:
        self.registry.unpin_fleet(by=by)
        return self.steering_state()

    def pin_robot(self, robot_id: str, version: str, by: str) -> dict:
        self.require_robot(robot_id)
        self._require_version(version)
        self.registry.pin_robot(robot_id, version, by=by)
        return self.steering_state()

    def unpin_robot(self, robot_id: str, by: str) -> dict:
        self.require_robot(robot_id)
        self.registry.unpin_robot(robot_id, by=by)
        return self.steering_state()

    def set_canary(self, version: str, robot_ids: Iterable[str], fraction: float, by: str) -> dict:
        robot_ids = list(robot_ids)
        if not robot_ids and not fraction:
            raise BadRequest("a canary needs robot_ids or a fraction > 0")
        self._require_version(version)
        for rid in robot_ids:
            self.require_robot(rid)
        try:
            self.registry.set_canary(version, robot_ids=robot_ids, fraction=fraction, by=by)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return self.steering_state()

    def clear_canary(self, by: str) -> dict:
        self.registry.clear_canary(by=by)
        return self.steering_state()

    def steering_state(self) -> dict:
        s = self._steering()
        return {"pointer": s["pointer"], "canary": s["canary"], "robot_pins": s["pins"]}
