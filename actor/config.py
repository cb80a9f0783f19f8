"""The actor daemon's configuration: one TOML file, overridden by environment variables,
validated once at start so a misconfigured robot stops with a message that says which key was
wrong, what it held and what is accepted -- instead of failing an hour later in the uploader.

  fleetloop actor --config /etc/fleetloop/actor.toml

Precedence: environment variable > config file > default. An environment variable set to the
empty string counts as unset (a systemd EnvironmentFile line `FLEETLOOP_S3_ENDPOINT=` is harmless).
deploy/robot/actor.example.toml is a complete, commented example. The keys:

  robot_id                          FLEETLOOP_ROBOT_ID        required; letters, digits, '.', '_', '-'
  [cloud]   store                   FLEETLOOP_STORE           required; s3://bucket/prefix or file:///abs/path
            s3_endpoint             FLEETLOOP_S3_ENDPOINT     http(s)://host[:port] (AWS_ENDPOINT_URL also read)
            s3_region               AWS_DEFAULT_REGION        default us-east-1
            redis_url               FLEETLOOP_REDIS_URL       required; redis://[:password@]host[:port][/db],
                                                              rediss:// (TLS) or unix:///path
            ingest_url              FLEETLOOP_INGEST_URL      http(s)://host[:port] of `fleetloop ingest`, the write
                                                              gate a robot with issued credentials writes through
                                                              (its Redis user may not write); "": write to Redis
  [credentials] aws_access_key_id   AWS_ACCESS_KEY_ID         both or neither; when neither, boto3's usual
            aws_secret_access_key   AWS_SECRET_ACCESS_KEY     chain (instance profile, ~/.aws) is used
  [spool]   dir                     FLEETLOOP_SPOOL_DIR       default /var/lib/fleetloop/spool; created, must be writable
            max_size                FLEETLOOP_SPOOL_MAX       bytes or "20GiB", "500MB", ...; default 2GiB
            on_full                 FLEETLOOP_SPOOL_ON_FULL   "drop-new" (default) or "drop-oldest"
  [grpc]    address                 FLEETLOOP_GRPC_ADDRESS    host:port, [v6]:port or unix:/path; default 127.0.0.1:50051
            tls_cert                FLEETLOOP_GRPC_TLS_CERT   PEM certificate (chain) of the link: TLS; with tls_key
            tls_key                 FLEETLOOP_GRPC_TLS_KEY    its PEM private key (unencrypted)
            client_ca               FLEETLOOP_GRPC_CLIENT_CA  PEM CA(s): require client certificates (mutual TLS)
            token                   FLEETLOOP_GRPC_TOKEN      a bearer token every call must carry (>= 16 chars)
            token_file              FLEETLOOP_GRPC_TOKEN_FILE a file of accepted tokens, one per line (not both)
            insecure                FLEETLOOP_GRPC_INSECURE   true: allow a non-loopback address with neither
                                                              TLS nor a token (refused otherwise); default false
  [recording] chunk_steps           FLEETLOOP_CHUNK_STEPS     steps per chunk object; default 256
            chunk_size              FLEETLOOP_CHUNK_SIZE      bytes per chunk object (a size); default 4MiB
  [policy]  poll_interval           FLEETLOOP_POLICY_POLL_INTERVAL  seconds or "500ms", "5s", "2m"; default 5s
            indicator               FLEETLOOP_POLICY_INDICATOR      RECAP improvement indicator the policy runs
                                                              with: "published" (default: what the
                                                              version's signed manifest says), "positive",
                                                              "negative" or "unset"
            guidance_beta           FLEETLOOP_POLICY_GUIDANCE_BETA  classifier-free guidance weight, 0-10, or
                                                              "published" (default; RECAP publishes 1.5)

Secrets (the S3 secret key, a Redis password inside the URL) may live in the TOML file or, better,
in a root-only EnvironmentFile (deploy/robot/fleetloop-actor.service). `ActorConfig.redacted()`
is the form to log.
"""
from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import re
import stat
import tempfile
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

from fleetloop.actor.spool import POLICIES as SPOOL_POLICIES

log = logging.getLogger(__name__)

DEFAULT_SPOOL_DIR = "/var/lib/fleetloop/spool"
DEFAULT_SPOOL_MAX = 2 * 1024 ** 3
DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"
DEFAULT_CHUNK_STEPS = 256
DEFAULT_CHUNK_BYTES = 4 * 1024 ** 2
DEFAULT_POLL_INTERVAL_S = 5.0

# The same rule as fleetloop.buffer.codec.check_id: the robot id goes into object keys, Redis
# keys and episode ids, so it is restricted to characters that are safe in all three.
ROBOT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# S3 bucket naming rules (AWS; MinIO applies the same): 3-63 chars, lowercase, digits, '.', '-'.
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                         r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")

_SIZE_UNITS = {"": 1, "b": 1,
               "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
               "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4,
               "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
SIZE_HELP = ('a whole number of bytes or a number with a unit: B, KiB, MiB, GiB, TiB (powers of 1024; '
             'K, M, G, T mean the same), kB, MB, GB, TB (powers of 1000), e.g. "20GiB" or "500MB"')
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
DURATION_HELP = 'seconds as a number, or a number with ms, s, m or h, e.g. "500ms", "5s", "2m"'


class ConfigError(ValueError):
    """The configuration is invalid. `errors` lists every problem found (each names the key and
    where it came from), so an operator fixes them all in one go."""

    def __init__(self, errors: list[str] | str, source: str = ""):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        head = f"invalid actor configuration ({source})" if source else "invalid actor configuration"
        if len(self.errors) == 1:
            super().__init__(f"{head}: {self.errors[0]}")
        else:
            super().__init__(head + ":\n" + "\n".join(f"  - {e}" for e in self.errors))


@dataclass(frozen=True)
class ActorConfig:
    robot_id: str
    store_uri: str
    redis_url: str
    ingest_url: str = ""             # the write gate (`fleetloop ingest`); "": write to Redis directly
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = field(default=None, repr=False)
    spool_dir: Path = Path(DEFAULT_SPOOL_DIR)
    spool_max_bytes: int = DEFAULT_SPOOL_MAX
    spool_on_full: str = "drop-new"
    grpc_address: str = DEFAULT_GRPC_ADDRESS
    chunk_steps: int = DEFAULT_CHUNK_STEPS
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    policy_poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    policy_device: str = "auto"      # where the policy runs: cpu, cuda, cuda:N; auto = cuda when present
    policy_bases: str = ""           # colon-separated dirs holding provisioned VLA bases (FLEETLOOP_BASE_DIRS)
    trusted_keys: str = ""           # public keys that sign policy versions: files/dirs, comma-separated
    inference: str = "async"         # async: the next chunk is computed while the robot executes this one
    policy_indicator: str = "published"         # or positive / negative / unset: overrides the version's
    policy_guidance_beta: float | None = None   # None: the version's published beta
    grpc_tls_cert: Path | None = None    # robot link TLS: certificate chain + key (PEM)
    grpc_tls_key: Path | None = None
    grpc_client_ca: Path | None = None   # mutual TLS: clients need a certificate signed by this CA
    grpc_token: str | None = field(default=None, repr=False)   # bearer token on every robot link call
    grpc_token_file: Path | None = None  # accepted tokens, one per line
    grpc_insecure: bool = False          # allow a non-loopback link without TLS or a token
    source: str = "defaults"   # "<file> + environment", for messages

    def __repr__(self) -> str:  # never print a password
        inner = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"ActorConfig({inner})"

    def s3_settings(self):
        """The fleetloop.config.S3Settings for fleetloop.buffer.store.open_store. The robot never
        creates the bucket: the cloud side does (deploy/minio/init.sh)."""
        from fleetloop.config import S3Settings
        return S3Settings(endpoint_url=self.s3_endpoint, region=self.s3_region,
                          access_key=self.aws_access_key_id, secret_key=self.aws_secret_access_key,
                          create_bucket=False)

    def link_security(self):
        """The robot link's fleetloop.actor.link.LinkSecurity (files read now)."""
        from fleetloop.actor.link import LinkSecurity
        return LinkSecurity.from_files(self.grpc_tls_cert, self.grpc_tls_key, self.grpc_client_ca,
                                       self.grpc_token, self.grpc_token_file, self.grpc_insecure)

    def redacted(self) -> dict[str, Any]:
        """Everything, with secrets masked: what the daemon logs at start."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("aws_secret_access_key", "grpc_token") and v:
                v = "***"
            elif f.name == "redis_url":
                v = redact_url(v)
            elif isinstance(v, Path):
                v = str(v)
            out[f.name] = v
        return out


def redact_url(url: str) -> str:
    """redis://:secret@host:6379/0 -> redis://:***@host:6379/0"""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# -- value parsers: each returns the value or raises ValueError(what is accepted) -----------

def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HELP}; got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        raise ValueError(f"expected {SIZE_HELP}; got the float {value!r} (write it as a string with a unit)")
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _SIZE_UNITS:
            raise ValueError(f"expected {SIZE_HELP}; got {value!r}")
        n = int(float(m.group(1)) * _SIZE_UNITS[unit])
        if unit in ("", "b") and "." in m.group(1):
            raise ValueError(f"expected a whole number of bytes; got {value!r}")
    else:
        raise ValueError(f"expected {SIZE_HELP}; got {type(value).__name__} {value!r}")
    if n <= 0:
        raise ValueError(f"must be greater than zero; got {value!r}")
    return n


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_HELP}; got {value!r}")
    if isinstance(value, (int, float)):
        s = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        unit = (m.group(2).lower() or "s") if m else None
        if not m or unit not in _DURATION_UNITS:
            raise ValueError(f"expected {DURATION_HELP}; got {value!r}")
        s = float(m.group(1)) * _DURATION_UNITS[unit]
    else:
        raise ValueError(f"expected {DURATION_HELP}; got {type(value).__name__} {value!r}")
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"must be a positive duration; got {value!r}")
    return s


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a positive whole number; got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"expected a positive whole number; got {value!r}") from None
    if not isinstance(value, int):
        raise ValueError(f"expected a positive whole number; got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"expected a positive whole number; got {value!r}")
    return value


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false (environment: 1/0, true/false, yes/no); got {value!r}")


def parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string; got {type(value).__name__} {value!r}")
    return value.strip()


def check_robot_id(value: str) -> str:
    if not ROBOT_ID_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid robot id: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (e.g. \"arm-07\")")
    return value


def _check_port(parts, what: str) -> None:
    try:
        parts.port  # noqa: B018 -- raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise ValueError(f"{what} has an invalid port (use 1-65535)") from None


def _check_host(host: str | None, what: str) -> None:
    if not host:
        raise ValueError(f"{what} has no host")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"{what} has an invalid host name {host!r}")


def check_store_uri(value: str) -> str:
    accepted = "use s3://bucket/optional/prefix or file:///absolute/path"
    try:
        parts = urlsplit(value)
    except ValueError as e:
        raise ValueError(f"{value!r} is not a URI ({e}); {accepted}") from None
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{value!r} has no bucket; {accepted}")
        if not BUCKET_RE.fullmatch(parts.netloc) or ".." in parts.netloc:
            raise ValueError(f"{value!r}: bucket {parts.netloc!r} is not a valid S3 bucket name (3-63 lowercase "
                             f"letters, digits, '.' or '-', starting and ending with a letter or digit); {accepted}")
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r} has a query or fragment; {accepted}")
        return value.rstrip("/")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{value!r} names a host ({parts.netloc!r}); a file store is local, "
                             f"three slashes; {accepted}")
        if not parts.path.startswith("/"):
            raise ValueError(f"{value!r} has no absolute path; {accepted}")
        return value
    raise ValueError(f"{value!r} is not a supported store URI; {accepted}")


def check_http_url(value: str) -> str:
    accepted = "use http://host[:port] or https://host[:port]"
    try:
        parts = urlsplit(value)
    except ValueError as e:
        raise ValueError(f"{value!r} is not a URL ({e}); {accepted}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{value!r} is not an http(s) URL; {accepted}")
    _check_host(parts.hostname, repr(value))
    _check_port(parts, repr(value))
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r} has a query or fragment; {accepted}")
    return value.rstrip("/")


def check_redis_url(value: str) -> str:
    accepted = ("use redis://[:password@]host[:port][/db], rediss://... (TLS) or unix:///path/to/redis.sock")
    try:
        parts = urlsplit(value)
    except ValueError as e:
        raise ValueError(f"{redact_url(value)!r} is not a URL ({e}); {accepted}") from None
    shown = repr(redact_url(value))
    if parts.scheme in ("redis", "rediss"):
        _check_host(parts.hostname, shown)
        _check_port(parts, shown)
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"{shown}: database {db!r} is not a number; {accepted}")
        return value
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            raise ValueError(f"{shown} has no absolute socket path; {accepted}")
        return value
    raise ValueError(f"{shown} is not a Redis URL; {accepted}")


def check_on_full(value: str) -> str:
    if value not in SPOOL_POLICIES:
        raise ValueError(f"{value!r} is not a spool policy; accepted: "
                         + " or ".join(f'"{p}"' for p in SPOOL_POLICIES))
    return value


def check_device(value: str) -> str:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"{value!r} is not a device; accepted: auto, cpu, cuda or cuda:N")


def check_inference(value: str) -> str:
    if value not in ("async", "sync"):
        raise ValueError(f"{value!r} is not an inference mode; accepted: \"async\" or \"sync\"")
    return value


def check_indicator(value: str) -> str:
    from fleetloop.policy.guidance import INDICATOR_SETTINGS
    if value not in INDICATOR_SETTINGS:
        raise ValueError(f"{value!r} is not an indicator setting; accepted: "
                         + ", ".join(f'"{v}"' for v in INDICATOR_SETTINGS))
    return value


def parse_guidance_beta(value: Any) -> float | None:
    """A number from 0 to 10, or "published" (None: the version's own)."""
    from fleetloop.policy.guidance import PUBLISHED, check_beta
    if isinstance(value, str) and value.strip().lower() == PUBLISHED:
        return None
    accepted = f'accepted: a number from 0 to 10 (1 = no guidance) or "{PUBLISHED}"'
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a guidance weight; {accepted}")
    try:
        return check_beta(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"{value!r} is not a guidance weight; {accepted}") from None


def check_grpc_address(value: str) -> str:
    accepted = "use host:port (e.g. 127.0.0.1:50051), [ipv6]:port or unix:/absolute/path"
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if path.startswith("//"):  # unix:///abs/path
            path = path[2:]
        if not path.startswith("/"):
            raise ValueError(f"{value!r} has no absolute socket path; {accepted}")
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not an address; {accepted}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} has an invalid port {port!r} (use 0-65535; 0 picks a free port)")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{value!r}: unbalanced '[' in the host; {accepted}")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{value!r}: {host[1:-1]!r} is not an IPv6 address; {accepted}") from None
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 host in brackets, e.g. [::1]:50051")
    else:
        _check_host(host, repr(value))
    return value


# -- the schema: (section, key) -> field, parser, environment variables ---------------------

@dataclass(frozen=True)
class _Key:
    section: str           # "" for the top level
    key: str
    field: str             # ActorConfig field
    parse: Callable[[Any], Any]
    env: tuple[str, ...] = ()

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key


def _chain(*fns):
    def run(v):
        for fn in fns:
            v = fn(v)
        return v
    return run


KEYS: tuple[_Key, ...] = (
    _Key("", "robot_id", "robot_id", _chain(parse_str, check_robot_id), ("FLEETLOOP_ROBOT_ID",)),
    _Key("cloud", "store", "store_uri", _chain(parse_str, check_store_uri), ("FLEETLOOP_STORE",)),
    _Key("cloud", "s3_endpoint", "s3_endpoint", _chain(parse_str, check_http_url),
         ("FLEETLOOP_S3_ENDPOINT", "AWS_ENDPOINT_URL")),
    _Key("cloud", "s3_region", "s3_region", parse_str, ("AWS_DEFAULT_REGION",)),
    _Key("cloud", "redis_url", "redis_url", _chain(parse_str, check_redis_url), ("FLEETLOOP_REDIS_URL",)),
    _Key("cloud", "ingest_url", "ingest_url", _chain(parse_str, check_http_url), ("FLEETLOOP_INGEST_URL",)),
    _Key("credentials", "aws_access_key_id", "aws_access_key_id", parse_str, ("AWS_ACCESS_KEY_ID",)),
    _Key("credentials", "aws_secret_access_key", "aws_secret_access_key", parse_str, ("AWS_SECRET_ACCESS_KEY",)),
    _Key("spool", "dir", "spool_dir", parse_str, ("FLEETLOOP_SPOOL_DIR",)),
    _Key("spool", "max_size", "spool_max_bytes", parse_size, ("FLEETLOOP_SPOOL_MAX",)),
    _Key("spool", "on_full", "spool_on_full", _chain(parse_str, check_on_full), ("FLEETLOOP_SPOOL_ON_FULL",)),
    _Key("grpc", "address", "grpc_address", _chain(parse_str, check_grpc_address), ("FLEETLOOP_GRPC_ADDRESS",)),
    _Key("grpc", "tls_cert", "grpc_tls_cert", parse_str, ("FLEETLOOP_GRPC_TLS_CERT",)),
    _Key("grpc", "tls_key", "grpc_tls_key", parse_str, ("FLEETLOOP_GRPC_TLS_KEY",)),
    _Key("grpc", "client_ca", "grpc_client_ca", parse_str, ("FLEETLOOP_GRPC_CLIENT_CA",)),
    _Key("grpc", "token", "grpc_token", parse_str, ("FLEETLOOP_GRPC_TOKEN",)),
    _Key("grpc", "token_file", "grpc_token_file", parse_str, ("FLEETLOOP_GRPC_TOKEN_FILE",)),
    _Key("grpc", "insecure", "grpc_insecure", parse_bool, ("FLEETLOOP_GRPC_INSECURE",)),
    _Key("recording", "chunk_steps", "chunk_steps", parse_int, ("FLEETLOOP_CHUNK_STEPS",)),
    _Key("recording", "chunk_size", "chunk_bytes", parse_size, ("FLEETLOOP_CHUNK_SIZE",)),
    _Key("policy", "poll_interval", "policy_poll_interval_s", parse_duration, ("FLEETLOOP_POLICY_POLL_INTERVAL",)),
    _Key("policy", "device", "policy_device", _chain(parse_str, check_device), ("FLEETLOOP_POLICY_DEVICE",)),
    _Key("policy", "bases", "policy_bases", parse_str, ("FLEETLOOP_BASE_DIRS",)),
    _Key("policy", "trusted_keys", "trusted_keys", parse_str, ("FLEETLOOP_TRUSTED_KEYS",)),
    _Key("policy", "inference", "inference", _chain(parse_str, check_inference), ("FLEETLOOP_INFERENCE",)),
    _Key("policy", "indicator", "policy_indicator", _chain(parse_str, check_indicator),
         ("FLEETLOOP_POLICY_INDICATOR",)),
    _Key("policy", "guidance_beta", "policy_guidance_beta", parse_guidance_beta, ("FLEETLOOP_POLICY_GUIDANCE_BETA",)),
)
SECTIONS = tuple(dict.fromkeys(k.section for k in KEYS if k.section))
ENV_VARS = tuple(e for k in KEYS for e in k.env)
REQUIRED = ("robot_id", "store_uri", "redis_url")
MIN_SPOOL_BYTES = 1024 ** 2
MIN_CHUNK_BYTES = 1024
MAX_CHUNK_BYTES = 512 * 1024 ** 2


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_file(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory, not a TOML file") from None
    except PermissionError:
        raise ConfigError(f"config file {str(path)!r} is not readable by this user (uid {os.getuid()})") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None


def _flatten(doc: dict, where: str, errors: list[str]) -> dict[str, tuple[Any, str]]:
    """{dotted key: (value, where)} for known keys; unknown ones become errors."""
    by_section: dict[str, dict[str, _Key]] = {}
    for k in KEYS:
        by_section.setdefault(k.section, {})[k.key] = k
    top_names = list(by_section[""]) + list(SECTIONS)
    out: dict[str, tuple[Any, str]] = {}
    for name, value in doc.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                errors.append(f"{name} in {where}: expected a table [{name}], got {type(value).__name__} {value!r}")
                continue
            known = by_section[name]
            for key, v in value.items():
                if key not in known:
                    errors.append(f"unknown key {name}.{key} in {where}{_suggest(key, known)}; "
                                  f"accepted keys in [{name}]: {', '.join(known)}")
                else:
                    out[f"{name}.{key}"] = (v, where)
        elif name in by_section[""]:
            out[name] = (value, where)
        else:
            errors.append(f"unknown key {name!r} in {where}{_suggest(name, top_names)}; accepted at the top level: "
                          f"{', '.join(by_section[''])} and the tables "
                          + ", ".join(f"[{s}]" for s in SECTIONS))
    return out


def _warn_if_world_readable(path: Path, doc: dict) -> None:
    """A file that holds a secret should not be readable by every user on the robot."""
    creds = doc.get("credentials") if isinstance(doc.get("credentials"), dict) else {}
    cloud = doc.get("cloud") if isinstance(doc.get("cloud"), dict) else {}
    try:
        redis_password = urlsplit(str(cloud.get("redis_url", ""))).password
    except ValueError:
        redis_password = None
    grpc_sec = doc.get("grpc") if isinstance(doc.get("grpc"), dict) else {}
    if not (creds.get("aws_secret_access_key") or redis_password or grpc_sec.get("token")):
        return
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        log.warning("%s holds a secret and is readable by every user: chmod 0640 (owner root, group "
                    "fleetloop), or move the secret to the root-only EnvironmentFile", path)


def _resolve_dir(raw: str, base: Path) -> Path:
    p = Path(os.path.expanduser(raw))
    if not p.is_absolute():
        p = base / p
    return Path(os.path.normpath(p))


def check_spool_dir(path: Path) -> None:
    """Create the spool directory if needed and prove it is writable by writing a file in it
    (os.access is not enough: root passes it on a read-only file system)."""
    who = f"uid {os.getuid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{str(path)!r} exists and is not a directory") from None
    except NotADirectoryError:
        raise ValueError(f"cannot create {str(path)!r}: a parent is a file, not a directory") from None
    except OSError as e:
        raise ValueError(f"cannot create {str(path)!r} as {who}: {e.strerror or e}") from None
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"{str(path)!r} is not writable as {who}: {e.strerror or e}") from None


def _load_pem(path: Path, what: str):
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{str(path)!r} is a directory, not a PEM file") from None
    except PermissionError:
        raise ValueError(f"{str(path)!r} is not readable by this user (uid {os.getuid()})") from None
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    try:
        if what == "key":
            return serialization.load_pem_private_key(data, password=None)
        certs = x509.load_pem_x509_certificates(data)
        return certs
    except (ValueError, TypeError) as e:
        kind = "an unencrypted PEM private key" if what == "key" else "PEM certificate(s)"
        raise ValueError(f"{str(path)!r} is not {kind} ({str(e).splitlines()[0][:120]})") from None


def _check_link_security(values: dict, from_env: set, base: Path, errors: list[str]) -> None:
    """[grpc] TLS files exist and parse, the key matches the certificate, the token settings make
    sense, and a non-loopback address is not served without TLS or a token (unless insecure)."""
    from fleetloop.actor.link import TOKEN_MIN_CHARS, LinkSecurity, read_tokens
    loaded: dict[str, Any] = {}
    for fld, dotted, what in (("grpc_tls_cert", "grpc.tls_cert", "cert"), ("grpc_tls_key", "grpc.tls_key", "key"),
                              ("grpc_client_ca", "grpc.client_ca", "cert"), ("grpc_token_file", "grpc.token_file", None)):
        if fld not in values:
            continue
        raw, label = values[fld]
        path = _resolve_dir(raw, Path.cwd() if dotted in from_env else base)
        values[fld] = (path, label)
        try:
            if what is None:
                try:
                    tokens = read_tokens(path)
                except FileNotFoundError:
                    raise ValueError(f"{str(path)!r} does not exist") from None
                except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
                    raise ValueError(f"{str(path)!r} cannot be read as a token file: {e}") from None
                if not tokens:
                    raise ValueError(f"{str(path)!r} holds no token (one per line)")
                if any(len(t) < TOKEN_MIN_CHARS for t in tokens):
                    raise ValueError(f"{str(path)!r}: every token must have at least {TOKEN_MIN_CHARS} characters")
            else:
                loaded[fld] = _load_pem(path, what)
        except ValueError as e:
            errors.append(f"{label}: {e}")
    cert, key = values.get("grpc_tls_cert"), values.get("grpc_tls_key")
    if bool(cert) != bool(key):
        missing = "grpc.tls_key" if cert else "grpc.tls_cert"
        errors.append(f"{missing} is missing but {(cert or key)[1]} is set: TLS needs the certificate and its key")
    elif "grpc_tls_cert" in loaded and "grpc_tls_key" in loaded:
        from cryptography.hazmat.primitives import serialization
        fmt = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        if loaded["grpc_tls_cert"][0].public_key().public_bytes(*fmt) != loaded["grpc_tls_key"].public_key().public_bytes(*fmt):
            errors.append(f"{key[1]}: this key does not belong to the certificate {str(cert[0])!r}")
    if "grpc_client_ca" in values and not cert:
        errors.append(f"{values['grpc_client_ca'][1]}: client certificates need TLS: set grpc.tls_cert and grpc.tls_key")
    if "grpc_token" in values:
        if "grpc_token_file" in values:
            errors.append(f"{values['grpc_token'][1]} and {values['grpc_token_file'][1]} are both set: use one")
        elif len(values["grpc_token"][0]) < TOKEN_MIN_CHARS:
            errors.append(f"{values['grpc_token'][1]}: a token must have at least {TOKEN_MIN_CHARS} characters")
    address = values.get("grpc_address", (DEFAULT_GRPC_ADDRESS, ""))[0]
    has_auth = bool(cert and key) or "grpc_token" in values or "grpc_token_file" in values
    insecure = values.get("grpc_insecure", (False, ""))[0]
    try:
        LinkSecurity(tokens=("x" * TOKEN_MIN_CHARS,) if has_auth else (), insecure=insecure).check_address(address)
    except ValueError as e:
        errors.append(f"grpc.address: {e}")


def load_actor_config(path: str | os.PathLike | None, env: Mapping[str, str] | None = None,
                      check_spool: bool = True) -> ActorConfig:
    """Load the TOML file at `path` (None: no file, environment and defaults only), apply the
    environment overrides from `env` (default os.environ), validate everything and return the
    config; raise ConfigError listing every problem otherwise. `check_spool=False` skips creating
    and write-testing the spool directory (for tools that only print a config)."""
    env = os.environ if env is None else env
    errors: list[str] = []
    raw: dict[str, tuple[Any, str]] = {}
    base = Path.cwd()
    source = "environment"
    doc: dict = {}
    if path is not None:
        p = Path(path)
        doc = _read_file(p)
        raw = _flatten(doc, str(p), errors)
        base = p.resolve().parent
        source = f"{p} + environment"

    # environment overrides (the first set variable of a key's list wins)
    from_env: set[str] = set()
    for k in KEYS:
        for var in k.env:
            value = env.get(var)
            if value is not None and value.strip() != "":
                raw[k.dotted] = (value, f"environment variable {var}")
                from_env.add(k.dotted)
                break

    values: dict[str, Any] = {}   # field -> (parsed value, label for messages)
    failed: set[str] = set()
    for k in KEYS:
        if k.dotted not in raw:
            continue
        value, where = raw[k.dotted]
        label = f"{where} (overrides {k.dotted})" if k.dotted in from_env else f"{k.dotted} in {where}"
        try:
            parsed = k.parse(value)
            if parsed == "":
                raise ValueError("must not be empty")
        except ValueError as e:
            errors.append(f"{label}: {e}")
            failed.add(k.field)
            continue
        values[k.field] = (parsed, label)

    for k in KEYS:
        if k.field in REQUIRED and k.field not in values and k.field not in failed:
            where = f"[{k.section}] {k.key} = ..." if k.section else f"{k.key} = ..."
            errors.append(f"{k.dotted} is required: set it in the config file ({where}) "
                          f"or in the environment variable {k.env[0]}")

    # cross-field checks
    has_key = "aws_access_key_id" in values
    has_secret = "aws_secret_access_key" in values
    if has_key != has_secret:
        missing = "credentials.aws_secret_access_key" if has_key else "credentials.aws_access_key_id"
        present = values.get("aws_access_key_id", values.get("aws_secret_access_key"))[1]
        errors.append(f"{missing} is missing but {present} is set: give both S3 keys, or neither to use "
                      "boto3's default credential chain")
    max_bytes = values.get("spool_max_bytes", (DEFAULT_SPOOL_MAX, "spool.max_size (default)"))
    chunk_bytes = values.get("chunk_bytes", (DEFAULT_CHUNK_BYTES, "recording.chunk_size (default)"))
    if "spool_max_bytes" in values and max_bytes[0] < MIN_SPOOL_BYTES:
        errors.append(f"{max_bytes[1]}: {max_bytes[0]} bytes is too small for a spool (at least 1MiB)")
    if "chunk_bytes" in values and not MIN_CHUNK_BYTES <= chunk_bytes[0] <= MAX_CHUNK_BYTES:
        errors.append(f"{chunk_bytes[1]}: {chunk_bytes[0]} bytes is outside the accepted range 1KiB-512MiB")
    elif max_bytes[0] >= MIN_SPOOL_BYTES and max_bytes[0] < 2 * chunk_bytes[0]:
        errors.append(f"{max_bytes[1]}: the spool ({max_bytes[0]} bytes) must hold at least two chunks "
                      f"(recording.chunk_size is {chunk_bytes[0]} bytes)")

    _check_link_security(values, from_env, base, errors)

    spool_raw, spool_label = values.pop("spool_dir", (DEFAULT_SPOOL_DIR, "spool.dir (default)"))
    spool_base = Path.cwd() if "spool.dir" in from_env else base
    spool_dir = _resolve_dir(spool_raw, spool_base)
    # An explicitly configured spool is always checked (every problem in one message); the default
    # one is created only for an otherwise valid config, so a broken one leaves nothing behind.
    explicit = spool_label != "spool.dir (default)"
    if check_spool and "spool_dir" not in failed and (explicit or not errors):
        try:
            check_spool_dir(spool_dir)
        except ValueError as e:
            errors.append(f"{spool_label}: {e}")

    if errors:
        raise ConfigError(errors, source)
    if path is not None:
        _warn_if_world_readable(Path(path), doc)
    return ActorConfig(spool_dir=spool_dir, source=source, **{k: v[0] for k, v in values.items()})
