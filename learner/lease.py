"""The learner lease: one learner per run writes versions and checkpoints, and a zombie cannot.

    lease = Lease(redis_client, run_name="default", ttl_s=15)
    lease.acquire(wait_s=60)           # SET NX PX: blocks while another learner holds it
    lease.renew()                      # the driver, every ttl/3 (LeaseRenewer does it)
    lease.check()                      # before every side effect; raises LeaseLost
    lease.incr_if_held(counter)        # INCR only while the lease is ours (version numbers)

Redis key `fleetloop:learner:<run>:lease` holds "<token>:<holder>" with a TTL; the token comes
from INCR on `fleetloop:learner:<run>:fence`, so every acquisition has its own fencing token.
The driver renews the lease; the train workers hold its value (LeaseSpec, plain strings) and
check it before every publish (reserving the version number, committing the manifest, moving the
pointer) and every checkpoint write (state.json, LATEST, pruning). When the driver dies -- even
by kill -9 -- renewals stop, the key expires after ttl_s, and from then on every check a
surviving worker makes fails: it stops without writing. A new learner acquires the lease only
after that expiry, so two learners never write at once (up to the window between one check and
the put that follows it: a few milliseconds, against a TTL of seconds).

After Redis loses its data the key is gone: checks fail for everyone, and the live driver's next
renew() takes the key back with its own value (nobody else can hold it: SET NX).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import redis

log = logging.getLogger(__name__)

LEASE_PREFIX = "fleetloop:learner:"


class LeaseLost(Exception):
    """This learner no longer holds the lease: it must not write."""


def lease_key(run_name: str) -> str:
    return f"{LEASE_PREFIX}{run_name}:lease"


def fence_key(run_name: str) -> str:
    return f"{LEASE_PREFIX}{run_name}:fence"


_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""
_INCR_IF_HELD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('LEASELOST') end
return redis.call('INCR', KEYS[2])
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_DECR_IF = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DECR', KEYS[2]) return 1 end
return 0
"""


@dataclass
class LeaseSpec:
    """What a train worker needs to check the lease (plain strings: it crosses to Ray workers)."""
    redis_url: str
    run_name: str
    value: str
    ttl_s: float


class Lease:
    def __init__(self, client: redis.Redis, run_name: str = "default", ttl_s: float = 15.0,
                 holder: str | None = None, value: str | None = None):
        if ttl_s <= 0:
            raise ValueError("lease ttl_s must be positive")
        self.client, self.run_name, self.ttl_s = client, run_name, ttl_s
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.value = value            # "<token>:<holder>" once acquired
        self.key, self.fence_key = lease_key(run_name), fence_key(run_name)

    @property
    def token(self) -> int:
        return int(self.value.split(":", 1)[0]) if self.value else 0

    @classmethod
    def from_spec(cls, spec: LeaseSpec | dict, client: redis.Redis | None = None) -> "Lease":
        s = spec if isinstance(spec, LeaseSpec) else LeaseSpec(**spec)
        client = client or redis.Redis.from_url(s.redis_url, socket_timeout=10, socket_connect_timeout=5)
        return cls(client, s.run_name, s.ttl_s, value=s.value)

    def spec(self, redis_url: str) -> dict:
        if not self.value:
            raise LeaseLost("lease not acquired")
        return asdict(LeaseSpec(redis_url, self.run_name, self.value, self.ttl_s))

    def acquire(self, wait_s: float = 0.0) -> int:
        """Take the lease; wait up to wait_s for a holder's lease to expire. Returns the token."""
        deadline = time.monotonic() + wait_s
        while True:
            token = int(self.client.incr(self.fence_key))
            value = f"{token}:{self.holder}"
            if self.client.set(self.key, value, nx=True, px=int(self.ttl_s * 1000)):
                self.value = value
                log.info("learner lease %s acquired (fencing token %d)", self.key, token)
                return token
            if time.monotonic() >= deadline:
                other = self.client.get(self.key)
                raise LeaseLost(f"another learner holds {self.key}: "
                                f"{other.decode() if isinstance(other, bytes) else other}")
            time.sleep(min(0.5, max(0.01, deadline - time.monotonic())))

    def renew(self) -> bool:
        """Extend the lease; False if someone else holds it now."""
        if not self.value:
            return False
        r = int(self.client.eval(_RENEW, 1, self.key, self.value, int(self.ttl_s * 1000)))
        if r == 2:
            log.warning("learner lease %s was gone (Redis lost its data?); taken back", self.key)
        return r > 0

    def held(self) -> bool:
        v = self.client.get(self.key)
        return bool(self.value) and (v.decode() if isinstance(v, bytes) else v) == self.value

    def check(self) -> None:
        if not self.held():
            raise LeaseLost(f"learner lease {self.key} is not ours ({self.value}): refusing to write")

    def incr_if_held(self, counter_key: str) -> int:
        try:
            return int(self.client.eval(_INCR_IF_HELD, 2, self.key, counter_key, self.value or ""))
        except redis.ResponseError as e:
            if "LEASELOST" in str(e):
                raise LeaseLost(f"learner lease {self.key} is not ours ({self.value}): refusing to write") from None
            raise

    def decr_if(self, counter_key: str, expected: int) -> bool:
        """Give back a reserved number: DECR counter_key iff it still reads `expected` and the
        lease is ours (nothing was reserved after it)."""
        return bool(int(self.client.eval(_DECR_IF, 2, self.key, counter_key, self.value or "", str(expected))))

    def release(self) -> bool:
        if not self.value:
            return False
        try:
            return bool(int(self.client.eval(_RELEASE, 1, self.key, self.value)))
        except redis.RedisError as e:
            log.warning("could not release learner lease: %s", e)
            return False


class LeaseRenewer:
    """Renews a lease every ttl/3 on a thread; calls on_lost once if it is lost."""

    def __init__(self, lease: Lease, on_lost=None):
        self.lease, self.on_lost = lease, on_lost
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="learner-lease", daemon=True)

    def start(self) -> "LeaseRenewer":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.lease.ttl_s / 3):
            try:
                ok = self.lease.renew()
            except redis.RedisError as e:
                log.warning("could not renew the learner lease (%s); retrying", e)
                continue
            if not ok:
                self.lost = True
                log.error("ALERT learner lease %s lost to another learner: this learner stops writing",
                          self.lease.key)
                if self.on_lost:
                    self.on_lost()
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
