"""The actor daemon's configuration: one TOML file, overridden by environment variables,
validated once at start so a misconfigured robot stops with a message that says which key was
wrong, what it held and what is accepted -- instead of failing an hour later in the uploader.

  fleetloop actor --config /etc/fleetloop/actor.toml

The schema is a pydantic-settings model (ActorSettings: one table per section, each key's type
is its parser, from config_types.py), read from the TOML file (TomlFileSource) and the documented environment variables
(DocumentedEnvSource); pydantic's errors are reworded to name the key and where it came from.

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
import logging
import os
import stat
import tempfile
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from fleetloop.actor.config_types import (ChunkSize, Count, Device, Duration, Flag, GrpcAddress, GuidanceBeta,
                                         HttpUrl, Indicator, InferenceMode, RedisUrl, RobotId, SpoolPolicy, SpoolSize,
                                         StoreUri, Text, redact_url)

log = logging.getLogger(__name__)

DEFAULT_SPOOL_DIR = "/var/lib/fleetloop/spool"
DEFAULT_SPOOL_MAX = 2 * 1024 ** 3
DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"
DEFAULT_CHUNK_STEPS = 256
DEFAULT_CHUNK_BYTES = 4 * 1024 ** 2
DEFAULT_POLL_INTERVAL_S = 5.0

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


# -- the schema: one pydantic model per TOML table; each field's type is its parser (config_types) ---

def setting(field: str, *env: str):
    """A key of the file: the ActorConfig field it sets and its environment variables (the first
    one set wins). Unset is None, so ActorConfig's default applies."""
    return Field(default=None, json_schema_extra={"field": field, "env": env})


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CloudTable(_Table):
    store: StoreUri = setting("store_uri", "FLEETLOOP_STORE")
    s3_endpoint: HttpUrl = setting("s3_endpoint", "FLEETLOOP_S3_ENDPOINT", "AWS_ENDPOINT_URL")
    s3_region: Text = setting("s3_region", "AWS_DEFAULT_REGION")
    redis_url: RedisUrl = setting("redis_url", "FLEETLOOP_REDIS_URL")
    ingest_url: HttpUrl = setting("ingest_url", "FLEETLOOP_INGEST_URL")


class CredentialsTable(_Table):
    aws_access_key_id: Text = setting("aws_access_key_id", "AWS_ACCESS_KEY_ID")
    aws_secret_access_key: Text = setting("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY")


class SpoolTable(_Table):
    dir: Text = setting("spool_dir", "FLEETLOOP_SPOOL_DIR")
    max_size: SpoolSize = setting("spool_max_bytes", "FLEETLOOP_SPOOL_MAX")
    on_full: SpoolPolicy = setting("spool_on_full", "FLEETLOOP_SPOOL_ON_FULL")


class GrpcTable(_Table):
    address: GrpcAddress = setting("grpc_address", "FLEETLOOP_GRPC_ADDRESS")
    tls_cert: Text = setting("grpc_tls_cert", "FLEETLOOP_GRPC_TLS_CERT")
    tls_key: Text = setting("grpc_tls_key", "FLEETLOOP_GRPC_TLS_KEY")
    client_ca: Text = setting("grpc_client_ca", "FLEETLOOP_GRPC_CLIENT_CA")
    token: Text = setting("grpc_token", "FLEETLOOP_GRPC_TOKEN")
    token_file: Text = setting("grpc_token_file", "FLEETLOOP_GRPC_TOKEN_FILE")
    insecure: Flag = setting("grpc_insecure", "FLEETLOOP_GRPC_INSECURE")


class RecordingTable(_Table):
    chunk_steps: Count = setting("chunk_steps", "FLEETLOOP_CHUNK_STEPS")
    chunk_size: ChunkSize = setting("chunk_bytes", "FLEETLOOP_CHUNK_SIZE")


class PolicyTable(_Table):
    poll_interval: Duration = setting("policy_poll_interval_s", "FLEETLOOP_POLICY_POLL_INTERVAL")
    device: Device = setting("policy_device", "FLEETLOOP_POLICY_DEVICE")
    bases: Text = setting("policy_bases", "FLEETLOOP_BASE_DIRS")
    trusted_keys: Text = setting("trusted_keys", "FLEETLOOP_TRUSTED_KEYS")
    inference: InferenceMode = setting("inference", "FLEETLOOP_INFERENCE")
    indicator: Indicator = setting("policy_indicator", "FLEETLOOP_POLICY_INDICATOR")
    guidance_beta: GuidanceBeta = setting("policy_guidance_beta", "FLEETLOOP_POLICY_GUIDANCE_BETA")


class ActorSettings(BaseSettings):
    """The file's schema: top-level keys, then one table per section. Every key is optional here;
    load_actor_config reports the required ones missing with where to set them."""
    model_config = SettingsConfigDict(extra="forbid", frozen=True, validate_default=False)  # unset stays None

    robot_id: RobotId = setting("robot_id", "FLEETLOOP_ROBOT_ID")
    cloud: CloudTable = CloudTable()
    credentials: CredentialsTable = CredentialsTable()
    spool: SpoolTable = SpoolTable()
    grpc: GrpcTable = GrpcTable()
    recording: RecordingTable = RecordingTable()
    policy: PolicyTable = PolicyTable()

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # load_actor_config gathers the values from its own sources (below), so callers pass
        # the environment they mean (a test, a tool) and os.environ is never read behind them.
        return (init_settings,)


@dataclass(frozen=True)
class Key:
    section: str           # "" for the top level
    key: str
    field: str             # ActorConfig field
    env: tuple[str, ...]

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key


def _keys() -> tuple[Key, ...]:
    out = []
    for name, info in ActorSettings.model_fields.items():
        table = info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, _Table) else None
        for section, key, f in ([(name, k, i) for k, i in table.model_fields.items()] if table else [("", name, info)]):
            out.append(Key(section, key, f.json_schema_extra["field"], f.json_schema_extra["env"]))
    return tuple(out)


KEYS = _keys()
SECTIONS = tuple(dict.fromkeys(k.section for k in KEYS if k.section))
ENV_VARS = tuple(e for k in KEYS for e in k.env)
REQUIRED = ("robot_id", "store_uri", "redis_url")


class TomlFileSource(TomlConfigSettingsSource):
    """The config file, with a message that says what is wrong with it (pydantic-settings skips
    a missing file silently; a robot's daemon must not start on defaults then)."""

    def _read_files(self, files, deep_merge: bool = False) -> dict:
        path = Path(files)
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


class DocumentedEnvSource(PydanticBaseSettingsSource):
    """The environment variables documented above (not derived from field names: FLEETLOOP_STORE
    sets cloud.store, AWS_* are the names boto3 users know). An empty value counts as unset."""

    def __init__(self, settings_cls, environ: Mapping[str, str]):
        super().__init__(settings_cls)
        self.environ = environ
        self.origin: dict[str, str] = {}   # dotted key -> the variable that set it

    def get_field_value(self, field, field_name: str):  # the values come whole from __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in KEYS:
            for var in k.env:
                value = self.environ.get(var)
                if value is not None and value.strip() != "":
                    (out.setdefault(k.section, {}) if k.section else out)[k.key] = value
                    self.origin[k.dotted] = var
                    break
        return out


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _merge(file_values: dict, env_values: dict) -> dict:
    """Environment over file, key by key inside each table."""
    out = dict(file_values)
    for name, value in env_values.items():
        table = out.get(name)
        out[name] = {**table, **value} if isinstance(value, dict) and isinstance(table, dict) else value
    return out


def _label(dotted: str, where: str, origin: dict[str, str]) -> str:
    """Where a key's value came from, as messages name it."""
    return f"environment variable {origin[dotted]} (overrides {dotted})" if dotted in origin else f"{dotted} in {where}"


def _problem(err: dict, where: str, origin: dict[str, str]) -> str:
    """One pydantic error as the sentence an operator reads: the key, where it came from, what
    was wrong and what is accepted."""
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc)
    by_section: dict[str, list[str]] = {}
    for k in KEYS:
        by_section.setdefault(k.section, []).append(k.key)
    if err["type"] == "extra_forbidden" and len(loc) == 2:
        known = by_section[loc[0]]
        return (f"unknown key {dotted} in {where}{_suggest(loc[1], known)}; "
                f"accepted keys in [{loc[0]}]: {', '.join(known)}")
    if err["type"] == "extra_forbidden":
        return (f"unknown key {loc[0]!r} in {where}{_suggest(loc[0], by_section[''] + list(SECTIONS))}; "
                f"accepted at the top level: {', '.join(by_section[''])} and the tables "
                + ", ".join(f"[{s}]" for s in SECTIONS))
    if len(loc) == 1 and loc[0] in SECTIONS:
        v = err["input"]
        return f"{loc[0]} in {where}: expected a table [{loc[0]}], got {type(v).__name__} {v!r}"
    return f"{_label(dotted, where, origin)}: {err['msg'].removeprefix('Value error, ')}"


def _without(values: dict, locs: list[tuple]) -> dict:
    """values less the keys at locs (what failed), so the rest can still be checked together."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for loc in locs:
        if len(loc) == 1 or not isinstance(out.get(loc[0]), dict):
            out.pop(loc[0], None)
        else:
            out[loc[0]].pop(loc[1], None)
    return out


def _validate(values: dict, where: str, origin: dict[str, str], errors: list[str]) -> tuple[ActorSettings, set]:
    """Validate everything at once; on errors, record each and validate what is left, so the
    cross-field checks still see the good values. Returns the settings and the failed keys."""
    try:
        return ActorSettings(**values), set()
    except ValidationError as e:
        problems = e.errors(include_url=False)
    errors.extend(_problem(err, where, origin) for err in problems)
    locs = [tuple(str(p) for p in err["loc"][:2]) for err in problems]
    return ActorSettings(**_without(values, locs)), {".".join(loc) for loc in locs}


def _present(settings: ActorSettings, where: str, origin: dict[str, str]) -> dict[str, tuple[Any, str]]:
    """{ActorConfig field: (value, label for messages)} for every key that was set."""
    out: dict[str, tuple[Any, str]] = {}
    for k in KEYS:
        value = getattr(getattr(settings, k.section), k.key) if k.section else getattr(settings, k.key)
        if value is None:
            continue
        out[k.field] = (value, _label(k.dotted, where, origin))
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
    base = Path.cwd()
    source = "environment"
    doc: dict = {}
    if path is not None:
        p = Path(path)
        doc = TomlFileSource(ActorSettings, toml_file=p)()
        base = p.resolve().parent
        source = f"{p} + environment"
    env_source = DocumentedEnvSource(ActorSettings, env)
    from_env = env_source.origin   # dotted key -> variable, for messages and relative paths
    settings, failed_keys = _validate(_merge(doc, env_source()), str(path), from_env, errors)
    values = _present(settings, str(path), from_env)   # field -> (parsed value, label for messages)
    failed = {k.field for k in KEYS if k.dotted in failed_keys}

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
    if "chunk_bytes" not in failed and max_bytes[0] < 2 * chunk_bytes[0]:  # each size alone: SpoolSize, ChunkSize
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
