"""What each key of the actor's configuration accepts (fleetloop.actor.config): a parser per
kind of value, each returning the value or raising ValueError that says what is accepted, and the
pydantic types built from them, which the settings model (config.py) uses as field types."""
from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, BeforeValidator

from fleetloop.actor.spool import POLICIES as SPOOL_POLICIES

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


def _split(value: str, shown: str, noun: str, accepted: str):
    """urlsplit, or the error every URL checker below gives for a string that is no URL at all."""
    try:
        return urlsplit(value)
    except ValueError as e:
        raise ValueError(f"{shown} is not a {noun} ({e}); {accepted}") from None


def _check_no_query(parts, value: str, accepted: str) -> None:
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r} has a query or fragment; {accepted}")


def check_store_uri(value: str) -> str:
    accepted = "use s3://bucket/optional/prefix or file:///absolute/path"
    parts = _split(value, repr(value), "URI", accepted)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{value!r} has no bucket; {accepted}")
        if not BUCKET_RE.fullmatch(parts.netloc) or ".." in parts.netloc:
            raise ValueError(f"{value!r}: bucket {parts.netloc!r} is not a valid S3 bucket name (3-63 lowercase "
                             f"letters, digits, '.' or '-', starting and ending with a letter or digit); {accepted}")
        _check_no_query(parts, value, accepted)
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
    parts = _split(value, repr(value), "URL", accepted)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{value!r} is not an http(s) URL; {accepted}")
    _check_host(parts.hostname, repr(value))
    _check_port(parts, repr(value))
    _check_no_query(parts, value, accepted)
    return value.rstrip("/")


def check_redis_url(value: str) -> str:
    accepted = ("use redis://[:password@]host[:port][/db], rediss://... (TLS) or unix:///path/to/redis.sock")
    shown = repr(redact_url(value))
    parts = _split(value, shown, "URL", accepted)
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
    from fleetloop.release.guidance import INDICATOR_SETTINGS
    if value not in INDICATOR_SETTINGS:
        raise ValueError(f"{value!r} is not an indicator setting; accepted: "
                         + ", ".join(f'"{v}"' for v in INDICATOR_SETTINGS))
    return value


def parse_guidance_beta(value: Any) -> float | None:
    """A number from 0 to 10, or "published" (None: the version's own)."""
    from fleetloop.release.guidance import PUBLISHED, check_beta
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


# -- the types: a parser, then the checks of a single value ------------------------------


def _nonempty(value):
    if value == "":
        raise ValueError("must not be empty")
    return value


def _within(low: int, high: int | None, message: str):
    def check(n: int) -> int:
        if n < low or (high is not None and n > high):
            raise ValueError(message.format(n=n))
        return n
    return check


MIN_SPOOL_BYTES = 1024 ** 2
MIN_CHUNK_BYTES = 1024
MAX_CHUNK_BYTES = 512 * 1024 ** 2

# The types are their parsers (each raises ValueError saying what is accepted): pydantic runs
# them on the raw TOML or environment value, so a message never depends on pydantic's wording.
Text = Annotated[str, BeforeValidator(parse_str), AfterValidator(_nonempty)]
RobotId = Annotated[str, BeforeValidator(parse_str), AfterValidator(check_robot_id), AfterValidator(_nonempty)]
StoreUri = Annotated[str, BeforeValidator(parse_str), AfterValidator(check_store_uri), AfterValidator(_nonempty)]
HttpUrl = Annotated[str, BeforeValidator(parse_str), AfterValidator(check_http_url), AfterValidator(_nonempty)]
RedisUrl = Annotated[str, BeforeValidator(parse_str), AfterValidator(check_redis_url), AfterValidator(_nonempty)]
SpoolPolicy = Annotated[str, BeforeValidator(parse_str), AfterValidator(check_on_full)]
GrpcAddress = Annotated[str, BeforeValidator(parse_str), AfterValidator(check_grpc_address)]
Device = Annotated[str, BeforeValidator(parse_str), AfterValidator(check_device)]
InferenceMode = Annotated[str, BeforeValidator(parse_str), AfterValidator(check_inference)]
Indicator = Annotated[str, BeforeValidator(parse_str), AfterValidator(check_indicator)]
GuidanceBeta = Annotated[float | None, BeforeValidator(parse_guidance_beta)]  # None: "published"
SpoolSize = Annotated[int, BeforeValidator(parse_size), AfterValidator(_within(
    MIN_SPOOL_BYTES, None, "{n} bytes is too small for a spool (at least 1MiB)"))]
ChunkSize = Annotated[int, BeforeValidator(parse_size), AfterValidator(_within(
    MIN_CHUNK_BYTES, MAX_CHUNK_BYTES, "{n} bytes is outside the accepted range 1KiB-512MiB"))]
Count = Annotated[int, BeforeValidator(parse_int)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Flag = Annotated[bool, BeforeValidator(parse_bool)]
