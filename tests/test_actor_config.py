"""The actor daemon's configuration (fleetloop.actor.config): a valid TOML file, environment
overrides, and every kind of bad input failing at start with a ConfigError that names the key."""
from __future__ import annotations

import os
import re
import stat
import textwrap
from pathlib import Path

import pytest

from fleetloop.actor.config import DEFAULT_GRPC_ADDRESS, ENV_VARS, ActorConfig, ConfigError, load_actor_config
from fleetloop.actor.config_types import parse_duration, parse_size

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, body: str, name: str = "actor.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    p.chmod(0o600)
    return p


def valid_toml(tmp_path: Path, **extra: str) -> str:
    spool = tmp_path / "spool"
    body = f"""
        robot_id = "arm-07"

        [cloud]
        store = "s3://fleetloop/fleet"
        s3_endpoint = "http://minio.example.com:9000"
        s3_region = "eu-west-1"
        redis_url = "redis://:s3cret@redis.example.com:6379/0"

        [credentials]
        aws_access_key_id = "robot-arm-07"
        aws_secret_access_key = "do-not-log-me"

        [spool]
        dir = "{spool}"
        max_size = "20GiB"
        on_full = "drop-oldest"

        [grpc]
        address = "127.0.0.1:50099"

        [recording]
        chunk_steps = 128
        chunk_size = "2MiB"

        [policy]
        poll_interval = "500ms"
    """
    for key, line in extra.items():
        body += f"\n{line}\n"
    return body


def errors_of(excinfo) -> str:
    return str(excinfo.value)


# -- valid input ---------------------------------------------------------------------------

def test_valid_file(tmp_path):
    cfg = load_actor_config(write(tmp_path, valid_toml(tmp_path)), env={})
    assert isinstance(cfg, ActorConfig)
    assert cfg.robot_id == "arm-07"
    assert cfg.store_uri == "s3://fleetloop/fleet"
    assert cfg.s3_endpoint == "http://minio.example.com:9000"
    assert cfg.s3_region == "eu-west-1"
    assert cfg.redis_url == "redis://:s3cret@redis.example.com:6379/0"
    assert (cfg.aws_access_key_id, cfg.aws_secret_access_key) == ("robot-arm-07", "do-not-log-me")
    assert cfg.spool_dir == tmp_path / "spool" and cfg.spool_dir.is_dir()
    assert cfg.spool_max_bytes == 20 * 1024 ** 3
    assert cfg.spool_on_full == "drop-oldest"
    assert cfg.grpc_address == "127.0.0.1:50099"
    assert (cfg.chunk_steps, cfg.chunk_bytes) == (128, 2 * 1024 ** 2)
    assert cfg.policy_poll_interval_s == pytest.approx(0.5)
    s3 = cfg.s3_settings()
    assert (s3.endpoint_url, s3.region, s3.access_key, s3.secret_key, s3.create_bucket) == (
        "http://minio.example.com:9000", "eu-west-1", "robot-arm-07", "do-not-log-me", False)


def test_secrets_never_in_repr(tmp_path):
    cfg = load_actor_config(write(tmp_path, valid_toml(tmp_path)), env={})
    shown = repr(cfg) + str(cfg.redacted())
    assert "do-not-log-me" not in shown and "s3cret" not in shown
    assert "redis://:***@redis.example.com:6379/0" in shown


def test_minimal_file_gets_defaults(tmp_path):
    p = write(tmp_path, f"""
        robot_id = "r1"
        [cloud]
        store = "file:///srv/fleet-store"
        redis_url = "redis://localhost"
        [spool]
        dir = "spool"
    """)
    cfg = load_actor_config(p, env={})
    assert cfg.grpc_address == DEFAULT_GRPC_ADDRESS == "127.0.0.1:50051"
    assert cfg.spool_on_full == "drop-new"
    assert cfg.spool_max_bytes == 2 * 1024 ** 3
    assert cfg.s3_endpoint is None and cfg.aws_access_key_id is None
    assert cfg.spool_dir == tmp_path / "spool"  # relative to the config file's directory


def test_environment_overrides_file(tmp_path):
    p = write(tmp_path, valid_toml(tmp_path))
    env = {
        "FLEETLOOP_ROBOT_ID": "arm-08",
        "FLEETLOOP_STORE": "s3://other-bucket/fleet/b",
        "FLEETLOOP_REDIS_URL": "rediss://:pw@redis.cloud:6380/2",
        "FLEETLOOP_S3_ENDPOINT": "https://s3.example.org",
        "FLEETLOOP_SPOOL_DIR": str(tmp_path / "spool2"),
        "FLEETLOOP_SPOOL_MAX": "500MB",
        "FLEETLOOP_SPOOL_ON_FULL": "drop-new",
        "FLEETLOOP_GRPC_ADDRESS": "[::1]:6000",
        "FLEETLOOP_CHUNK_STEPS": "32",
        "FLEETLOOP_CHUNK_SIZE": "1048576",
        "FLEETLOOP_POLICY_POLL_INTERVAL": "2m",
        "AWS_ACCESS_KEY_ID": "k2",
        "AWS_SECRET_ACCESS_KEY": "s2",
        "AWS_DEFAULT_REGION": "us-west-2",
    }
    assert set(env) <= set(ENV_VARS)
    cfg = load_actor_config(p, env=env)
    assert cfg.robot_id == "arm-08"
    assert cfg.store_uri == "s3://other-bucket/fleet/b"
    assert cfg.redis_url == "rediss://:pw@redis.cloud:6380/2"
    assert cfg.s3_endpoint == "https://s3.example.org"
    assert cfg.spool_dir == tmp_path / "spool2" and cfg.spool_dir.is_dir()
    assert cfg.spool_max_bytes == 500 * 1000 ** 2
    assert cfg.spool_on_full == "drop-new"
    assert cfg.grpc_address == "[::1]:6000"
    assert (cfg.chunk_steps, cfg.chunk_bytes) == (32, 1 << 20)
    assert cfg.policy_poll_interval_s == 120.0
    assert (cfg.aws_access_key_id, cfg.aws_secret_access_key, cfg.s3_region) == ("k2", "s2", "us-west-2")


def test_environment_only_and_empty_values_are_unset(tmp_path):
    env = {"FLEETLOOP_ROBOT_ID": "sim.robot_3", "FLEETLOOP_STORE": f"file://{tmp_path}/store",
           "FLEETLOOP_REDIS_URL": "unix:///run/redis/redis.sock", "FLEETLOOP_SPOOL_DIR": str(tmp_path / "s"),
           "FLEETLOOP_S3_ENDPOINT": "", "AWS_ENDPOINT_URL": "  ", "FLEETLOOP_GRPC_ADDRESS": "unix:/run/fl.sock"}
    cfg = load_actor_config(None, env=env)
    assert cfg.robot_id == "sim.robot_3" and cfg.s3_endpoint is None
    assert cfg.grpc_address == "unix:/run/fl.sock"


def test_aws_endpoint_url_is_a_fallback(tmp_path):
    p = write(tmp_path, valid_toml(tmp_path))
    assert load_actor_config(p, env={"AWS_ENDPOINT_URL": "http://a:1"}).s3_endpoint == "http://a:1"
    cfg = load_actor_config(p, env={"AWS_ENDPOINT_URL": "http://a:1", "FLEETLOOP_S3_ENDPOINT": "http://b:2"})
    assert cfg.s3_endpoint == "http://b:2"


def test_example_config_in_deploy_is_valid(tmp_path):
    """deploy/robot/actor.example.toml is what robots start from: it must load as shipped
    (with the spool moved somewhere writable)."""
    cfg = load_actor_config(REPO / "deploy" / "robot" / "actor.example.toml",
                            env={"FLEETLOOP_SPOOL_DIR": str(tmp_path / "spool")})
    assert cfg.grpc_address == "127.0.0.1:50051"
    assert cfg.spool_on_full in ("drop-new", "drop-oldest")


@pytest.mark.parametrize("text,expected", [
    ("20GiB", 20 * 1024 ** 3), ("20 GiB", 20 * 1024 ** 3), ("20G", 20 * 1024 ** 3), ("1.5GiB", 3 * 2 ** 29),
    ("500MB", 500_000_000), ("64kB", 64_000), ("4096", 4096), (4096, 4096), ("512KiB", 512 * 1024),
    ("2tib", 2 * 1024 ** 4), ("1B", 1),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,expected", [("5s", 5.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0),
                                           (3, 3.0), (0.25, 0.25), ("7", 7.0)])
def test_durations(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


# -- invalid input: ConfigError naming the key, what was wrong, what is accepted ------------

def check_error(tmp_path, body: str, *patterns: str, env: dict | None = None):
    with pytest.raises(ConfigError) as excinfo:
        load_actor_config(write(tmp_path, body), env=env or {})
    msg = errors_of(excinfo)
    for pattern in patterns:
        assert re.search(pattern, msg), f"{pattern!r} not in:\n{msg}"
    return excinfo.value


def test_unknown_top_level_key(tmp_path):
    err = check_error(tmp_path, valid_toml(tmp_path) + '\n[spoool]\nmax_size = "1GiB"\n',
                      r"unknown key 'spoool'", r"did you mean 'spool'", r"\[cloud\]")
    assert len(err.errors) == 1


def test_unknown_key_in_section(tmp_path):
    body = valid_toml(tmp_path).replace('max_size = "20GiB"', 'max_sise = "20GiB"')
    check_error(tmp_path, body, r"unknown key spool\.max_sise", r"did you mean 'max_size'",
                r"accepted keys in \[spool\]: dir, max_size, on_full")


def test_section_that_is_not_a_table(tmp_path):
    body = 'spool = "/var/spool"\n' + valid_toml(tmp_path).replace("[spool]", "[x_spool]")
    check_error(tmp_path, body, r"spool in .*expected a table \[spool\]")


@pytest.mark.parametrize("robot_id", ["arm 07", "arm/07", "-arm", ".hidden", "", "a" * 129, "robot:1", "ärm"])
def test_bad_robot_id(tmp_path, robot_id):
    body = valid_toml(tmp_path).replace('robot_id = "arm-07"', f'robot_id = "{robot_id}"')
    check_error(tmp_path, body, r"robot_id", r"letters, digits, '\.', '_' or '-'|must not be empty")


def test_bad_robot_id_from_environment_names_the_variable(tmp_path):
    check_error(tmp_path, valid_toml(tmp_path), r"environment variable FLEETLOOP_ROBOT_ID \(overrides robot_id\)",
                env={"FLEETLOOP_ROBOT_ID": "bad id"})


def test_robot_id_of_wrong_type(tmp_path):
    body = valid_toml(tmp_path).replace('robot_id = "arm-07"', "robot_id = 7")
    check_error(tmp_path, body, r"robot_id in .*expected a string; got int 7")


@pytest.mark.parametrize("uri,why", [
    ("http://bucket/prefix", r"not a supported store URI"),
    ("s3://", r"has no bucket"),
    ("s3://Bad_Bucket/x", r"not a valid S3 bucket name"),
    ("s3://ab/x", r"not a valid S3 bucket name"),
    ("file://relative/path", r"names a host"),
    ("/var/store", r"not a supported store URI"),
    ("file:relative", r"no absolute path"),
    ("s3://[fleetloop/fleet", r"is not a URI \(Invalid IPv6 URL\)"),
    ("s3://fleetloop/fleet?region=x", r"has a query or fragment"),
])
def test_bad_store_uri(tmp_path, uri, why):
    body = valid_toml(tmp_path).replace('store = "s3://fleetloop/fleet"', f'store = "{uri}"')
    check_error(tmp_path, body, r"cloud\.store", why, r"s3://bucket/optional/prefix or file:///absolute/path")


@pytest.mark.parametrize("url,why", [
    ("http://redis.example.com:6379", r"not a Redis URL"),
    ("redis://:pw@redis.example.com:99999/0", r"invalid port"),
    ("redis://redis.example.com:6379/zero", r"database 'zero' is not a number"),
    ("redis://", r"has no host"),
    ("redis://bad host:6379", r"invalid host name"),
    ("unix://relative.sock", r"no absolute socket path"),
    ("redis://:pw@[redis.example.com:6379/0", r"'<unparseable>' is not a URL \(Invalid IPv6 URL\)"),
])
def test_bad_redis_url(tmp_path, url, why):
    body = valid_toml(tmp_path).replace('redis_url = "redis://:s3cret@redis.example.com:6379/0"', f'redis_url = "{url}"')
    err = check_error(tmp_path, body, r"cloud\.redis_url", why)
    assert "pw@" not in str(err)  # the password is masked in the message too


@pytest.mark.parametrize("url,why", [("minio:9000", r"not an http\(s\) URL"), ("ftp://minio", r"not an http"),
                                     ("http://:9000", r"has no host"), ("http://minio:port", r"invalid port"),
                                     ("http://[minio:9000", r"is not a URL \(Invalid IPv6 URL\)"),
                                     ("http://minio:9000/#x", r"has a query or fragment")])
def test_bad_s3_endpoint(tmp_path, url, why):
    body = valid_toml(tmp_path).replace('s3_endpoint = "http://minio.example.com:9000"', f's3_endpoint = "{url}"')
    check_error(tmp_path, body, r"cloud\.s3_endpoint", why)


def test_bad_s3_endpoint_from_environment(tmp_path):
    check_error(tmp_path, valid_toml(tmp_path), r"environment variable FLEETLOOP_S3_ENDPOINT", r"http\(s\)",
                env={"FLEETLOOP_S3_ENDPOINT": "minio:9000"})


@pytest.mark.parametrize("size", ['"20 gigs"', '"-5GiB"', '"0"', "0", "-1", '"1.5"', "true", "1.5", '"GiB"'])
def test_bad_spool_size(tmp_path, size):
    body = valid_toml(tmp_path).replace('max_size = "20GiB"', f"max_size = {size}")
    check_error(tmp_path, body, r"spool\.max_size", r"GiB|greater than zero|whole number")


def test_bad_spool_size_from_environment(tmp_path):
    check_error(tmp_path, valid_toml(tmp_path),
                r"environment variable FLEETLOOP_SPOOL_MAX \(overrides spool\.max_size\)", r"e\.g\. \"20GiB\"",
                env={"FLEETLOOP_SPOOL_MAX": "lots"})


def test_spool_too_small_for_its_chunks(tmp_path):
    body = valid_toml(tmp_path).replace('max_size = "20GiB"', 'max_size = "3MiB"')
    check_error(tmp_path, body, r"spool\.max_size", r"at least two chunks", r"recording\.chunk_size")
    body = valid_toml(tmp_path).replace('max_size = "20GiB"', 'max_size = "100KiB"')
    check_error(tmp_path, body, r"spool\.max_size", r"too small")


def test_bad_chunk_settings(tmp_path):
    body = valid_toml(tmp_path).replace("chunk_steps = 128", "chunk_steps = 0").replace(
        'chunk_size = "2MiB"', 'chunk_size = "1GiB"')
    err = check_error(tmp_path, body, r"recording\.chunk_steps .*positive whole number",
                      r"recording\.chunk_size .*1KiB-512MiB")
    assert len(err.errors) == 2


def test_bad_on_full_policy(tmp_path):
    body = valid_toml(tmp_path).replace('on_full = "drop-oldest"', 'on_full = "drop-all"')
    check_error(tmp_path, body, r"spool\.on_full", r"'drop-all'", r'"drop-new" or "drop-oldest"')


@pytest.mark.parametrize("addr,why", [("50051", r"not an address"), ("127.0.0.1:port", r"invalid port"),
                                      ("127.0.0.1:70000", r"invalid port"), ("::1:50051", r"in brackets"),
                                      ("[zz::1]:1", r"not an IPv6 address"), ("unix:relative.sock", r"absolute"),
                                      ("bad host:1", r"invalid host name")])
def test_bad_grpc_address(tmp_path, addr, why):
    body = valid_toml(tmp_path).replace('address = "127.0.0.1:50099"', f'address = "{addr}"')
    check_error(tmp_path, body, r"grpc\.address", why)


@pytest.mark.parametrize("value", ['"soon"', "0", '"-1s"', '"5 fortnights"', "false"])
def test_bad_poll_interval(tmp_path, value):
    body = valid_toml(tmp_path).replace('poll_interval = "500ms"', f"poll_interval = {value}")
    check_error(tmp_path, body, r"policy\.poll_interval", r"500ms|positive duration")


def test_missing_required_keys(tmp_path):
    err = check_error(tmp_path, '[spool]\ndir = "s"\n', r"robot_id is required", r"FLEETLOOP_ROBOT_ID",
                      r"cloud\.store is required", r"FLEETLOOP_STORE", r"cloud\.redis_url is required")
    assert len(err.errors) == 3


def test_half_of_the_credentials(tmp_path):
    body = valid_toml(tmp_path).replace('aws_secret_access_key = "do-not-log-me"', "")
    check_error(tmp_path, body, r"credentials\.aws_secret_access_key is missing", r"aws_access_key_id")


def test_spool_dir_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    body = valid_toml(tmp_path).replace(f'dir = "{tmp_path / "spool"}"', f'dir = "{tmp_path / "afile" / "spool"}"')
    check_error(tmp_path, body, r"spool\.dir", r"a parent is a file")


def test_spool_dir_is_a_file(tmp_path):
    (tmp_path / "spool").write_text("x")
    check_error(tmp_path, valid_toml(tmp_path), r"spool\.dir", r"not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_unwritable_spool_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        body = valid_toml(tmp_path).replace(f'dir = "{tmp_path / "spool"}"', f'dir = "{ro}"')
        check_error(tmp_path, body, r"spool\.dir", r"not writable", r"uid \d+")
    finally:
        ro.chmod(0o700)


def test_unwritable_spool_dir_on_read_only_fs(tmp_path):
    """/proc refuses new directories even to root: the same message path as a read-only mount."""
    body = valid_toml(tmp_path).replace(f'dir = "{tmp_path / "spool"}"', 'dir = "/proc/fleetloop-spool"')
    check_error(tmp_path, body, r"spool\.dir", r"cannot create '/proc/fleetloop-spool'")


def test_not_toml(tmp_path):
    check_error(tmp_path, 'robot_id = "a"\n[cloud\nstore = 1\n', r"not valid TOML", r"line 2")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_actor_config(tmp_path / "nope.toml", env={})


def test_every_problem_reported_at_once(tmp_path):
    body = valid_toml(tmp_path).replace('robot_id = "arm-07"', 'robot_id = "bad id"').replace(
        'on_full = "drop-oldest"', 'on_full = "nope"').replace('max_size = "20GiB"', 'max_size = "big"')
    err = check_error(tmp_path, body, r"robot_id", r"spool\.on_full", r"spool\.max_size")
    assert len(err.errors) == 3


def test_world_readable_secret_warns(tmp_path, caplog):
    p = write(tmp_path, valid_toml(tmp_path))
    p.chmod(0o644)
    with caplog.at_level("WARNING", logger="fleetloop.actor.config"):
        load_actor_config(p, env={})
    assert "readable by every user" in caplog.text


def test_robot_id_rule_matches_the_codec():
    from fleetloop.actor.config_types import ROBOT_ID_RE
    from fleetloop.buffer.codec import _SAFE_ID
    assert ROBOT_ID_RE.pattern == _SAFE_ID.pattern
