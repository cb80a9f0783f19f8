"""The policy registry: the one place that knows where published weights live and which version
each robot should run.

Storage (object store, immutable once written):
  policies/<version>/model.safetensors   the weights, opaque bytes from the learner
  policies/<version>/delta.safetensors   optional: the blocks that changed since parent_version
  policies/<version>/manifest.json       PolicyManifest (protobuf JSON) -- written LAST = commit

A version exists once its manifest exists: a reader never sees a manifest whose weights are not
fully stored (puts are atomic and ordered). Weights are safetensors and everything else JSON;
nothing on this path is ever unpickled.

Steering (Redis; names below, next to config.POLICY_POINTER):
  POLICY_POINTER hash    the fleet's durable "current" version (+ pinned flag, published_ns)
  stack list             versions that were current, newest last; rollback() pops it
  history list           every pointer/pin/canary change as JSON, newest last (capped)
  robot pin key          one per robot (robot_pin:<id>): {"version", "set_ns", "seq", "sig"}; an
                         unpin leaves a signed tombstone (version ""). A robot's ACL reads only its own.
  robot pins hash        robot_id -> the same JSON: the operators' listing of current pins
  canary hash            version, robots (JSON list), fraction, set_ns, seq, sig (version "": cleared)
  steering seq           the counter every signed steering record takes a fresh number from
Resolution for one robot: robot pin > canary membership > fleet pointer. With `trust` set (a
robot), records are verified and replays refused as fleetloop.release.steering describes; an
invalid record is ignored with an alert, never a block on the other layers.

Every change PUBLISHes a PolicyNotice on POLICY_CHANNEL. Notices are only wake-up hints: a robot
always re-resolves from the durable state above, so a missed notice costs at most one poll.

Over 600 lines on purpose: PolicyRegistry is one class over one state (the store's policies/ and
the Redis keys above) whose publishing, reading and steering share the version numbering, the
signer and the Redis transactions. The delta form, which needs none of that, is in delta.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import redis
from google.protobuf import json_format

from fleetloop import config
from fleetloop.buffer.codec import sha256_hex  # hashlib drops the GIL on large buffers
from fleetloop.buffer.store import ObjectNotFound, ObjectStore
from fleetloop.release import steering
from fleetloop.release.delta import apply_delta, make_delta
from fleetloop.release.guidance import Guidance
from fleetloop.release.steering import canary_record, pin_record, pointer_record
from fleetloop.proto.v1 import policy_pb2 as ppb

log = logging.getLogger(__name__)

_NS = config.POLICY_POINTER.rsplit(":", 1)[0]  # "fleetloop:policy"
SEQ_KEY = _NS + ":seq"                # INCR -> version numbers
VERSIONS_KEY = _NS + ":versions"      # sorted set: version -> sequence number
INFO_KEY = _NS + ":info"              # hash: version -> JSON (created_ns, step, algorithm, metrics...)
STACK_KEY = _NS + ":stack"            # list: versions that were fleet-current, newest last
HISTORY_KEY = _NS + ":history"        # list: JSON pointer/pin/canary events, newest last
ROBOT_PINS_KEY = _NS + ":robot_pins"  # hash: robot_id -> its pin's JSON: the services' listing
CANARY_KEY = _NS + ":canary"          # hash: version, robots, fraction, set_ns, seq, sig
ROBOT_PIN_PREFIX = _NS + ":robot_pin:"  # + robot_id: that robot's signed pin (or tombstone)
STEERING_SEQ_KEY = _NS + ":steering_seq"  # INCR -> seq of every signed steering record

STACK_MAX = 1000
HISTORY_MAX = 10_000
DELTA_MAX_FRACTION = 0.5      # keep a delta only when it is at most this share of the full size

_VERSION_RE = re.compile(r"^v\d{6,}$")


class UnknownVersion(KeyError):
    """No such policy version (the dashboard maps this to 404)."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else "unknown policy version"


class WeightsIntegrityError(Exception):
    """Downloaded weights do not match the manifest (size or sha256). Nothing was loaded."""


class RegistryError(Exception):
    """A steering request that cannot be applied (e.g. nothing to roll back to)."""


def weights_key(version: str) -> str:
    return f"policies/{version}/model.safetensors"


def delta_key(version: str) -> str:
    return f"policies/{version}/delta.safetensors"


def manifest_key(version: str) -> str:
    return f"policies/{version}/manifest.json"


def signature_key(version: str) -> str:
    return f"policies/{version}/manifest.sig"


def manifest_to_bytes(m: ppb.PolicyManifest) -> bytes:
    return json_format.MessageToJson(m, indent=1, preserving_proto_field_name=True).encode()


def manifest_from_bytes(data: bytes, where: str = "") -> ppb.PolicyManifest:
    m = ppb.PolicyManifest()
    try:
        json_format.Parse(data.decode("utf-8"), m, ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError, ValueError) as e:
        raise WeightsIntegrityError(f"unreadable policy manifest {where}: {e}") from None
    return m


def notice_to_json(n: ppb.PolicyNotice) -> str:
    return json_format.MessageToJson(n, indent=None, preserving_proto_field_name=True)


def notice_from_json(data: bytes | str) -> ppb.PolicyNotice:
    """Raises ValueError on a malformed notice."""
    n = ppb.PolicyNotice()
    try:
        json_format.Parse(data.decode() if isinstance(data, bytes) else data, n, ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed policy notice: {e}") from None
    return n


def canary_member(robot_id: str, fraction: float) -> bool:
    """Stable, process-independent membership: the same robots are in a 10% canary every time,
    and a robot in the 10% cohort stays in when the canary is widened to 25%."""
    h = int.from_bytes(hashlib.sha256(robot_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


# ---- registry -----------------------------------------------------------------------------

@dataclass
class Target:
    """What one robot should run, and since when (for publish -> loaded latency)."""
    version: str
    source: str          # "robot_pin" | "canary" | "fleet"
    since_ns: int        # when this became the robot's target (pointer move, pin or canary set)


@dataclass
class Fetched:
    manifest: ppb.PolicyManifest
    weights: bytes
    bytes_moved: int     # what crossed the network for the weights (delta or full)
    via: str             # "full" | "delta"


def _seq(version: str) -> int:
    return int(version[1:]) if _VERSION_RE.fullmatch(version or "") else 0


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


class PolicyRegistry:
    """Thread-safe: one instance may serve the learner's publisher and the dashboard's requests.

    delta=True also stores the delta form when the parent's bytes are at hand (the previous
    publish by this instance) and the delta is small enough to be worth a second object."""

    def __init__(self, store: ObjectStore, redis_client: redis.Redis, delta: bool = True, fence=None):
        self.store = store
        self.redis = redis_client
        self.delta = delta
        # fence: the learner's lease (fleetloop.learner.lease.Lease) or None. When set, a version
        # number is reserved only while the lease is ours and it is checked again before the
        # commit and the pointer move: a zombie learner raises LeaseLost and writes nothing.
        self.fence = fence
        self._reserved: Optional[str] = None  # a number reserved by a publish that failed
        self._manifests: dict[str, ppb.PolicyManifest] = {}  # immutable once committed
        self._last_published: tuple[str, bytes] | None = None
        self._lock = threading.Lock()
        # Signing (fleetloop.release.signing). signer: signs the manifests and steering records
        # this instance writes (None: the configured or embedded key, loaded on first write).
        # trust: when set (robots; PolicySlot sets it) every manifest and steering record this
        # instance hands out for running is verified against it first.
        self.signer = None
        self.trust = None
        # memory: what a robot accepted of each steering layer (fleetloop.release.steering); the
        # PolicySlot gives it a file on the robot. steering_alerts: why the last resolve() ignored
        # a stored record.
        self.memory: Optional[steering.SteeringMemory] = None
        self.steering_alerts: list[str] = []
        self._alerted: dict[str, list[str]] = {}  # robot id -> the alerts last logged

    # ---- learner side ---------------------------------------------------------------------

    def publish(self, weights: bytes, config_json: str, parent_version: str = "", learner_step: int = 0,
                algorithm: str = "", metrics: Optional[dict] = None, move_pointer: bool = True,
                backend: str = "", base_sha256: str = "", guidance=None) -> ppb.PolicyManifest:
        """Store a new version (weights, then manifest = commit), index it, move the fleet pointer
        (unless pinned or move_pointer=False) and notify. Version numbers are assigned only on a
        successful publish: a publish that fails before its manifest is committed gives its
        number back (or this instance reuses it next time), so versions stay contiguous; a
        half-written one is never visible (no manifest). backend and
        base_sha256: see PolicyManifest (fleetloop.policy.backend.export_version gives them).
        guidance: how robots run it (fleetloop.release.guidance.Guidance; the algorithm's
        inference_settings()), signed with the manifest; None: the plain policy."""
        if not isinstance(weights, (bytes, bytearray, memoryview)) or not len(weights):
            raise ValueError("weights must be non-empty bytes (a safetensors blob)")
        weights = bytes(weights)
        json.loads(config_json)  # fail here, not on 1000 robots
        version = self._reserve_version()
        try:
            m = self._publish_as(version, weights, config_json, parent_version, learner_step, algorithm,
                                 metrics, backend, base_sha256, guidance)
        except BaseException:
            self._give_back(version)  # no committed manifest: the number is not used up
            raise
        # Committed: from here on the version exists. Redis-side bookkeeping that fails is logged,
        # not raised (reindex() and the next publish repair it), so the caller counts it.
        try:
            self._index(m)
            if move_pointer:
                if self.fence is not None:
                    self.fence.check()
                self._move_pointer(version, "publish", only_if_unpinned=True)
            self._notify(version)
        except redis.RedisError as e:
            log.warning("published %s but could not record/announce it in Redis: %s", version, e)
        return m

    def _reserve_version(self) -> str:
        """The next version number; a number a failed publish of this instance gave up is reused
        (if nothing was committed under it)."""
        with self._lock:
            reserved, self._reserved = self._reserved, None
        if reserved:
            try:
                if not self.store.exists(manifest_key(reserved)):
                    return reserved
            except BaseException:
                with self._lock:
                    self._reserved = reserved
                raise
        return self._next_version()

    def _give_back(self, version: str) -> None:
        """Undo a reservation: DECR the counter if nothing was reserved after it; otherwise keep
        the number for this instance's next publish."""
        seq = _seq(version)
        try:
            if self.fence is not None:
                undone = self.fence.decr_if(SEQ_KEY, seq)
            else:
                def tx(pipe):
                    cur = int(pipe.get(SEQ_KEY) or 0)
                    pipe.multi()
                    if cur == seq:
                        pipe.decr(SEQ_KEY)
                    return cur == seq
                undone = self.redis.transaction(tx, SEQ_KEY, value_from_callable=True)
        except redis.RedisError:
            undone = False
        if not undone:
            with self._lock:
                self._reserved = version

    def _publish_as(self, version: str, weights: bytes, config_json: str, parent_version: str,
                    learner_step: int, algorithm: str, metrics: Optional[dict], backend: str,
                    base_sha256: str, guidance=None) -> ppb.PolicyManifest:
        m = ppb.PolicyManifest(
            version=version, parent_version=parent_version or "", learner_step=int(learner_step),
            created_ns=time.time_ns(), weights_key=weights_key(version), weights_sha256=sha256_hex(weights),
            weights_bytes=len(weights), config_json=config_json, algorithm=algorithm or "",
            backend=backend or "", base_sha256=base_sha256 or "")
        for k, v in (metrics or {}).items():
            m.metrics[str(k)] = float(v)
        if guidance is not None:
            m.inference.CopyFrom(guidance.to_proto())
        self.store.put(m.weights_key, weights)
        self._maybe_store_delta(m, weights)
        if self.fence is not None:
            self.fence.check()
        data = manifest_to_bytes(m)
        self.store.put(signature_key(version), self._get_signer().sign_manifest(version, data))
        self.store.put(manifest_key(version), data)  # the commit point (its signature is stored first)
        with self._lock:
            self._manifests[version] = m
            self._last_published = (version, weights)
        return m

    def _next_version(self) -> str:
        """INCR gives monotonic versions. If Redis lost the counter (restart without persistence),
        a committed version could be overwritten: bump the counter past the store's highest."""
        seq = int(self.fence.incr_if_held(SEQ_KEY) if self.fence is not None else self.redis.incr(SEQ_KEY))
        version = f"v{seq:06d}"
        try:
            taken = self.store.exists(manifest_key(version))
        except BaseException:
            self._give_back(version)  # the store is down: nothing can be published now
            raise
        if not taken:
            return version
        highest = max((int(k.split("/")[1][1:]) for k in self.store.list("policies/")
                       if k.endswith("/manifest.json") and _VERSION_RE.fullmatch(k.split("/")[1])), default=0)
        log.warning("version counter behind the store (at %d, store has %d); resyncing", seq, highest)

        def bump(pipe):
            cur = int(pipe.get(SEQ_KEY) or 0)
            pipe.multi()
            pipe.set(SEQ_KEY, max(cur, highest))
        self.redis.transaction(bump, SEQ_KEY)
        return self._next_version()

    def _maybe_store_delta(self, m: ppb.PolicyManifest, weights: bytes) -> None:
        with self._lock:
            last = self._last_published
        if not (self.delta and last and m.parent_version and last[0] == m.parent_version):
            return
        d = make_delta(last[1], weights)
        if d is None or len(d) > DELTA_MAX_FRACTION * len(weights):
            return  # most blocks changed: the full weights are as cheap to move
        m.delta_key, m.delta_sha256, m.delta_bytes = delta_key(m.version), sha256_hex(d), len(d)
        self.store.put(m.delta_key, d)

    def _index(self, m: ppb.PolicyManifest) -> None:
        info = {"created_ns": m.created_ns, "parent_version": m.parent_version, "learner_step": m.learner_step,
                # NaN (e.g. no loss yet) is not JSON: store null so the dashboard can serve it
                "algorithm": m.algorithm, "metrics": {k: v if math.isfinite(v) else None for k, v in m.metrics.items()},
                "weights_bytes": m.weights_bytes,
                "delta_bytes": m.delta_bytes}
        try:
            info["guidance"] = Guidance.from_manifest(m).describe()
        except ValueError as e:  # indexed all the same; robots refuse it when they load it
            info["guidance"] = {"error": str(e)}
        pipe = self.redis.pipeline()
        pipe.zadd(VERSIONS_KEY, {m.version: _seq(m.version)})
        pipe.hset(INFO_KEY, m.version, json.dumps(info))
        pipe.execute()

    def reindex(self) -> int:
        """Re-record every committed version found in the store (after Redis lost its data, or a
        publisher died between the manifest put and the Redis writes). Returns how many. The
        fleet pointer is not guessed: until an operator promote()s a version, robots keep what
        they run."""
        n = 0
        for key in self.store.list("policies/"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == "manifest.json" and _VERSION_RE.fullmatch(parts[1]):
                self._index(self.manifest(parts[1]))
                n += 1
        return n

    # ---- reading --------------------------------------------------------------------------

    def manifest(self, version: str) -> ppb.PolicyManifest:
        """The committed manifest. Raises UnknownVersion if the version was never committed."""
        with self._lock:
            cached = self._manifests.get(version)
        if cached is not None:
            return cached
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
            raise UnknownVersion(f"unknown policy version {version!r}")
        try:
            data = self.store.get(manifest_key(version))
        except ObjectNotFound:
            raise UnknownVersion(f"unknown policy version {version!r}") from None
        m = manifest_from_bytes(data, manifest_key(version))
        if m.version != version:
            raise WeightsIntegrityError(f"manifest at {manifest_key(version)} names version {m.version!r}")
        with self._lock:
            if len(self._manifests) >= 4096:  # a long-lived dashboard reads many; keep it bounded
                self._manifests.clear()
            self._manifests[version] = m
        return m

    def verified_manifest(self, version: str) -> ppb.PolicyManifest:
        """The manifest, only if signed by a key in self.trust -- checked on the stored bytes
        before they are parsed (the signature object first, then the manifest's size, then its
        bytes): an unsigned, forged or oversized manifest is refused before anything is read or
        allocated from its contents. Raises signing.SignatureError, UnknownVersion, StoreError."""
        from fleetloop.release import signing
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
            raise UnknownVersion(f"unknown policy version {version!r}")
        if self.trust is None:
            raise signing.NoTrustedKeys("this registry has no trusted keys to verify against")
        sig = self._signature_object(version)
        if sig is None and signing.insecure_allowed():
            log.warning("policy %s is UNSIGNED; accepted only because %s is set", version, signing.INSECURE_ENV)
            return self.manifest(version)
        if sig is None:
            if not self.store.exists(manifest_key(version)):
                raise UnknownVersion(f"unknown policy version {version!r}")
            raise signing.SignatureError(f"policy {version} is unsigned; refusing it")
        try:  # bounded read: an object replaced by a huge one after a size check is still not read whole
            data, size = self.store.get_range(manifest_key(version), 0, signing.MAX_MANIFEST_BYTES + 1)
        except ObjectNotFound:
            raise UnknownVersion(f"unknown policy version {version!r}") from None
        if size > signing.MAX_MANIFEST_BYTES:
            raise signing.SignatureError(f"policy {version}: manifest of {size} bytes is not a manifest; refusing it")
        self.trust.verify_manifest(version, data, sig)  # raises: nothing below runs on a forgery
        m = manifest_from_bytes(data, manifest_key(version))
        if m.version != version:
            raise WeightsIntegrityError(f"manifest at {manifest_key(version)} names version {m.version!r}")
        return m

    def _signature_object(self, version: str) -> Optional[bytes]:
        """The manifest.sig object, None when there is none. Its size is known before its bytes
        are held: one ranged read of at most MAX_SIGNATURE_OBJECT + 1 bytes returns the object's
        total size too, and a larger object is refused without reading the rest."""
        from fleetloop.release import signing
        try:
            head, total = self.store.get_range(signature_key(version), 0, signing.MAX_SIGNATURE_OBJECT + 1)
        except ObjectNotFound:
            return None
        if total > signing.MAX_SIGNATURE_OBJECT:
            raise signing.SignatureError(f"policy {version}: signature object of {total} bytes is not a signature "
                                         f"(at most {signing.MAX_SIGNATURE_OBJECT}); refusing it unread")
        return head

    def exists(self, version: str) -> bool:
        try:
            self.manifest(version)
            return True
        except UnknownVersion:
            return False

    def fetch(self, version: str) -> tuple[ppb.PolicyManifest, bytes]:
        """(manifest, weights), verified: the bytes' size and sha256 match the manifest. Raises
        WeightsIntegrityError on a mismatch, UnknownVersion, or StoreError (transient)."""
        f = self.fetch_detailed(version)
        return f.manifest, f.weights

    def fetch_detailed(self, version: str, base: Optional[tuple[str, bytes]] = None) -> Fetched:
        """Like fetch(). `base` = (version, weights) the caller already holds: when the target was
        published as a delta against exactly that version, only the changed blocks are
        downloaded, and the rebuilt bytes must still match the full weights' sha256. With
        self.trust set, the manifest's signature is verified before anything else."""
        m = self.verified_manifest(version) if self.trust is not None else self.manifest(version)
        if base is not None and m.delta_key and base[0] == m.parent_version:
            try:
                d = self.store.get(m.delta_key)
                if len(d) != m.delta_bytes or sha256_hex(d) != m.delta_sha256:
                    raise ValueError("delta sha256/size mismatch")
                data = apply_delta(base[1], d)
                if sha256_hex(data) != m.weights_sha256:
                    raise ValueError("weights rebuilt from the delta do not match the manifest's sha256")
                return Fetched(m, data, len(d), "delta")
            except (ValueError, ObjectNotFound) as e:
                log.warning("delta for %s unusable (%s); fetching the full weights", version, e)
        # Download, then hash. (Hashing chunk by chunk as the body streams in measured slower:
        # more CPU in botocore's chunked reads than the overlap saves.)
        data = self.store.get(m.weights_key)
        if len(data) != m.weights_bytes:
            raise WeightsIntegrityError(f"policy {version}: weights are {len(data)} bytes, manifest says "
                                        f"{m.weights_bytes}; refusing to load")
        digest = sha256_hex(data)
        if digest != m.weights_sha256:
            raise WeightsIntegrityError(f"policy {version}: weights sha256 {digest} does not match the "
                                        f"manifest's {m.weights_sha256}; refusing to load")
        return Fetched(m, data, len(data), "full")

    def list_versions(self) -> list[dict]:
        """Every indexed version, oldest first: {version, created_ns, parent_version,
        learner_step, algorithm, metrics, weights_bytes, delta_bytes}."""
        versions = [_s(v) for v in self.redis.zrange(VERSIONS_KEY, 0, -1)]
        infos = self.redis.hmget(INFO_KEY, versions) if versions else []
        return [{"version": v, **json.loads(_s(i) or "{}")} for v, i in zip(versions, infos)]

    def latest_version(self) -> Optional[str]:
        top = self.redis.zrange(VERSIONS_KEY, -1, -1)
        return _s(top[0]) if top else None

    def pointer(self) -> dict:
        """The fleet pointer: {version, manifest_key, published_ns, pinned}; {} before any publish."""
        raw = {_s(k): _s(v) for k, v in self.redis.hgetall(config.POLICY_POINTER).items()}
        if not raw:
            return {}
        return {"version": raw.get("version", ""), "manifest_key": raw.get("manifest_key", ""),
                "published_ns": int(raw.get("published_ns") or 0), "pinned": raw.get("pinned") == "1"}

    def history(self, limit: int = 100) -> list[dict]:
        """Pointer moves, pins and canary changes, newest first."""
        return [json.loads(_s(e)) for e in reversed(self.redis.lrange(HISTORY_KEY, -limit, -1))]

    def robot_pins(self) -> dict[str, str]:
        """robot_id -> pinned version (the operators' listing). An unreadable entry is skipped
        with an alert rather than failing every reader of the listing."""
        pins = {}
        for k, v in self.redis.hgetall(ROBOT_PINS_KEY).items():
            try:
                rec, _sig = steering.parse_pin(_s(k), v)
            except (steering.SteeringInvalid, UnicodeDecodeError) as e:
                log.warning("ALERT ignoring an unreadable robot pin entry: %s", e)
                continue
            if rec["version"]:
                pins[rec["robot_id"]] = rec["version"]
        return pins

    def canary(self) -> Optional[dict]:
        """The canary, None when there is none (or it was cleared, or its record is unreadable:
        alerted, and treated as no canary rather than failing every reader)."""
        try:
            parsed = steering.parse_canary(self.redis.hgetall(CANARY_KEY))
        except steering.SteeringInvalid as e:
            log.warning("ALERT ignoring an unreadable canary record: %s", e)
            return None
        if parsed is None or not parsed[0]["version"]:
            return None
        c = parsed[0]
        return {"version": c["version"], "robots": c["robots"], "fraction": float(c["fraction"]),
                "set_ns": c["set_ns"]}

    def resolve(self, robot_id: str) -> Optional[Target]:
        """What `robot_id` should run: robot pin > canary membership > fleet pointer. One round
        trip. None when nothing has been published yet. With self.trust set (a robot) each layer
        is verified and checked against self.memory (fleetloop.release.steering): a refused layer
        falls back to what the robot accepted before, and the reasons are in self.steering_alerts."""
        return self.resolve_with_alerts(robot_id)[0]

    def resolve_with_alerts(self, robot_id: str) -> tuple[Optional[Target], list[str]]:
        """resolve(), and why a stored steering record was ignored (for this call only: several
        robots' slots may share one registry)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(ROBOT_PIN_PREFIX + robot_id)
        pipe.hgetall(CANARY_KEY)
        pipe.hmget(config.POLICY_POINTER, ["version", "published_ns", "seq", "sig"])
        pin_raw, canary_raw, pointer_raw = pipe.execute()
        alerts: list[str] = []
        if self.trust is None:  # a service's view: no signature checks, unreadable records skipped
            def take(parse, what):
                try:
                    parsed = parse()
                except steering.SteeringInvalid as e:
                    alerts.append(f"{what} is malformed ({e})")
                    return None
                return parsed[0] if parsed else None
            pin = take(lambda: steering.parse_pin(robot_id, pin_raw), "robot pin")
            canary = take(lambda: steering.parse_canary(canary_raw), "canary")
            pointer = take(lambda: steering.parse_pointer(*pointer_raw), "fleet pointer")
        else:
            if self.memory is None:
                self.memory = steering.SteeringMemory()
            def take(layer, parse, what):
                return steering.accept(layer, what, robot_id, parse, self._verify_steering, self.memory, alerts)
            pin = take("robot_pin", lambda: steering.parse_pin(robot_id, pin_raw), f"robot pin of {robot_id}")
            canary = take("canary", lambda: steering.parse_canary(canary_raw), "canary")
            pointer = take("fleet", lambda: steering.parse_pointer(*pointer_raw), "fleet pointer")
        if alerts != self._alerted.get(robot_id, []):  # say it once, not on every poll
            for a in alerts:
                log.warning("ALERT robot %s: %s", robot_id, a)
        self._alerted[robot_id] = alerts
        self.steering_alerts = alerts
        if pin and pin["version"]:
            return Target(pin["version"], "robot_pin", pin["set_ns"]), alerts
        if canary and canary["version"] and (robot_id in canary["robots"]
                                             or canary_member(robot_id, float(canary["fraction"]))):
            return Target(canary["version"], "canary", canary["set_ns"]), alerts
        if pointer and pointer["version"]:
            return Target(pointer["version"], "fleet", pointer["published_ns"]), alerts
        return None, alerts

    def _verify_steering(self, record: dict, sig: Optional[str], what: str) -> None:
        from fleetloop.release import signing
        if not sig and signing.insecure_allowed():
            return
        self.trust.verify_record(record, sig, what)

    def _get_signer(self):
        if self.signer is None:
            from fleetloop.release import signing
            self.signer = signing.default_signer()
        return self.signer

    def _steering_seq(self) -> int:
        """A fresh, fleet-wide increasing number for the next signed steering record."""
        self.redis.set(STEERING_SEQ_KEY, steering.wall_seq_floor(), nx=True)
        return int(self.redis.incr(STEERING_SEQ_KEY))

    def target_version(self, robot_id: str) -> Optional[str]:
        t = self.resolve(robot_id)
        return t.version if t else None

    # ---- operator steering ----------------------------------------------------------------

    def promote(self, version: str, by: str = "") -> None:
        """Make `version` the fleet's current (a pinned fleet stays pinned, now on `version`)."""
        self._require(version)
        self._move_pointer(version, "promote", by=by)
        self._notify(version)

    def rollback(self, by: str = "", pin: bool = False) -> str:
        """Back to the version that was current before this one; returns it. Repeated rollbacks
        walk further back. Without pin=True the learner's next publish moves the fleet forward
        again."""
        def tx(pipe):
            stack = [_s(v) for v in pipe.lrange(STACK_KEY, 0, -1)]
            if len(stack) < 2:
                raise RegistryError("nothing to roll back to")
            pointer = {_s(k): _s(v) for k, v in pipe.hgetall(config.POLICY_POINTER).items()}
            prev, now = stack[-2], stack[-1]
            pipe.multi()
            pipe.rpop(STACK_KEY)
            self._queue_pointer(pipe, prev, pinned=pin or pointer.get("pinned") == "1")
            self._queue_history(pipe, "rollback", prev, by, previous=now)
            return prev
        prev = self.redis.transaction(tx, STACK_KEY, config.POLICY_POINTER, value_from_callable=True)
        self._notify(prev)
        return prev

    def pin_fleet(self, version: str, by: str = "") -> None:
        """Every robot (robot pins and canaries still apply) runs `version` until unpin_fleet();
        publishes no longer move the pointer."""
        self._require(version)
        self._move_pointer(version, "pin_fleet", pinned=True, by=by)
        self._notify(version)

    def unpin_fleet(self, follow_latest: bool = True, by: str = "") -> None:
        """Let the learner move the fleet again; by default jump to the newest version now rather
        than waiting for the next publish."""
        latest = self.latest_version() if follow_latest else None
        if latest:
            self._move_pointer(latest, "unpin_fleet", pinned=False, by=by)
        else:
            self.redis.hset(config.POLICY_POINTER, "pinned", "0")
            self._history("unpin_fleet", self.pointer().get("version", ""), by)
        self._notify(latest or self.pointer().get("version", ""))

    def pin_robot(self, robot_id: str, version: str, by: str = "") -> None:
        self._require(version)
        self._write_pin(robot_id, version)
        self._history("pin_robot", version, by, robot_id=robot_id)
        self._notify(version)

    def unpin_robot(self, robot_id: str, by: str = "") -> None:
        self._write_pin(robot_id, "")  # a signed tombstone: an unsigned deletion is refused
        self._history("unpin_robot", "", by, robot_id=robot_id)
        self._notify(self.pointer().get("version", ""))

    def _write_pin(self, robot_id: str, version: str) -> None:
        """The robot's own pin key (signed record, or tombstone for version "") and the listing.
        WATCHed, so a concurrent pin of the same robot cannot land with an older seq after ours."""
        key = ROBOT_PIN_PREFIX + robot_id

        def tx(pipe):
            set_ns, seq = time.time_ns(), self._steering_seq()
            sig = self._get_signer().sign_record(pin_record(robot_id, version, set_ns, seq))
            value = json.dumps({"version": version, "set_ns": set_ns, "seq": seq, "sig": sig})
            pipe.multi()
            pipe.set(key, value)
            if version:
                pipe.hset(ROBOT_PINS_KEY, robot_id, value)
            else:
                pipe.hdel(ROBOT_PINS_KEY, robot_id)
        self.redis.transaction(tx, key)

    def set_canary(self, version: str, robot_ids: Optional[Iterable[str]] = None,
                   fraction: Optional[float] = None, by: str = "") -> None:
        """Run `version` on the listed robots and/or a stable `fraction` of the fleet (0..1)."""
        self._require(version)
        robots = sorted(set(robot_ids or []))
        frac = float(fraction or 0.0)
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"canary fraction must be in [0, 1], got {fraction}")
        if not robots and frac == 0.0:
            raise ValueError("a canary needs robot_ids or a fraction > 0")
        self._write_canary(version, robots, frac)
        self._history("set_canary", version, by, robots=robots, fraction=frac)
        self._notify(version)

    def clear_canary(self, by: str = "") -> None:
        self._write_canary("", [], 0.0)  # a signed tombstone: an unsigned deletion is refused
        self._history("clear_canary", "", by)
        self._notify(self.pointer().get("version", ""))

    def _write_canary(self, version: str, robots: list, frac: float) -> None:
        def tx(pipe):
            set_ns, seq = time.time_ns(), self._steering_seq()
            sig = self._get_signer().sign_record(canary_record(version, robots, repr(frac), set_ns, seq))
            pipe.multi()
            pipe.delete(CANARY_KEY)
            pipe.hset(CANARY_KEY, mapping={"version": version, "robots": json.dumps(robots), "fraction": repr(frac),
                                           "set_ns": set_ns, "seq": seq, "sig": sig})
        self.redis.transaction(tx, CANARY_KEY)

    # ---- internals ------------------------------------------------------------------------

    def _require(self, version: str) -> None:
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
            raise UnknownVersion(f"unknown policy version {version!r}")
        if self.redis.zscore(VERSIONS_KEY, version) is None:
            self.manifest(version)  # committed but not indexed (e.g. Redis lost it): still valid

    def _move_pointer(self, version: str, action: str, pinned: Optional[bool] = None,
                      only_if_unpinned: bool = False, by: str = "") -> bool:
        """Atomically (WATCH/MULTI) point the fleet at `version`, push it on the rollback stack and
        log it. pinned=None keeps the current pin flag. Returns False if a pin blocked it."""
        def tx(pipe):
            pointer = {_s(k): _s(v) for k, v in pipe.hgetall(config.POLICY_POINTER).items()}
            is_pinned = pointer.get("pinned") == "1"
            if only_if_unpinned and is_pinned:
                return False
            if action == "publish" and _seq(pointer.get("version", "")) > _seq(version):
                return False  # racing publishers: the learner's pointer only moves forward
            top = pipe.lindex(STACK_KEY, -1)
            pipe.multi()
            if _s(top) != version:
                pipe.rpush(STACK_KEY, version)
                pipe.ltrim(STACK_KEY, -STACK_MAX, -1)
            self._queue_pointer(pipe, version, pinned=is_pinned if pinned is None else pinned)
            self._queue_history(pipe, action, version, by, previous=pointer.get("version", ""))
            return True
        moved = self.redis.transaction(tx, config.POLICY_POINTER, STACK_KEY, value_from_callable=True)
        if not moved:
            log.info("fleet pointer not moved to %s (pinned, or already at a newer version)", version)
        return moved

    def _queue_pointer(self, pipe, version: str, pinned: bool) -> None:
        """Called inside a transaction WATCHing the pointer: the seq is taken after the WATCH, so
        a pointer written with a lower seq can never land after one with a higher seq."""
        published_ns, seq = time.time_ns(), self._steering_seq()
        sig = self._get_signer().sign_record(pointer_record(version, published_ns, seq))
        pipe.hset(config.POLICY_POINTER, mapping={"version": version, "manifest_key": manifest_key(version),
                                                  "published_ns": published_ns, "pinned": "1" if pinned else "0",
                                                  "seq": seq, "sig": sig})

    @staticmethod
    def _queue_history(pipe, action: str, version: str, by: str, **extra) -> None:
        entry = {"ts_ns": time.time_ns(), "action": action, "version": version, "by": by, **extra}
        pipe.rpush(HISTORY_KEY, json.dumps(entry))
        pipe.ltrim(HISTORY_KEY, -HISTORY_MAX, -1)

    def _history(self, action: str, version: str, by: str, **extra) -> None:
        pipe = self.redis.pipeline()
        self._queue_history(pipe, action, version, by, **extra)
        pipe.execute()

    def _notify(self, version: str) -> None:
        n = ppb.PolicyNotice(version=version, manifest_key=manifest_key(version) if version else "",
                             published_ns=time.time_ns())
        self.redis.publish(config.POLICY_CHANNEL, notice_to_json(n))
