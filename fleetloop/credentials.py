"""`fleetloop credentials`: one identity per robot, and least privilege for everyone.

    fleetloop credentials issue --robots robot-1,robot-2 --out deploy/secrets [--redis-host redis:6379]
                                [--bucket B --prefix P] [--robot-redis-host H:P --robot-s3-endpoint URL]
    fleetloop credentials keys --out DIR          an Ed25519 policy-signing key pair only

`issue` writes (secrets 0600; re-running keeps existing passwords, adds new robots):

  redis/users.acl            Redis >= 7 ACL file (redis-server --aclfile): `default` unusable (a
                             random password no one is given; see acl_file), one user
                             per robot, `learner`, `dashboard`, `fleetloop-admin`, `healthcheck`
                             (PING only). Mode 0644 so the Redis container's user can read a bind
                             mount of it: it holds only SHA-256 hashes of 256-bit random passwords.
  minio/policy-<who>.json    S3 IAM policy documents (MinIO `mc admin policy create`)
  minio/users                "<who> <secret>" lines: the MinIO users to create (0600)
  minio/setup.sh             creates the MinIO users and attaches the policies (needs `mc alias
                             set fleet ...`; deploy/minio/init.sh does the same in compose)
  s3/bucket-policy-episodes-write-once.json   AWS S3 bucket policy: committed episodes are
                             write-once (docs/security.md)
  env/<who>.env              FLEETLOOP_REDIS_URL / AWS_* for each identity (compose env_file, or a
                             robot's /etc/fleetloop/actor.env; a robot's also FLEETLOOP_INGEST_URL)
  keys/signing.key, keys/trusted/<id>.pub   the learner's signing key and what robots trust
                             (--no-keys: compose's keys-init makes the fleet's key instead)
  passwords.json             the generated secrets (so a re-run is stable)

What each identity may do:

  robot-<id>  Redis: read the policy pointer, the canary and its own pin; SUBSCRIBE the policy channel and
              its own control channel. No write command at all: its episode events, heartbeat
              and control acks go through the write gate (`fleetloop ingest`, fleetloop/ingest.py),
              which checks their shape, size, rate and that they are its own, and which it
              authenticates to with this same user and password. It cannot PUBLISH, move a
              pointer, read a stream, or listen to another robot's commands.
              S3: write only episodes/<id>/, read only policies/.
  ingest      Redis: fleetloop:* keys (the gate writes robots' events, heartbeats and acks).
  learner     Redis: fleetloop:* keys, PUBLISH policy notices; no admin commands.
              S3: read episodes/, labels/; write policies/, learner/.
  dashboard   Redis: fleetloop:* keys, PUBLISH policy notices and control commands.
              S3: read everything; write labels/ (and policies/ retention is the learner's).
  fleetloop-admin  Redis: everything. S3: everything in the bucket (collect, import, export,
              repairs: the one-off tools, never a long-running service or a robot).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Iterable

from fleetloop import config

SERVICE_USERS = ("learner", "dashboard", "ingest", "fleetloop-admin")
S3_SERVICES = ("learner", "dashboard", "fleetloop-admin")
HEALTHCHECK_USER = "healthcheck"   # PING only, any password: what a container health check uses


def check_robot_id(robot_id: str) -> str:
    from fleetloop.buffer.codec import check_id
    return check_id("robot id", robot_id)


def redis_user(robot_id: str) -> str:
    return f"robot-{robot_id}"


def _pw_hash(password: str) -> str:
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def robot_acl(robot_id: str, password: str) -> str:
    """One ACL line (Redis >= 7: selectors give each command its own keys)."""
    from fleetloop.release.registry import CANARY_KEY, ROBOT_PIN_PREFIX
    r = check_robot_id(robot_id)
    reads = " ".join(f"%R~{k}" for k in (config.POLICY_POINTER, CANARY_KEY))
    own_pin = f"%R~{ROBOT_PIN_PREFIX}{r}"  # its own pin only, not the listing of all (ROBOT_PINS_KEY)
    return " ".join([
        f"user {redis_user(r)} on {_pw_hash(password)} resetkeys resetchannels nocommands",
        "+ping +echo +hello +client|setname +client|id +multi +exec +discard",
        f"&{config.POLICY_CHANNEL} &{config.CONTROL_CHANNEL_PREFIX}{r} +subscribe +unsubscribe",
        f"({reads} +hget +hmget +hgetall)",  # reads only: every write goes through fleetloop ingest
        f"({own_pin} +get)",
    ])


def service_acl(name: str, password: str) -> str:
    keys = "~fleetloop:*"
    if name == "fleetloop-admin":
        return f"user {name} on {_pw_hash(password)} ~* &* +@all"
    channels = {"learner": f"&{config.POLICY_CHANNEL}", "ingest": "resetchannels",
                "dashboard": f"&{config.POLICY_CHANNEL} &{config.CONTROL_CHANNEL_PREFIX}*"}[name]
    return f"user {name} on {_pw_hash(password)} resetkeys resetchannels {keys} {channels} +@all -@admin -@dangerous " \
           f"+info +client|setname +client|id"


def acl_file(passwords: dict[str, str], robots: Iterable[str]) -> str:
    # `default`: on, with every permission, but behind a random password that is never stored or
    # given to anyone -- so no client can be it (an unauthenticated connection may only AUTH). Not
    # `off`: Redis 7.0 checks the commands of a MULTI/EXEC replayed from the append-only file
    # against `default`, and with it off every transaction holding an XADD * or an EXPIRE (pointer
    # moves, heartbeats, announcements) is dropped on restart (tests/test_credentials.py).
    lines = [f"user default on {_pw_hash(secrets.token_urlsafe(32))} ~* &* +@all",  # ACL files take no comments
             f"user {HEALTHCHECK_USER} on nopass resetkeys resetchannels nocommands +ping"]
    lines += [service_acl(n, passwords[n]) for n in SERVICE_USERS]
    lines += [robot_acl(r, passwords[redis_user(r)]) for r in robots]
    return "\n".join(lines) + "\n"


def _statement(actions, resources, sid):
    return {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources}


def s3_policy(who: str, bucket: str, prefix: str = "") -> dict:
    """IAM policy document (AWS S3 / MinIO) for a robot (`robot-<id>`), `learner` or `dashboard`."""
    root = f"arn:aws:s3:::{bucket}"
    p = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    if who.startswith("robot-"):
        rid = check_robot_id(who[len("robot-"):])
        st = [_statement(["s3:PutObject", "s3:AbortMultipartUpload"], [f"{root}/{p}episodes/{rid}/*"], "OwnEpisodesWriteOnly"),
              _statement(["s3:GetObject"], [f"{root}/{p}policies/*"], "PoliciesReadOnly"),
              _statement(["s3:ListBucket"], [root], "ListPolicies")]
        st[-1]["Condition"] = {"StringLike": {"s3:prefix": [f"{p}policies/*"]}}
    elif who == "learner":
        st = [_statement(["s3:GetObject"], [f"{root}/{p}episodes/*", f"{root}/{p}labels/*"], "ReadData"),
              _statement(["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                         [f"{root}/{p}policies/*", f"{root}/{p}learner/*"], "WritePoliciesAndCheckpoints"),
              _statement(["s3:ListBucket", "s3:GetBucketLocation"], [root], "List")]
    elif who == "fleetloop-admin":
        st = [_statement(["s3:*"], [root, f"{root}/*"], "WholeBucket")]
    elif who == "dashboard":
        st = [_statement(["s3:GetObject"], [f"{root}/{p}*"], "ReadAll"),
              _statement(["s3:PutObject"], [f"{root}/{p}labels/*"], "WriteLabels"),
              _statement(["s3:ListBucket", "s3:GetBucketLocation"], [root], "List")]
    else:
        raise ValueError(f"unknown identity {who!r}")
    return {"Version": "2012-10-17", "Statement": st}


def episodes_write_once_policy(bucket: str, prefix: str = "") -> dict:
    """AWS S3 *bucket* policy: every PUT under episodes/ must carry If-None-Match, so a committed
    episode object can never be overwritten -- not even by the robot that wrote it. The uploader
    writes that way (ObjectStore.put_new); apply with `aws s3api put-bucket-policy` (docs/security.md)."""
    p = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "EpisodesWriteOnce", "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
        "Resource": f"arn:aws:s3:::{bucket}/{p}episodes/*",
        "Condition": {"Null": {"s3:if-none-match": "true"}}}]}


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)


def issue(out: str | os.PathLike, robots: Iterable[str], redis_host: str = "redis:6379", bucket: str = "fleetloop",
          s3_endpoint: str = "http://minio:9000", prefix: str = "", robot_redis_host: str | None = None,
          robot_s3_endpoint: str | None = None, keys: bool = True, robot_redis_scheme: str = "redis",
          ingest_url: str = "http://ingest:8090") -> dict:
    """Write everything described in the module docstring; returns {identity: password}.
    redis_host / s3_endpoint: where the cloud services reach them (compose: redis:6379,
    http://minio:9000); robot_redis_host / robot_s3_endpoint: where robots do (default: the same);
    robot_redis_scheme "rediss" for a TLS port in front of Redis; ingest_url: where robots reach
    the write gate (`fleetloop ingest`)."""
    out = Path(out)
    pw_path = out / "passwords.json"
    passwords = json.loads(pw_path.read_text()) if pw_path.exists() else {}
    issued = {n[len("robot-"):] for n in passwords if n.startswith("robot-")}  # a re-run keeps them
    robots = sorted({check_robot_id(r) for r in robots} | issued)
    for name in list(SERVICE_USERS) + [redis_user(r) for r in robots]:
        passwords.setdefault(name, secrets.token_urlsafe(32))
    _write_secret(pw_path, json.dumps(passwords, indent=1, sort_keys=True))
    _write_secret(out / "redis" / "users.acl", acl_file(passwords, robots))
    (out / "minio").mkdir(parents=True, exist_ok=True)
    identities = list(S3_SERVICES) + [redis_user(r) for r in robots]
    for who in identities:
        doc = out / "minio" / f"policy-{who}.json"
        doc.write_text(json.dumps(s3_policy(who, bucket, prefix), indent=1))
    _write_secret(out / "minio" / "users", "".join(f"{who} {passwords[who]}\n" for who in identities))
    _write_secret(out / "minio" / "setup.sh", MINIO_SETUP)
    (out / "s3").mkdir(parents=True, exist_ok=True)  # for AWS S3 (MinIO: object lock, docs/security.md)
    (out / "s3" / "bucket-policy-episodes-write-once.json").write_text(
        json.dumps(episodes_write_once_policy(bucket, prefix), indent=1))
    os.chmod(out / "minio" / "setup.sh", 0o700)
    (out / "redis" / "users.acl").chmod(0o644)  # hashes only; the Redis container's user reads it
    for who in identities:
        robot = who.startswith("robot-")
        host = (robot_redis_host or redis_host) if robot else redis_host
        scheme = robot_redis_scheme if robot else "redis"
        env = {"FLEETLOOP_REDIS_URL": f"{scheme}://{who}:{passwords[who]}@{host}/0",
               "FLEETLOOP_STORE": f"s3://{bucket}/{prefix.strip('/')}".rstrip("/"),
               "FLEETLOOP_S3_ENDPOINT": (robot_s3_endpoint or s3_endpoint) if robot else s3_endpoint,
               "AWS_ACCESS_KEY_ID": who, "AWS_SECRET_ACCESS_KEY": passwords[who], "FLEETLOOP_S3_CREATE_BUCKET": "0"}
        if robot:
            env["FLEETLOOP_ROBOT_ID"] = who[len("robot-"):]
            env["FLEETLOOP_INGEST_URL"] = ingest_url
            env["FLEETLOOP_TRUSTED_KEYS"] = "/etc/fleetloop/trusted"
        else:
            env["FLEETLOOP_SIGNING_KEY"] = "/etc/fleetloop/keys/signing.key"
        _write_secret(out / "env" / f"{who}.env", "".join(f"{k}={v}\n" for k, v in env.items()))
    # the write gate needs Redis only (it never touches the store)
    _write_secret(out / "env" / "ingest.env", f"FLEETLOOP_REDIS_URL=redis://ingest:{passwords['ingest']}@{redis_host}/0\n")
    if not keys:
        return passwords
    keys = out / "keys"
    if not (keys / "signing.key").exists():
        from fleetloop.release import signing
        _priv, pub, _kid = signing.generate_keypair(keys)
        (keys / "trusted").mkdir(parents=True, exist_ok=True)
        (keys / "trusted" / pub.name).write_bytes(pub.read_bytes())
    return passwords


# The same steps as deploy/minio/init.sh, for a MinIO outside compose. Reads the files beside it.
MINIO_SETUP = """#!/bin/sh
# MinIO users and policies (fleetloop credentials issue). Needs an mc alias with admin rights:
#   mc alias set fleet https://minio.example.com ROOT_USER ROOT_PASSWORD && sh minio/setup.sh
set -eu
ALIAS="${MC_ALIAS:-fleet}"
DIR="$(cd "$(dirname "$0")" && pwd)"
while read -r who secret; do
  [ -n "$who" ] || continue
  mc admin user add "$ALIAS" "$who" "$secret" >/dev/null
  mc admin policy create "$ALIAS" "fleetloop-$who" "$DIR/policy-$who.json" >/dev/null
  if ! out="$(mc admin policy attach "$ALIAS" "fleetloop-$who" --user "$who" 2>&1)"; then
    case "$out" in *already*) ;; *) echo "$out" >&2; exit 1 ;; esac
  fi
  echo "MinIO user $who: policy fleetloop-$who"
done < "$DIR/users"
"""


# ---- CLI ------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    i = sub.add_parser("issue", help="Redis ACL users, S3/MinIO policies, env files and the signing key")
    i.add_argument("--robots", required=True, help="comma-separated robot ids")
    i.add_argument("--out", required=True, help="directory for the generated files (keep it secret)")
    i.add_argument("--redis-host", default="redis:6379", help="host:port robots and services reach Redis at")
    i.add_argument("--bucket", default="fleetloop")
    i.add_argument("--prefix", default="", help="store prefix inside the bucket")
    i.add_argument("--s3-endpoint", default="http://minio:9000", help="where the cloud services reach S3")
    i.add_argument("--robot-redis-host", help="host:port robots reach Redis at (default: --redis-host)")
    i.add_argument("--robot-redis-tls", action="store_true", help="robots use rediss:// (a TLS port in front of Redis)")
    i.add_argument("--robot-s3-endpoint", help="S3 endpoint robots use (default: --s3-endpoint)")
    i.add_argument("--ingest-url", default="http://ingest:8090",
                   help="where robots reach the write gate, `fleetloop ingest` (their only way to write)")
    i.add_argument("--no-keys", action="store_true",
                   help="no signing key (compose's keys-init makes the fleet's key; hand robots its .pub)")
    k = sub.add_parser("keys", help="an Ed25519 policy-signing key pair (private key 0600 + <key id>.pub)")
    k.add_argument("--out", required=True)
    k.add_argument("--name", default="signing")


def run(args) -> int:
    if args.what == "keys":
        from fleetloop.release import signing
        priv, pub, kid = signing.generate_keypair(args.out, args.name)
        print(f"key id {kid}\n  private (learner/dashboard: FLEETLOOP_SIGNING_KEY): {priv}\n"
              f"  public (robots: FLEETLOOP_TRUSTED_KEYS): {pub}")
        return 0
    robots = [r.strip() for r in args.robots.split(",") if r.strip()]
    try:
        issue(args.out, robots, args.redis_host, args.bucket, args.s3_endpoint, args.prefix,
              robot_redis_host=args.robot_redis_host, robot_s3_endpoint=args.robot_s3_endpoint,
              keys=not args.no_keys, robot_redis_scheme="rediss" if args.robot_redis_tls else "redis",
              ingest_url=args.ingest_url)
    except ValueError as e:
        print(f"fleetloop credentials: {e}")
        return 2
    print(f"fleetloop credentials: wrote {args.out}: redis/users.acl, minio/, env/ ({len(robots)} robots)"
          + ("" if args.no_keys else ", keys/"))
    return 0
