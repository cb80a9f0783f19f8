"""PolicySlot: the robot's running policy and the next one, swapped only between episodes.

A background thread keeps a *pending* policy ready: it listens on POLICY_CHANNEL and also polls
every poll_interval_s (a missed notice or a Redis outage then costs at most one poll), resolves
what this robot should run (registry.resolve: robot pin > canary > fleet pointer), downloads,
verifies the sha256 against the manifest, and calls load_fn -- all off the control loop.

begin_episode() is the only place the running policy changes, so no episode mixes two
versions. Everything the thread does is retried with backoff; it never dies on an outage, and a
version that fails verification or loading is retried with its own backoff while the robot
keeps running what it has.
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import redis

from fleetloop import config
from fleetloop.release import signing, steering
from fleetloop.release.guidance import Guidance
from fleetloop.release.registry import PolicyRegistry, Target

log = logging.getLogger(__name__)


class NoPolicyYet(RuntimeError):
    """begin_episode() before any policy was given or loaded."""


@dataclass
class _Loaded:
    policy: Any
    version: str
    since_ns: int        # when it became this robot's target (registry clock)
    loaded_ns: int       # verified and built, ready to swap
    fetch_s: float
    load_s: float
    bytes_moved: int
    via: str


def _takes_version(fn: Callable) -> bool:
    """load_fn(config_json, weights) or load_fn(config_json, weights, version)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3


def _takes_guidance(fn: Callable) -> bool:
    """load_fn accepts guidance= (PolicyLoader does): the version's published inference settings."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "guidance" or p.kind is p.VAR_KEYWORD for p in params)


def _summary(values) -> dict:
    v = sorted(values)
    if not v:
        return {"n": 0}
    return {"n": len(v), "last": round(values[-1], 4), "p50": round(v[len(v) // 2], 4), "max": round(v[-1], 4)}


class PolicySlot:
    def __init__(self, registry: PolicyRegistry, robot_id: str, load_fn: Callable[..., Any],
                 initial_policy: Any = None, poll_interval_s: float = 5.0, max_backoff_s: float = 30.0,
                 keep_base: bool = True, steering_state: Optional[str | os.PathLike] = None):
        """load_fn(config_json, weights[, version][, guidance=]) -> a Policy; called on the slot's
        thread with verified bytes; guidance: the version's signed inference settings
        (fleetloop.release.guidance.Guidance), passed when load_fn takes it. keep_base: hold the
        last loaded version's bytes so a version published as a delta against it downloads only
        the changed blocks. steering_state: a file on the robot that remembers the newest
        pointer/pin/canary record accepted, so a restart still refuses older (replayed) ones
        (fleetloop.release.steering); None keeps it in memory only."""
        self.registry, self.robot_id, self.load_fn = registry, robot_id, load_fn
        if registry.trust is None:  # a robot runs only versions and pointer moves signed by a trusted key
            registry.trust = signing.TrustStore.default()
        if registry.memory is None or steering_state is not None:
            registry.memory = steering.SteeringMemory(steering_state)
        if not len(registry.trust) and not signing.insecure_allowed():
            log.error("robot %s: no trusted policy keys (%s or %s); every policy version will be refused",
                      robot_id, signing.TRUSTED_KEYS_ENV, signing.keys_dir() / "trusted")
        self.poll_interval_s, self.max_backoff_s, self.keep_base = poll_interval_s, max_backoff_s, keep_base
        self._load_takes_version = _takes_version(load_fn)
        self._load_takes_guidance = _takes_guidance(load_fn)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # signalled when pending/current change
        self._current = initial_policy
        self._current_version: Optional[str] = (str(getattr(initial_policy, "version", "") or "")
                                                if initial_policy is not None else None)
        self._pending: Optional[_Loaded] = None
        self._base: Optional[tuple[str, bytes]] = None
        self._retry_at: dict[str, tuple[float, float]] = {}  # version -> (monotonic time, backoff)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pubsub = None
        # status
        self.target: Optional[Target] = None
        self.last_error: Optional[str] = None
        self.steering_alerts: list[str] = []  # why the last resolution ignored a stored record
        self.last_error_ns = 0
        self.errors = self.loads = self.swaps = self.bytes_moved = 0
        self.fetches = {"full": 0, "delta": 0}
        self.last_load: Optional[dict] = None
        self._publish_to_loaded: deque[float] = deque(maxlen=200)
        self._loaded_to_swapped: deque[float] = deque(maxlen=200)

    # ---- the control loop's side ---------------------------------------------------------

    def begin_episode(self) -> tuple[Any, str]:
        """THE swap point. Promotes a pending policy, if any, and returns (policy, version): the
        caller uses exactly this policy for the whole episode."""
        with self._lock:
            p = self._pending
            if p is not None:
                now = time.time_ns()
                self._current, self._current_version, self._pending = p.policy, p.version, None
                self.swaps += 1
                self._loaded_to_swapped.append((now - p.loaded_ns) / 1e9)
                self._changed.notify_all()
                log.debug("robot %s now runs policy %s", self.robot_id, p.version)
            if self._current is None:
                raise NoPolicyYet(f"robot {self.robot_id}: no policy loaded yet (nothing published?)")
            return self._current, self._current_version or ""

    def next_policy(self) -> tuple[Any, str]:
        """(policy, version) the next begin_episode() returns without swapping anything: the
        pending one if loaded, else the current one ((None, "") before the first load)."""
        with self._lock:
            p = self._pending
            if p is not None:
                return p.policy, p.version
            return self._current, self._current_version or ""

    @property
    def current_policy(self) -> Any:
        """The policy episodes run now (None before the first load); swaps only at begin_episode."""
        return self._current

    @property
    def current_version(self) -> Optional[str]:
        return self._current_version

    @property
    def pending_version(self) -> Optional[str]:
        p = self._pending
        return p.version if p else None

    def wait_ready(self, version: Optional[str] = None, timeout: Optional[float] = None) -> bool:
        """Block until `version` (or, with None, any policy) is current or pending."""
        def ready():
            held = {self._current_version, self.pending_version} - {None}
            return version in held if version else (self._current is not None or self._pending is not None)
        with self._changed:
            return self._changed.wait_for(ready, timeout)

    def status(self) -> dict:
        with self._lock:
            return {
                "robot_id": self.robot_id,
                "current_version": self._current_version,
                "pending_version": self.pending_version,
                "target_version": self.target.version if self.target else None,
                "target_source": self.target.source if self.target else None,
                "running": bool(self._thread and self._thread.is_alive()),
                "last_error": self.last_error,
                "last_error_ns": self.last_error_ns,
                "steering_alerts": list(self.steering_alerts),
                "errors": self.errors,
                "loads": self.loads,
                "swaps": self.swaps,
                "bytes_moved": self.bytes_moved,
                "fetches": dict(self.fetches),
                "last_load": dict(self.last_load) if self.last_load else None,
                "publish_to_loaded_s": _summary(list(self._publish_to_loaded)),
                "loaded_to_swapped_s": _summary(list(self._loaded_to_swapped)),
            }

    # ---- background thread ---------------------------------------------------------------

    def start(self) -> "PolicySlot":
        if self._thread and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"policy-slot-{self.robot_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread. One busy with a large download exits when it finishes (it checks the
        stop flag); its pubsub is closed by the thread itself, never under its feet."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def sync_once(self) -> Optional[str]:
        """Resolve this robot's target and, if it is new, fetch + verify + load it as pending.
        Returns the version loaded, else None. Redis errors propagate (the loop backs off);
        per-version failures are recorded and retried later with their own backoff."""
        self.registry.trust.refresh()  # a .pub added or removed on disk counts from now on
        # Verifies the pin/canary/pointer signatures and refuses replays; a refused record is
        # ignored (the robot goes by what it accepted before) and reported, never a block.
        target, alerts = self.registry.resolve_with_alerts(self.robot_id)
        if alerts:
            self._error("steering record refused: " + "; ".join(alerts))
        self.steering_alerts = list(alerts)
        self.target = target
        if target is None:
            return None
        v = target.version
        with self._lock:
            if v == self._current_version:
                if self._pending is not None:  # e.g. rolled back before the swap happened
                    log.debug("robot %s: dropping pending %s, target is current %s",
                              self.robot_id, self._pending.version, v)
                    self._pending = None
                return None
            if self._pending is not None:
                if self._pending.version == v:
                    return None
                # Superseded (newer publish, pin, rollback): it must not be swapped in any more,
                # and dropping it now frees its memory before the next version is loaded.
                self._pending = None
        retry = self._retry_at.get(v)
        if retry and time.monotonic() < retry[0]:
            return None
        try:
            loaded = self._fetch_and_load(target)
        except Exception as e:  # WeightsIntegrityError, UnknownVersion, StoreError, load_fn's errors
            self._fail(v, e)
            return None
        self._retry_at.pop(v, None)
        try:  # an operator may have rolled back or pinned while we downloaded: never stage that
            still = self.registry.target_version(self.robot_id)
        except redis.RedisError:
            still = v  # cannot tell now; the next resolution corrects it before most swaps
        if still != v:
            log.debug("robot %s: %s superseded by %s while loading; not staged", self.robot_id, v, still)
            return None
        with self._lock:
            self._pending = loaded
            self._changed.notify_all()
        return v

    def _fetch_and_load(self, target: Target) -> _Loaded:
        t0 = time.perf_counter()
        # The signature first, on the stored bytes: an unsigned or forged version is refused
        # before its manifest is parsed, so nothing is sized or allocated from its contents.
        m = self.registry.verified_manifest(target.version)
        if self._base and not (m.delta_key and m.parent_version == self._base[0]):
            self._base = None  # no delta against it: free it before the full download
        f = self.registry.fetch_detailed(target.version, base=self._base)  # verified sha256
        t1 = time.perf_counter()
        if self.keep_base:  # verified bytes; replacing the old base now frees it before loading
            self._base = (target.version, f.weights)
        # How the version runs is part of what was signed; out-of-range values refuse the version.
        kw = {"guidance": Guidance.from_manifest(f.manifest)} if self._load_takes_guidance else {}
        if self._load_takes_version:
            policy = self.load_fn(f.manifest.config_json, f.weights, target.version, **kw)
        else:
            policy = self.load_fn(f.manifest.config_json, f.weights, **kw)
            try:  # episodes are tagged with policy.version
                if getattr(policy, "version", None) != target.version:
                    policy.version = target.version
            except AttributeError:
                pass
        t2 = time.perf_counter()
        loaded_ns = time.time_ns()
        self.loads += 1
        self.bytes_moved += f.bytes_moved
        self.fetches[f.via] += 1
        latency = (loaded_ns - target.since_ns) / 1e9 if target.since_ns else None
        if latency is not None:
            self._publish_to_loaded.append(latency)
        g = getattr(policy, "guidance", None)
        self.last_load = {"version": target.version, "source": target.source, "via": f.via,
                          "guidance": g.describe() if isinstance(g, Guidance) else None,
                          "bytes_moved": f.bytes_moved, "fetch_s": round(t1 - t0, 4), "load_s": round(t2 - t1, 4),
                          "publish_to_loaded_s": None if latency is None else round(latency, 4),
                          "since_ns": target.since_ns, "loaded_ns": loaded_ns}
        log.debug("robot %s: policy %s ready (%s, %.1f MB, fetch %.2fs, load %.2fs)", self.robot_id,
                  target.version, f.via, f.bytes_moved / 1e6, t1 - t0, t2 - t1)
        return _Loaded(policy, target.version, target.since_ns, loaded_ns, t1 - t0, t2 - t1, f.bytes_moved, f.via)

    def _fail(self, version: str, e: BaseException) -> None:
        _, prev = self._retry_at.get(version, (0.0, 0.0))
        backoff = min(self.max_backoff_s, max(0.5, prev * 2))
        self._retry_at[version] = (time.monotonic() + backoff, backoff)
        self._error(f"policy {version} not loaded: {type(e).__name__}: {e}")
        log.warning("robot %s: policy %s not loaded (%s); keeping %s, retry in %.1fs",
                    self.robot_id, version, e, self._current_version, backoff)

    def _error(self, msg: str) -> None:
        self.last_error, self.last_error_ns = msg, time.time_ns()
        self.errors += 1

    def _close_pubsub(self) -> None:
        ps, self._pubsub = self._pubsub, None
        if ps is not None:
            try:
                ps.close()
            except Exception:  # a dead connection may fail to close; nothing to keep
                pass

    def _run(self) -> None:
        backoff = 0.2
        next_poll = 0.0  # sync immediately on start: catch up on whatever happened meanwhile
        while not self._stop.is_set():
            try:
                if self._pubsub is None:
                    ps = self.registry.redis.pubsub(ignore_subscribe_messages=True)
                    ps.subscribe(config.POLICY_CHANNEL)
                    self._pubsub = ps
                    next_poll = 0.0  # anything published while we were not listening
                # Short waits so stop() is prompt; a notice wakes us at once.
                wait = max(0.0, min(0.25, next_poll - time.monotonic()))
                woke = self._pubsub.get_message(timeout=wait) is not None
                while woke and self._pubsub.get_message(timeout=0) is not None:
                    pass  # coalesce a burst of notices into one resolution
                if woke or time.monotonic() >= next_poll:
                    self.sync_once()
                    next_poll = time.monotonic() + self.poll_interval_s
                backoff = 0.2
            except (redis.RedisError, OSError) as e:
                self._error(f"redis: {type(e).__name__}: {e}")
                log.warning("robot %s: policy channel unavailable (%s); retry in %.1fs", self.robot_id, e, backoff)
                self._close_pubsub()
                self._stop.wait(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
            except Exception as e:  # never let the weights thread die; the robot keeps its policy
                self._error(f"unexpected: {type(e).__name__}: {e}")
                log.exception("robot %s: policy slot error", self.robot_id)
                self._stop.wait(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
        self._close_pubsub()
