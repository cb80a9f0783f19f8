"""Safe continuous deployment: a new version runs on a few canary robots first; the fleet moves to
it only when the evidence says it is not worse than the version the fleet runs, and a worse one
is taken off the canaries by itself. Docs: docs/rollout.md.

The pieces
  RolloutSettings   thresholds and canary choice (flags, FLEETLOOP_ROLLOUT_* variables, defaults)
  EvidenceBook, EvidenceFollower, sprt()
                    the evidence (per version and task, fed from Redis) and the sequential test
                    on it: evidence.py
  RolloutGate       the state machine on the registry's public steering (pin_fleet, set_canary,
                    clear_canary, promote) under a Redis lock, shared by the gate thread (automatic
                    decisions) and the dashboard (manual promote / reject, on / off)
  GateService       the thread: follow evidence, tick the gate (run by `fleetloop learner` and
                    `fleetloop up` unless --rollout off; the demo does not run it)

How the gate keeps robots off untested versions: while it is on it holds the fleet pointer PINNED
(registry.pin_fleet), so the learner's publishes never move the fleet; a candidate reaches robots
only through the canary entry, and the fleet only through promote(). Robots resolve pin > canary >
fleet (registry.resolve) and swap between episodes (actor/weights.py), unchanged.

Over 600 lines on purpose: RolloutGate is one state machine over one Redis state under one lock
(each transition reads and writes the same keys); its evidence and test are in evidence.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Optional

import redis

from fleetloop.dashboard import heartbeat
from fleetloop.release.evidence import EvidenceBook, EvidenceFollower, reference_rate, sprt
from fleetloop.release.registry import PolicyRegistry, RegistryError, UnknownVersion, _seq

log = logging.getLogger(__name__)

NS = "fleetloop:rollout"
ENABLED_KEY = NS + ":enabled"        # "1" / "0": the switch (absent = on while a gate runs)
STATE_KEY = NS + ":state"            # hash: baseline, candidate, since_ns, refs (JSON), gate_seen_ns, note
DECISIONS_KEY = NS + ":decisions"    # list: JSON decisions, newest last (capped)
DECIDED_KEY = NS + ":decided"        # hash: version -> decision (promote | reject | expire)
COUNTERS_KEY = NS + ":counters"      # hash: "<decision>|<by kind>" -> count (Prometheus counters)
EVIDENCE_KEY = NS + ":evidence"      # string: JSON evidence snapshot the gate writes each tick
SETTINGS_KEY = NS + ":settings"      # string: JSON of the running gate's settings
LOCK_KEY = NS + ":lock"
DECISIONS_MAX = 5000
GATE = "rollout-gate"                # the `by` of the gate's own registry moves

NO_WATCH = {"watch": "", "watch_prev": "", "watch_since_ns": 0, "watch_refs": {}}
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


# ---- settings -------------------------------------------------------------------------------

@dataclass
class RolloutSettings:
    """Every threshold of the gate. From code, `fleetloop learner --rollout-*` flags, or
    FLEETLOOP_ROLLOUT_<NAME> variables (from_env)."""
    enabled: bool = True            # the default when no operator has switched it (ENABLED_KEY)
    canary_robots: tuple = ()       # named canaries; empty: a fraction of the online robots
    canary_fraction: float = 0.25   # of the robots with a fresh heartbeat: ceil(f*N), >= 1, <= N-1
    margin: float = 0.15            # "worse" = autonomous success lower by this much (absolute)
    alpha: float = 0.05             # P(promote | candidate is `margin` worse on every task)
    beta: float = 0.10              # P(refuse  | candidate as good as the fleet's version)
    min_episodes: int = 5           # candidate episodes (with a known outcome) before any decision
    max_episodes: int = 400         # ... and at most: then it expires (not promoted)
    max_wait_s: float = 1800.0      # a candidate older than this on the canaries expires
    min_baseline: int = 10          # fleet-version episodes on a task before that task counts
    baseline_window: int = 200      # newest fleet-version episodes per task used as the reference
    lookback_s: float = 6 * 3600.0  # how far back the episode stream is read at start
    online_after_s: float = 10.0    # a heartbeat younger than this: the robot is online
    tick_s: float = 0.2             # the gate's loop period (and XREAD block)
    watch: bool = True              # after a promotion, test the new fleet version on every robot's
                                    # episodes against the one it replaced; roll back if worse

    def __post_init__(self):
        if isinstance(self.canary_robots, str):
            self.canary_robots = tuple(r for r in self.canary_robots.split(",") if r)
        self.canary_robots = tuple(self.canary_robots)
        if not 0.0 < self.canary_fraction < 1.0:
            raise ValueError("canary_fraction must be in (0, 1)")
        if not 0.0 < self.margin < 1.0:
            raise ValueError("margin must be in (0, 1)")
        if not (0.0 < self.alpha < 0.5 and 0.0 < self.beta < 0.5):
            raise ValueError("alpha and beta must be in (0, 0.5)")
        if self.min_episodes < 1 or self.max_episodes < self.min_episodes or self.min_baseline < 1:
            raise ValueError("need 1 <= min_episodes <= max_episodes and min_baseline >= 1")

    @property
    def upper(self) -> float:
        """log A: the log-likelihood ratio at which the candidate is promoted."""
        return math.log((1 - self.beta) / self.alpha)

    @property
    def lower(self) -> float:
        """log B: the log-likelihood ratio at which the candidate is refused."""
        return math.log(self.beta / (1 - self.alpha))

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "RolloutSettings":
        env = os.environ if environ is None else environ
        kw = {}
        for f in fields(cls):
            raw = env.get("FLEETLOOP_ROLLOUT_" + f.name.upper())
            if raw is None:
                continue
            if f.name in ("enabled", "watch"):
                kw[f.name] = raw.strip().lower() not in ("0", "false", "no", "off")
            elif f.name == "canary_robots":
                kw[f.name] = raw
            elif f.type in ("int",):
                kw[f.name] = int(raw)
            else:
                kw[f.name] = float(raw)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["canary_robots"] = list(self.canary_robots)
        d["promote_at_llr"], d["refuse_at_llr"] = round(self.upper, 4), round(self.lower, 4)
        return d


# ---- the gate -------------------------------------------------------------------------------

class GateBusy(RuntimeError):
    """Another gate step holds the lock (the dashboard answers 409)."""


class RolloutGate:
    """The gate's state machine. Durable state lives in Redis (STATE_KEY ...), so the gate thread
    and any dashboard see and change the same thing; every change runs under LOCK_KEY.

    States: off (ENABLED_KEY = 0), holding (fleet pinned at `baseline`, no candidate), testing
    (`candidate` on the canaries). Transitions: candidate chosen (the NEWEST undecided version
    newer than the baseline), promote (evidence or an operator), refuse (evidence or an operator),
    expire (max_episodes / max_wait_s without a decision)."""

    def __init__(self, registry: PolicyRegistry, settings: Optional[RolloutSettings] = None,
                 book: Optional[EvidenceBook] = None):
        self.registry, self.redis = registry, registry.redis
        self.settings = settings or RolloutSettings()
        self.book = book
        self._metrics_lock = threading.Lock()

    # -- lock ------------------------------------------------------------------------------
    def _locked(self, fn, wait_s: float = 5.0):
        token = uuid.uuid4().hex
        deadline = time.monotonic() + wait_s
        while not self.redis.set(LOCK_KEY, token, nx=True, px=15_000):
            if time.monotonic() > deadline:
                raise GateBusy("the rollout gate is busy (another step holds its lock); try again")
            time.sleep(0.02)
        try:
            return fn()
        finally:
            self.redis.eval(_UNLOCK, 1, LOCK_KEY, token)

    # -- state -----------------------------------------------------------------------------
    def enabled(self) -> bool:
        raw = self.redis.get(ENABLED_KEY)
        return self.settings.enabled if raw is None else _s(raw) == "1"

    def state(self) -> dict:
        raw = {_s(k): _s(v) for k, v in self.redis.hgetall(STATE_KEY).items()}
        return {"baseline": raw.get("baseline") or None, "candidate": raw.get("candidate") or None,
                "since_ns": int(raw.get("since_ns") or 0), "refs": json.loads(raw.get("refs") or "{}"),
                "canary_robots": json.loads(raw.get("canary_robots") or "[]"),
                "gate_seen_ns": int(raw.get("gate_seen_ns") or 0), "note": raw.get("note", ""),
                "watch": raw.get("watch") or None, "watch_prev": raw.get("watch_prev") or None,
                "watch_since_ns": int(raw.get("watch_since_ns") or 0),
                "watch_refs": json.loads(raw.get("watch_refs") or "{}")}

    def decided(self) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in self.redis.hgetall(DECIDED_KEY).items()}

    def decisions(self, limit: int = 50) -> list[dict]:
        return [json.loads(_s(e)) for e in reversed(self.redis.lrange(DECISIONS_KEY, -limit, -1))]

    def _record(self, decision: str, version: str, by: str, reason: str, evidence: Optional[dict] = None,
                **extra) -> dict:
        entry = {"ts_ns": time.time_ns(), "decision": decision, "version": version, "by": by,
                 "reason": reason, "evidence": evidence, **extra}
        kind = "gate" if by == GATE else "operator"
        pipe = self.redis.pipeline()
        pipe.rpush(DECISIONS_KEY, json.dumps(entry, allow_nan=False, default=str))
        pipe.ltrim(DECISIONS_KEY, -DECISIONS_MAX, -1)
        if version and decision in ("promote", "refuse", "expire", "abandon", "rollback"):
            pipe.hset(DECIDED_KEY, version, decision)
        pipe.hincrby(COUNTERS_KEY, f"{decision}|{kind}", 1)
        pipe.execute()
        log.info("rollout: %s %s by %s: %s", decision, version, by, reason)
        return entry

    def _set_state(self, **kv) -> None:
        mapping = {k: (json.dumps(v) if isinstance(v, (dict, list, tuple)) else ("" if v is None else str(v)))
                   for k, v in kv.items()}
        self.redis.hset(STATE_KEY, mapping=mapping)

    # -- canaries --------------------------------------------------------------------------
    def online_robots(self) -> list[str]:
        """Robots whose heartbeat is younger than online_after_s, sorted. Heartbeats are robot-written:
        read through fleetloop.dashboard.heartbeat (an unreadable one, or a last_seen_ns that is
        not a count, is offline)."""
        hbs, now = heartbeat.read_all(self.redis), time.time_ns()
        return [rid for rid, hb in hbs.items()
                if hb and (now - hb["last_seen_ns"]) / 1e9 <= self.settings.online_after_s]

    def choose_canaries(self) -> tuple[list[str], float]:
        """(robot_ids, fraction) for set_canary: named robots if configured; else ceil(f*N) of the
        online robots (at least 1, at most N-1, the same ones each time: registry.canary_member's
        hash order); with no heartbeats at all, the registry's stable fraction of robot ids."""
        s = self.settings
        if s.canary_robots:
            return sorted(s.canary_robots), 0.0
        online = self.online_robots()
        if not online:
            return [], s.canary_fraction
        import hashlib
        k = max(1, min(len(online) - 1, math.ceil(s.canary_fraction * len(online)))) if len(online) > 1 else 1
        ranked = sorted(online, key=lambda r: hashlib.sha256(r.encode()).digest())
        return sorted(ranked[:k]), 0.0

    # -- one step --------------------------------------------------------------------------
    def tick(self) -> Optional[dict]:
        """One gate step (the gate thread calls it every tick_s). Returns a decision made, if any."""
        return self._locked(self._tick)

    def _tick(self) -> Optional[dict]:
        st = self.state()
        self._set_state(gate_seen_ns=time.time_ns())
        if not self.enabled():
            return None
        reg = self.registry
        pointer = reg.pointer()
        if not pointer.get("version"):  # nothing current yet: the first version needs no evidence
            latest = reg.latest_version()
            if not latest:
                return None
            reg.pin_fleet(latest, by=GATE)
            self._set_state(baseline=latest, candidate="", since_ns=0, refs={}, note="bootstrap")
            return self._record("promote", latest, GATE, "bootstrap: no version was current")
        current = pointer["version"]
        if not pointer.get("pinned"):
            # Hold the fleet: from here on publishes do not move it (an operator who unpinned it
            # while the gate is on gets it held again where it now is).
            reg.pin_fleet(current, by=GATE)
        canary = reg.canary()
        cand = st["candidate"]
        if st["baseline"] != current:
            # The pointer moved outside the gate (an operator's promote / pin / rollback): that
            # version is the reference from now on.
            if st["baseline"]:
                note = f"fleet moved {st['baseline']} -> {current} outside the gate"
                self._record("observe", current, "operator", note)
            if cand and cand == current:  # the candidate itself was promoted by hand
                self._set_state(baseline=current, candidate="", since_ns=0, refs={}, note="", **NO_WATCH)
                if canary and canary["version"] == cand:
                    reg.clear_canary(by=GATE)
                return None
            self._set_state(baseline=current, refs={}, **NO_WATCH)  # an operator's move is not watched
            st["baseline"], st["refs"], st["watch"] = current, {}, None
        if st["watch"]:
            decided = self._watch(st)
            if decided:
                return decided
        if cand:
            if not canary or canary["version"] != cand:
                # An operator changed or cleared the canary: this test is over, nothing promoted.
                self._set_state(candidate="", since_ns=0, refs={}, note="canary changed outside the gate")
                return self._record("abandon", cand, "operator", "the canary was changed or cleared outside the gate")
            return self._judge(st, cand)
        if canary:  # an operator's own canary: leave it alone until it is cleared
            self._set_state(note=f"paused: operator canary on {canary['version']}")
            return None
        nxt = self.next_candidate(current)
        if nxt:
            robots, fraction = self.choose_canaries()
            reg.set_canary(nxt, robot_ids=robots, fraction=fraction or None, by=GATE)
            self._set_state(candidate=nxt, since_ns=time.time_ns(), refs={}, canary_robots=robots,
                            note="")
            return self._record("canary", nxt, GATE, f"newest undecided version on the canaries "
                                                     f"({', '.join(robots) if robots else f'fraction {fraction}'})",
                                robots=robots, fraction=fraction)
        self._set_state(note="")
        self._write_evidence(st)
        return None

    def _write_evidence(self, st: dict) -> Optional[dict]:
        if self.book is None:
            return None
        ev = self.evidence(st)
        self.redis.set(EVIDENCE_KEY, json.dumps({**ev, "ts_ns": time.time_ns()}, allow_nan=False, default=str))
        return ev

    def next_candidate(self, baseline: str) -> Optional[str]:
        """The NEWEST version newer than the baseline that no decision covers: versions published
        while a test ran are skipped, so a version every few seconds cannot starve the gate."""
        latest = self.registry.latest_version()
        if not latest or _seq(latest) <= _seq(baseline) or self.redis.hexists(DECIDED_KEY, latest):
            return None  # nothing newer, or the newest is decided: wait for the learner's next one
        return latest

    def evidence(self, st: Optional[dict] = None) -> dict:
        """The running test's evidence (needs the book: the gate process). Freezes each task's
        reference rate the first time the fleet version has min_baseline episodes on it."""
        s = self.settings
        st = st or self.state()
        base, cand, refs = st["baseline"], st["candidate"], dict(st["refs"])
        out = {"baseline": base, "candidate": cand, "since_ns": st["since_ns"], "settings": s.as_dict()}
        if self.book is None or not base:
            return out
        base_tasks = {t: self.book.tally(base, t, newest=s.baseline_window) for t in self.book.tasks(base)}
        out["baseline_evidence"] = {t: x.as_dict() for t, x in base_tasks.items()}
        out["baseline_total"] = self.book.tally(base).as_dict()
        if st.get("watch"):
            out["watch"] = self.watch_evidence(st)
        if not cand:
            return out
        cand_tasks = {t: self.book.tally(cand, t) for t in self.book.tasks(cand)}
        frozen = False
        for t in cand_tasks:
            bt = base_tasks.get(t)
            if t not in refs and bt is not None and bt.known >= s.min_baseline:
                refs[t] = reference_rate(bt)
                frozen = True
        if frozen:
            self._set_state(refs=refs)
        test = sprt(cand_tasks, refs, s)
        out.update({"candidate_total": self.book.tally(cand).as_dict(), "test": test, "refs": refs})
        return out

    def _summary(self, test: dict) -> dict:
        """What a decision keeps of a test: the statistic, its thresholds, per task."""
        s = self.settings
        return {"llr": test["llr"], "n": test["n"], "promote_at": round(s.upper, 4), "refuse_at": round(s.lower, 4),
                "worse_tasks": test["worse_tasks"], "per_task": test["per_task"]}

    def _why_worse(self, test: dict) -> str:
        """The refusal's reason: the tasks shown worse on their own, or the summed statistic."""
        s = self.settings
        if test["worse_tasks"] and test["llr"] > s.lower:
            return f" on {', '.join(test['worse_tasks'])}: SPRT log-LR per task <= {s.lower:.3f}"
        return f": SPRT log-LR {test['llr']} <= {s.lower:.3f}"

    def _redis_now_ns(self) -> int:
        sec, usec = self.redis.time()
        return int(sec) * 1_000_000_000 + int(usec) * 1000

    def _judge(self, st: dict, cand: str) -> Optional[dict]:
        s = self.settings
        ev = self._write_evidence(st)
        test = ev.get("test") if ev else None
        if test is None:
            return None
        summary = self._summary(test)
        age_s = (time.time_ns() - st["since_ns"]) / 1e9 if st["since_ns"] else 0.0
        if test["decision"] == "promote":
            return self._promote(cand, GATE, f"not worse than {st['baseline']}: SPRT log-LR {test['llr']} >= "
                                             f"{s.upper:.3f} after {test['n']} episodes", summary)
        if test["decision"] == "refuse":
            return self._refuse(cand, GATE, f"worse than {st['baseline']}{self._why_worse(test)} "
                                            f"after {test['n']} episodes", summary)
        if test["n"] >= s.max_episodes or age_s >= s.max_wait_s:
            return self._refuse(cand, GATE, f"inconclusive after {test['n']} episodes / {age_s:.0f} s "
                                            f"(log-LR {test['llr']}); not promoted", summary, decision="expire")
        return None

    def _promote(self, version: str, by: str, reason: str, evidence=None) -> dict:
        reg = self.registry
        st = self.state()
        replaced = reg.pointer().get("version")
        reg.promote(version, by=by)  # the fleet stays pinned, now on `version`
        canary = reg.canary()
        if canary and canary["version"] in (version, st["candidate"]):
            reg.clear_canary(by=by)
        if st["candidate"] and st["candidate"] != version:
            self._record("abandon", st["candidate"], by, f"test ended: {version} was promoted instead")
        watch, extra = NO_WATCH, {}
        if self.settings.watch and replaced and _seq(version) > _seq(replaced):  # not a move back
            # The episode stream's clock (Redis's), not this host's or the robots': only episodes
            # announced after this moment count.
            watch = {**NO_WATCH, "watch": version, "watch_prev": replaced, "watch_since_ns": self._redis_now_ns()}
            extra = {"watched_against": replaced}
        self._set_state(baseline=version, candidate="", since_ns=0, refs={}, note="", **watch)
        return self._record("promote", version, by, reason, evidence, **extra)

    # -- the watch after a promotion -------------------------------------------------------
    # The canary test promotes a version that is not worse with probability >= 1 - alpha per
    # test; across many tests some worse ones get through, and an operator may promote one by
    # hand. So after every promotion forward the same SPRT runs again, now on the episodes the
    # whole fleet records with the new version (only those announced after the promotion, so the
    # evidence is independent of what promoted it), against the version it replaced. Shown worse: the fleet
    # goes back (rollback). Shown not worse: the watch ends (confirm); neither within max_episodes /
    # max_wait_s: it ends and the version stays (settle). A move by an operator ends it too.

    def watch_evidence(self, st: dict) -> Optional[dict]:
        """The watch's test (needs the book). Freezes each task's reference, the replaced
        version's rate over its newest baseline_window episodes, the first time it has enough."""
        if self.book is None or not st["watch"]:
            return None
        s = self.settings
        watched, replaced, since = st["watch"], st["watch_prev"], st["watch_since_ns"]
        refs = st["watch_refs"]
        tasks = {t: self.book.tally(watched, t, since_ns=since) for t in self.book.tasks(watched)}
        frozen = False
        for t in tasks:
            before = self.book.tally(replaced, t, newest=s.baseline_window)
            if t not in refs and before.known >= s.min_baseline:
                refs[t] = reference_rate(before)
                frozen = True
        if frozen:
            self._set_state(watch_refs=refs)
        return {"version": watched, "replaced": replaced, "since_ns": since, "refs": dict(refs),
                "total": self.book.tally(watched, since_ns=since).as_dict(), "test": sprt(tasks, refs, s)}

    def _watch(self, st: dict) -> Optional[dict]:
        if st["watch"] != st["baseline"]:  # not the fleet's version any more: nothing to watch
            self._set_state(**NO_WATCH)
            st["watch"] = None
            return None
        ev = self.watch_evidence(st)
        if ev is None:
            return None
        s, test = self.settings, ev["test"]
        watched, replaced = ev["version"], ev["replaced"]
        summary = {**self._summary(test), "replaced": replaced}
        age_s = (self._redis_now_ns() - ev["since_ns"]) / 1e9
        if test["decision"] == "refuse":
            return self._rollback(st, f"worse than {replaced} on the fleet{self._why_worse(test)} after "
                                      f"{test['n']} episodes since its promotion", summary)
        if test["decision"] == "promote":
            self._set_state(**NO_WATCH)
            return self._record("confirm", watched, GATE, f"not worse than {replaced} on the fleet: SPRT log-LR "
                                                         f"{test['llr']} >= {s.upper:.3f} after {test['n']} episodes",
                                summary)
        if test["n"] >= s.max_episodes or age_s >= s.max_wait_s:
            self._set_state(**NO_WATCH)
            return self._record("settle", watched, GATE, f"watch inconclusive after {test['n']} episodes / "
                                                        f"{age_s:.0f} s (log-LR {test['llr']}); kept", summary)
        return None

    def _rollback(self, st: dict, reason: str, evidence: dict) -> dict:
        reg = self.registry
        watched, replaced = st["watch"], st["watch_prev"]
        reg.pin_fleet(replaced, by=GATE)  # robots swap back at their next episode
        cand = st["candidate"]
        if cand:  # its test compared it with the version now rolled back: void
            canary = reg.canary()
            if canary and canary["version"] == cand:
                reg.clear_canary(by=GATE)
            self._record("abandon", cand, GATE, f"test ended: its reference {watched} was rolled back")
        self._set_state(baseline=replaced, candidate="", since_ns=0, refs={}, note="", **NO_WATCH)
        st.update(baseline=replaced, candidate=None, watch=None)
        return self._record("rollback", watched, GATE, reason, evidence, to=replaced)

    def _refuse(self, version: str, by: str, reason: str, evidence=None, decision: str = "refuse") -> dict:
        reg = self.registry
        canary = reg.canary()
        if canary and canary["version"] == version:
            reg.clear_canary(by=by)  # the canaries go back to the fleet's version at their next episode
        st = self.state()
        if st["candidate"] == version:
            self._set_state(candidate="", since_ns=0, refs={}, note="")
        return self._record(decision, version, by, reason, evidence)

    # -- operator actions (the dashboard) ---------------------------------------------------
    def manual_promote(self, version: str, by: str, reason: str = "") -> dict:
        """Promote `version` now (the candidate, or any version), whatever the evidence says."""
        def op():
            self.registry.manifest(version)  # UnknownVersion -> 404
            st = self.state()
            ev = self._last_evidence() if st["candidate"] == version else None
            return self._promote(version, by, reason or "promoted by an operator", ev)
        return self._locked(op)

    def manual_reject(self, version: str, by: str, reason: str = "") -> dict:
        """Refuse `version`: off the canaries now, never promoted by the gate."""
        def op():
            self.registry.manifest(version)
            if self.registry.pointer().get("version") == version:
                raise RegistryError(f"{version} is the fleet's current version; roll back instead")
            st = self.state()
            ev = self._last_evidence() if st["candidate"] == version else None
            return self._refuse(version, by, reason or "refused by an operator", ev)
        return self._locked(op)

    def set_enabled(self, on: bool, by: str) -> dict:
        """Switch the gate. Off: the canary it set is cleared and the fleet unpinned (it follows the
        learner's publishes again, SOP-style). On: the next tick holds the fleet where it is."""
        def op():
            was = self.enabled()
            self.redis.set(ENABLED_KEY, "1" if on else "0")
            if was and not on:
                st = self.state()
                canary = self.registry.canary()
                if st["candidate"] and canary and canary["version"] == st["candidate"]:
                    self.registry.clear_canary(by=by)
                if self.registry.pointer().get("pinned"):
                    self.registry.unpin_fleet(follow_latest=True, by=by)
                self._set_state(candidate="", since_ns=0, refs={}, note="off", **NO_WATCH)
            if was != on:
                self._record("enable" if on else "disable", "", by, f"gate switched {'on' if on else 'off'}")
            return self.status()
        return self._locked(op)

    def _last_evidence(self) -> Optional[dict]:
        raw = self.redis.get(EVIDENCE_KEY)
        if not raw:
            return None
        ev = json.loads(raw)
        return {"test": ev.get("test"), "candidate_total": ev.get("candidate_total")}

    def status(self, decisions: int = 20) -> dict:
        st = self.state()
        raw = self.redis.get(EVIDENCE_KEY)
        ev = json.loads(raw) if raw else None
        if ev and (ev.get("candidate") != st["candidate"] or ev.get("baseline") != st["baseline"]):
            ev = None  # from an earlier test
        settings = self.redis.get(SETTINGS_KEY)
        seen = st["gate_seen_ns"]
        return {"enabled": self.enabled(), "gate_running": bool(seen) and (time.time_ns() - seen) / 1e9 < 10.0,
                "gate_seen_ns": seen, "baseline": st["baseline"], "candidate": st["candidate"],
                "candidate_since_ns": st["since_ns"], "canary_robots": st["canary_robots"], "note": st["note"],
                "watch": st["watch"], "watch_replaced": st["watch_prev"], "watch_since_ns": st["watch_since_ns"],
                "settings": json.loads(settings) if settings else self.settings.as_dict(),
                "evidence": ev, "decisions": self.decisions(decisions),
                "counters": {_s(k): int(v) for k, v in self.redis.hgetall(COUNTERS_KEY).items()}}


# ---- the service thread -----------------------------------------------------------------------

class GateService:
    """The gate in a process: follow the evidence, tick the gate. start() holds the fleet before
    returning (so a learner started after it can never move the fleet to an untested version)."""

    def __init__(self, registry: PolicyRegistry, settings: Optional[RolloutSettings] = None, store=None):
        self.settings = settings or RolloutSettings()
        self.book = EvidenceBook()
        self.gate = RolloutGate(registry, self.settings, self.book)
        self.follower = EvidenceFollower(registry.redis, self.book, store=store, lookback_s=self.settings.lookback_s)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.errors = 0

    def start(self) -> "GateService":
        r = self.gate.redis
        r.set(SETTINGS_KEY, json.dumps(self.settings.as_dict()))
        if r.get(ENABLED_KEY) is None:
            r.set(ENABLED_KEY, "1" if self.settings.enabled else "0")
        self.follower.drain()
        self.gate.tick()
        self._thread = threading.Thread(target=self._run, name="rollout-gate", daemon=True)
        self._thread.start()
        return self

    def step(self, block_ms: Optional[int] = None) -> Optional[dict]:
        self.follower.poll(block_ms=int(self.settings.tick_s * 1000) if block_ms is None else block_ms)
        return self.gate.tick()

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self.step()
                backoff = 0.2
            except GateBusy:
                continue
            except (redis.RedisError, OSError, RegistryError, UnknownVersion) as e:
                self.errors += 1
                log.warning("rollout gate: %s: %s; retrying in %.1fs", type(e).__name__, e, backoff)
                self._stop.wait(backoff)
                backoff = min(5.0, backoff * 2)
            except Exception:
                self.errors += 1
                log.exception("rollout gate step failed")
                self._stop.wait(backoff)
                backoff = min(5.0, backoff * 2)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)


def add_arguments(p) -> None:
    """The gate's flags on `fleetloop learner` / `fleetloop up`."""
    p.add_argument("--rollout", choices=["on", "off"], default=None,
                   help="gate new versions on canary evidence before the fleet gets them (default on; "
                        "FLEETLOOP_ROLLOUT_ENABLED); off: every publish goes to every robot (SOP)")
    p.add_argument("--rollout-canary", default=None, metavar="ROBOT,ROBOT",
                   help="named canary robots (default: --rollout-canary-fraction of the online robots)")
    p.add_argument("--rollout-canary-fraction", type=float, default=None, help="default 0.25")
    p.add_argument("--rollout-margin", type=float, default=None,
                   help="autonomous success this much lower counts as worse (default 0.15)")
    p.add_argument("--rollout-watch", choices=["on", "off"], default=None,
                   help="after a promotion, test the new version on the whole fleet against the one it "
                        "replaced and roll back if it is worse (default on; FLEETLOOP_ROLLOUT_WATCH)")


def settings_from_args(args) -> RolloutSettings:
    on = getattr(args, "rollout", None)
    return RolloutSettings.from_env(enabled=None if on is None else on == "on",
                                    canary_robots=getattr(args, "rollout_canary", None),
                                    canary_fraction=getattr(args, "rollout_canary_fraction", None),
                                    margin=getattr(args, "rollout_margin", None),
                                    watch=None if getattr(args, "rollout_watch", None) is None
                                    else args.rollout_watch == "on")
