"""Steering records -- fleet pointer, robot pin, canary -- and what a robot accepts of them.

Every record is signed (fleetloop.release.signing) over its canonical form, which includes `seq`:
a number from one Redis counter (STEERING_SEQ_KEY) that every writer (learner, dashboard) takes
a fresh value of for each record. A robot remembers, per layer, the last record it accepted
(SteeringMemory, persisted on the robot when given a path), and accepts a stored record only if

  * it parses and its signature verifies against a trusted key, and
  * its seq is not older than the remembered one (an old signed record written back -- a
    version rolled back as bad, a pin from last month -- is a replay and is refused).

Deleting a pin or clearing the canary writes a signed *tombstone*: the same record with version
"" and a new seq. A record that is missing although the robot remembers one is an unsigned
deletion and is refused like a replay.

A layer whose stored record is refused is not a block: the robot uses what it remembers for that
layer (nothing, if it never accepted one), resolves the rest (pin > canary > fleet pointer) as
usual and reports the refusal as an alert. A garbage canary therefore never stops a signed
promotion or rollback from reaching the robots it claims to cover.

The counter starts at the wall clock in microseconds (SET NX) rather than 1, so a Redis that
lost its data hands out numbers above every earlier one and robots keep accepting moves.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from fleetloop.files import write_atomic

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 64 * 1024   # a pin record is ~200 bytes
MAX_CANARY_BYTES = 1 << 20     # a canary's list of robot ids may be long


class SteeringInvalid(ValueError):
    """A stored steering record that is not a well-formed record (garbage, wrong types, too deep)."""


# ---- the signed forms --------------------------------------------------------------------------

def pointer_record(version: str, published_ns: int, seq: int) -> dict:
    """What a fleet-pointer signature covers (the pin flag is the learner's business, not the robots')."""
    return {"kind": "fleet", "version": version, "published_ns": int(published_ns), "seq": int(seq)}


def pin_record(robot_id: str, version: str, set_ns: int, seq: int) -> dict:
    """version "" is the tombstone of a deleted pin."""
    return {"kind": "robot_pin", "robot_id": robot_id, "version": version, "set_ns": int(set_ns), "seq": int(seq)}


def canary_record(version: str, robots: list, fraction: str, set_ns: int, seq: int) -> dict:
    """version "" is the tombstone of a cleared canary."""
    return {"kind": "canary", "version": version, "robots": sorted(robots), "fraction": str(fraction),
            "set_ns": int(set_ns), "seq": int(seq)}


def loads_bounded(data, what: str, limit: int = MAX_RECORD_BYTES):
    """json.loads that refuses oversized or too-deeply nested input with SteeringInvalid (a
    RecursionError or a decode error never escapes)."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) > limit:
            raise SteeringInvalid(f"{what}: {len(data)} bytes, over {limit}")
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise SteeringInvalid(f"{what}: not UTF-8") from None
    if len(data) > limit:
        raise SteeringInvalid(f"{what}: {len(data)} characters, over {limit}")
    try:
        return json.loads(data)
    except RecursionError:
        raise SteeringInvalid(f"{what}: nested too deeply") from None
    except ValueError as e:
        raise SteeringInvalid(f"{what}: not JSON ({str(e)[:60]})") from None


def _text(v) -> str:
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise SteeringInvalid("not UTF-8") from None
    return "" if v is None else str(v)


def _int(v, what: str) -> int:
    try:
        n = int(_text(v) or 0)
    except ValueError:
        raise SteeringInvalid(f"{what} is not an integer") from None
    if not 0 <= n < 1 << 63:
        raise SteeringInvalid(f"{what} out of range")
    return n


def _str_field(v, what: str) -> str:
    if not isinstance(v, str) or len(v) > 256:
        raise SteeringInvalid(f"{what} is not a short string")
    return v


def parse_pin(robot_id: str, raw) -> Optional[tuple[dict, Optional[str]]]:
    """(record, sig) from a robot's pin key value, None when absent. Raises SteeringInvalid."""
    if raw is None:
        return None
    p = loads_bounded(raw, f"robot pin of {robot_id}")
    if not isinstance(p, dict):
        raise SteeringInvalid(f"robot pin of {robot_id}: not a JSON object")
    sig = p.get("sig")
    if sig is not None and not isinstance(sig, str):
        raise SteeringInvalid(f"robot pin of {robot_id}: sig is not a string")
    rec = pin_record(robot_id, _str_field(p.get("version", ""), "version"), _int(p.get("set_ns"), "set_ns"),
                     _int(p.get("seq"), "seq"))
    return rec, sig


def parse_canary(raw: dict) -> Optional[tuple[dict, Optional[str]]]:
    """(record, sig) from the canary hash, None when absent. Raises SteeringInvalid."""
    if not raw:
        return None
    c = {_text(k): v for k, v in raw.items()}
    robots = loads_bounded(c.get("robots") or b"[]", "canary robots", MAX_CANARY_BYTES)
    if not isinstance(robots, list) or not all(isinstance(r, str) for r in robots):
        raise SteeringInvalid("canary robots: not a list of robot ids")
    fraction = _text(c.get("fraction")) or "0.0"
    try:
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError
    except ValueError:
        raise SteeringInvalid("canary fraction is not a number in [0, 1]") from None
    sig = _text(c.get("sig")) or None
    rec = canary_record(_str_field(_text(c.get("version")), "version"), robots, fraction,
                        _int(c.get("set_ns"), "set_ns"), _int(c.get("seq"), "seq"))
    return rec, sig


def parse_pointer(version, published_ns, seq, sig) -> Optional[tuple[dict, Optional[str]]]:
    if version is None:
        return None
    return pointer_record(_str_field(_text(version), "version"), _int(published_ns, "published_ns"),
                          _int(seq, "seq")), (_text(sig) or None)


# ---- the robot's memory --------------------------------------------------------------------------

class SteeringMemory:
    """The last accepted record of each layer, per robot id; written atomically (and fsync'd) to
    `path` on every change when a path is given, so a restarted robot still refuses what it
    refused before. A damaged file is logged and replaced (the robot then starts like a new one)."""

    def __init__(self, path: Optional[str | os.PathLike] = None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._data: dict = {}
        if self.path and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                self._data = data
            except (OSError, ValueError, RecursionError) as e:
                log.error("ALERT steering memory %s unreadable (%s); starting from nothing", self.path, e)

    def get(self, robot_id: str, layer: str) -> Optional[dict]:
        with self._lock:
            entry = self._data.get(robot_id, {}).get(layer)
        return entry if isinstance(entry, dict) and isinstance(entry.get("record"), dict) else None

    def put(self, robot_id: str, layer: str, record: dict, sig: Optional[str]) -> None:
        with self._lock:
            self._data.setdefault(robot_id, {})[layer] = {"record": record, "sig": sig}
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(self.path, json.dumps(self._data, sort_keys=True).encode(), durable=True)


def accept(layer: str, what: str, robot_id: str, parse: Callable[[], Optional[tuple[dict, Optional[str]]]],
           verify: Callable[[dict, Optional[str], str], None], memory: SteeringMemory,
           alerts: list[str]) -> Optional[dict]:
    """The record this robot goes by for one layer: the stored one when it is valid, signed and not
    older than the remembered one; else the remembered one (an alert says why)."""
    remembered = memory.get(robot_id, layer)
    kept = remembered["record"] if remembered else None
    keeping = f"keeping {kept['version'] or 'none'} (seq {kept['seq']})" if kept else "ignoring it"
    try:
        parsed = parse()
    except SteeringInvalid as e:
        alerts.append(f"{what} is malformed ({e}); {keeping}")
        return kept
    if parsed is None:
        if kept and kept.get("version"):
            alerts.append(f"{what} was deleted without a signed tombstone; {keeping}")
        return kept
    record, sig = parsed
    try:
        verify(record, sig, what)
    except Exception as e:  # SignatureError, NoTrustedKeys
        alerts.append(f"{what} refused: {e}; {keeping}")
        return kept
    if kept is not None and (record["seq"] < kept["seq"] or (record["seq"] == kept["seq"] and record != kept)):
        alerts.append(f"{what} is a replay: seq {record['seq']} (version {record['version'] or 'none'}) is older "
                      f"than the accepted seq {kept['seq']}; {keeping}")
        return kept
    if record != kept:
        memory.put(robot_id, layer, record, sig)
    return record


def wall_seq_floor() -> int:
    """Where a fresh steering counter starts: microseconds since the epoch."""
    return time.time_ns() // 1000
