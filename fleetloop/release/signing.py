"""Who may tell the fleet what to run: Ed25519 signatures on policy versions and pointer moves.

A policy version's sha256 proves its weights were not corrupted; its *signature* proves who made
it. The learner signs every manifest it publishes, and the learner and the dashboard sign every
steering record (fleet pointer, robot pin, canary) they write. Robots hold only public keys and
refuse anything not signed by one of them -- before they read anything else.

What is signed
  manifest   policies/<version>/manifest.sig = {"alg": "ed25519", "key_id", "signature", "version"}
             over DOMAIN_MANIFEST + the manifest object's exact stored bytes. Detached and over the
             exact bytes, so a robot verifies before parsing the manifest (nothing is allocated
             from its contents) and no canonical re-serialisation can differ between protobuf
             versions (a field added later still verifies on an older robot).
  steering   a "sig" field on each Redis steering record, over DOMAIN_STEERING + the record's
             canonical JSON (sorted keys): kind, version, scope, the record's own time and its
             seq -- a fleet-wide increasing number robots remember, so an old record written
             back is refused as a replay; deletions are signed tombstones
             (fleetloop.release.steering).

Keys
  key id     the first 16 hex digits of sha256(raw 32-byte public key)
  private    PEM (PKCS8) file, mode 0600: FLEETLOOP_SIGNING_KEY=<path>, else
             <FLEETLOOP_HOME>/keys/signing.key. Embedded default (one machine: demo, tests): if
             neither exists the first publisher generates one there and also trusts it locally.
  trusted    PEM public keys (*.pub): FLEETLOOP_TRUSTED_KEYS=<file or dir>[,<file or dir>...],
             else <FLEETLOOP_HOME>/keys/trusted/. Several keys = rotation with an overlap:
             robots trust old and new, the learner switches to the new key, then the old .pub is
             removed. A robot re-reads its key files when they change (the sources' and
             *.pub files' mtimes, checked at most every 2 s before a verification), on a timer
             (every 5 min whatever the mtimes say) and when it meets an unknown key id (at most
             every 2 s): a key added or removed on disk takes effect without a restart.
  insecure   FLEETLOOP_INSECURE_UNSIGNED_POLICIES=1 lets a robot run unsigned versions. Off by
             default everywhere; named so nobody sets it by accident. For bring-up only.

`fleetloop credentials keys --out DIR` generates a key pair (see fleetloop.credentials).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from fleetloop import config

log = logging.getLogger(__name__)

ALG = "ed25519"
DOMAIN_MANIFEST = b"fleetloop/policy-manifest/v1\n"
DOMAIN_STEERING = b"fleetloop/policy-steering/v1\n"
MAX_SIGNATURE_OBJECT = 4096          # bytes; a manifest.sig is ~200
MAX_MANIFEST_BYTES = 1 << 20         # a manifest is a few KB; a larger object is refused unread
INSECURE_ENV = "FLEETLOOP_INSECURE_UNSIGNED_POLICIES"
SIGNING_KEY_ENV = "FLEETLOOP_SIGNING_KEY"
TRUSTED_KEYS_ENV = "FLEETLOOP_TRUSTED_KEYS"


class SignatureError(Exception):
    """Unsigned, wrongly signed, or signed by a key this robot does not trust. Nothing was used."""


class NoTrustedKeys(SignatureError):
    """This robot has no trusted public keys configured, so it cannot accept any policy."""


def keys_dir() -> Path:
    return config.home_dir() / "keys"


def key_id(public_key) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def insecure_allowed(environ: Optional[dict] = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(INSECURE_ENV, "") in ("1", "true", "yes")


# ---- keys ---------------------------------------------------------------------------------

def generate_keypair(out_dir: str | os.PathLike, name: str = "signing") -> tuple[Path, Path, str]:
    """Write <out_dir>/<name>.key (PKCS8 PEM, 0600) and <out_dir>/<key_id>.pub; returns
    (private path, public path, key id). Refuses to overwrite an existing private key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption, PrivateFormat,
                                                              PublicFormat)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv = Ed25519PrivateKey.generate()
    kid = key_id(priv.public_key())
    priv_path, pub_path = out / f"{name}.key", out / f"{kid}.pub"
    pem = priv.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never clobber a key
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(priv.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path, kid


def load_private_key(path: str | os.PathLike):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"cannot load signing key {path}: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {path} is not an Ed25519 key")
    return key


def load_public_key(path: str | os.PathLike):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"cannot load trusted key {path}: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"trusted key {path} is not an Ed25519 public key")
    return key


class Signer:
    """Signs manifests and steering records with one private key."""

    def __init__(self, private_key, source: str = ""):
        self._key = private_key
        self.key_id = key_id(private_key.public_key())
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Signer":
        return cls(load_private_key(path), str(path))

    def public_key(self):
        return self._key.public_key()

    def sign_manifest(self, version: str, manifest_bytes: bytes) -> bytes:
        sig = self._key.sign(DOMAIN_MANIFEST + manifest_bytes)
        return json.dumps({"alg": ALG, "key_id": self.key_id, "version": version,
                           "signature": base64.b64encode(sig).decode()}).encode()

    def sign_record(self, record: dict) -> str:
        """'ed25519:<key id>:<base64 signature>' over the record's canonical JSON."""
        sig = self._key.sign(DOMAIN_STEERING + canonical(record))
        return f"{ALG}:{self.key_id}:{base64.b64encode(sig).decode()}"


class TrustStore:
    """The public keys a robot accepts, by key id. Thread-safe. Follows its key files without a
    restart: re-read when they change (mtime/size/name of each source and *.pub, looked at no
    more than every `reload_interval_s`), every `refresh_interval_s` regardless, and when an
    unknown key id arrives (rate-limited) -- so a removed .pub stops being trusted within seconds."""

    def __init__(self, sources: Iterable[str | os.PathLike] = (), keys: Optional[dict] = None,
                 reload_interval_s: float = 2.0, refresh_interval_s: float = 300.0):
        self.sources = [Path(s) for s in sources]
        self._keys: dict = dict(keys or {})
        self._lock = threading.Lock()
        self._loaded_at = self._checked_at = 0.0
        self._fingerprint: tuple = ()
        self.reload_interval_s = reload_interval_s
        self.refresh_interval_s = refresh_interval_s
        self.reloads = 0
        if self.sources:
            self.reload()

    @classmethod
    def default(cls, environ: Optional[dict] = None) -> "TrustStore":
        env = os.environ if environ is None else environ
        raw = env.get(TRUSTED_KEYS_ENV, "")
        sources = [s.strip() for s in raw.split(",") if s.strip()] if raw else [str(keys_dir() / "trusted")]
        return cls(sources)

    @classmethod
    def of(cls, *public_keys) -> "TrustStore":
        return cls(keys={key_id(k): k for k in public_keys})

    def key_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def _files(self) -> list[Path]:
        out = []
        for src in self.sources:
            out += sorted(src.glob("*.pub")) if src.is_dir() else ([src] if src.exists() else [])
        return out

    def _stat_fingerprint(self) -> tuple:
        """What changes when a key file is added, removed, replaced or edited."""
        items = []
        for p in list(self.sources) + self._files():
            try:
                st = p.stat()
                items.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                items.append((str(p), None))
        return tuple(items)

    def reload(self) -> None:
        fingerprint = self._stat_fingerprint()
        found: dict = {}
        for f in self._files():
            try:
                k = load_public_key(f)
            except SignatureError as e:
                log.warning("%s", e)
                continue
            found[key_id(k)] = k
        with self._lock:
            if self.sources:
                if set(found) != set(self._keys) and self.reloads:
                    log.warning("trusted policy keys now %s (were %s)", sorted(found) or "none", sorted(self._keys))
                self._keys = found
            self._loaded_at = self._checked_at = time.monotonic()
            self._fingerprint = fingerprint
            self.reloads += 1

    def refresh(self) -> bool:
        """Re-read the key files if they changed or the timer ran out; cheap otherwise (a few
        stat calls, at most every reload_interval_s). True when it reloaded."""
        if not self.sources:
            return False
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at < self.reload_interval_s:
                return False
            self._checked_at = now
            due = now - self._loaded_at >= self.refresh_interval_s
            known = self._fingerprint
        if due or self._stat_fingerprint() != known:
            self.reload()
            return True
        return False

    def _key(self, kid: str):
        self.refresh()
        with self._lock:
            k = self._keys.get(kid)
            stale = time.monotonic() - self._loaded_at >= self.reload_interval_s
        if k is None and self.sources and stale:
            self.reload()
            with self._lock:
                k = self._keys.get(kid)
        if k is None:
            if not self._keys:
                where = ", ".join(str(s) for s in self.sources) or "(none given)"
                raise NoTrustedKeys(f"no trusted policy keys configured (looked in {where}; set "
                                    f"{TRUSTED_KEYS_ENV} or run `fleetloop credentials keys`)")
            raise SignatureError(f"signed by key {kid!r}, which this robot does not trust "
                                 f"(trusted: {', '.join(self.key_ids())})")
        return k

    def _check(self, kid: str, sig: bytes, data: bytes, what: str) -> str:
        from cryptography.exceptions import InvalidSignature
        key = self._key(kid)
        try:
            key.verify(sig, data)
        except InvalidSignature:
            raise SignatureError(f"{what}: signature by key {kid} does not verify (forged or altered)") from None
        return kid

    def verify_manifest(self, version: str, manifest_bytes: bytes, sig_object: Optional[bytes]) -> str:
        """Raises SignatureError unless sig_object is a valid signature of manifest_bytes for
        `version` by a trusted key. Returns the key id. Reads nothing of the manifest itself."""
        if not sig_object:
            raise SignatureError(f"policy {version} is unsigned; refusing it")
        if len(sig_object) > MAX_SIGNATURE_OBJECT:
            raise SignatureError(f"policy {version}: signature object too large")
        try:
            s = json.loads(sig_object)
            kid, alg, sig_version = str(s["key_id"]), s["alg"], s.get("version")
            sig = base64.b64decode(s["signature"], validate=True)
        except RecursionError:  # deeply nested JSON: not a signature object either
            raise SignatureError(f"policy {version}: malformed signature object (nested too deeply)") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SignatureError(f"policy {version}: malformed signature object ({type(e).__name__})") from None
        if alg != ALG:
            raise SignatureError(f"policy {version}: signature algorithm {alg!r} is not {ALG}")
        if sig_version != version:
            raise SignatureError(f"policy {version}: the signature is for version {sig_version!r}")
        return self._check(kid, sig, DOMAIN_MANIFEST + manifest_bytes, f"policy {version}")

    def verify_record(self, record: dict, sig_field: Optional[str], what: str) -> str:
        if not sig_field:
            raise SignatureError(f"{what} is unsigned; ignoring it")
        if not isinstance(sig_field, str) or len(sig_field) > 512:
            raise SignatureError(f"{what}: malformed signature")
        alg, _, rest = sig_field.partition(":")
        kid, _, b64 = rest.partition(":")
        if alg != ALG or not kid or not b64:
            raise SignatureError(f"{what}: malformed signature")
        try:
            sig = base64.b64decode(b64, validate=True)
        except ValueError:
            raise SignatureError(f"{what}: malformed signature") from None
        return self._check(kid, sig, DOMAIN_STEERING + canonical(record), what)


# ---- embedded defaults ----------------------------------------------------------------------

_default_lock = threading.Lock()


def default_signer(environ: Optional[dict] = None, generate: bool = True) -> Optional[Signer]:
    """The learner's / dashboard's signing key: FLEETLOOP_SIGNING_KEY, else
    <home>/keys/signing.key; with generate=True and neither present, a new key there whose
    public half is trusted locally (<home>/keys/trusted/), so one machine works out of the box
    and robots elsewhere refuse it until the operator distributes the .pub."""
    env = os.environ if environ is None else environ
    if env.get(SIGNING_KEY_ENV):
        return Signer.from_file(env[SIGNING_KEY_ENV])
    path = keys_dir() / "signing.key"
    with _default_lock:
        if not path.exists():
            if not generate:
                return None
            try:
                _priv, pub, kid = generate_keypair(keys_dir())
            except FileExistsError:  # another process made it first: use theirs
                pass
            else:
                trusted = keys_dir() / "trusted"
                trusted.mkdir(parents=True, exist_ok=True)
                (trusted / pub.name).write_bytes(pub.read_bytes())
                log.warning("generated a policy signing key %s (id %s); robots on other machines must trust %s",
                            path, kid, pub)
    for _ in range(50):  # a concurrent generator may still be writing it
        try:
            return Signer.from_file(path)
        except SignatureError:
            time.sleep(0.02)
    return Signer.from_file(path)
