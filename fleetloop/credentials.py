"""`fleetloop credentials`: one identity per robot, and least privilege for everyone.

    fleetloop credentials issue --robots robot-1,robot-2 --out deploy/secrets [--redis-host redis:6379]
    fleetloop credentials keys --out DIR          an Ed25519 policy-signing key pair only

`issue` writes (secrets 0600; re-running keeps existing passwords, adds new robots):

  redis/users.acl            Redis >= 7 ACL file (redis-server --aclfile): `default` off, one user
                             per robot, `learner`, `dashboard`, `fleetloop-admin`
  minio/policy-<who>.json    S3 IAM policy documents (MinIO `mc admin policy create`)
  minio/setup.sh             creates the MinIO users and attaches the policies
  env/<who>.env              FLEETLOOP_REDIS_URL / AWS_* for each identity
  keys/signing.key, keys/trusted/<id>.pub   the learner's signing key and what robots trust
  passwords.json             the generated secrets (so a re-run is stable)

What each identity may do:

  robot-<id>  Redis: XADD the episode stream and the control-ack stream; HSET/EXPIRE its own
              heartbeat key; SADD the robot set; read the policy pointer, pins and canary;
              SUBSCRIBE the policy channel and its own control channel. Nothing else: it cannot
              PUBLISH, move a pointer, read a stream, or listen to another robot's commands.
              S3: write only episodes/<id>/, read only policies/.
  learner     Redis: fleetloop:* keys, PUBLISH policy notices; no admin commands.
              S3: read episodes/, labels/; write policies/, learner/.
  dashboard   Redis: fleetloop:* keys, PUBLISH policy notices and control commands.
              S3: read everything; write labels/ (and policies/ retention is the learner's).
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

RESERVED_ROBOT_IDS = {"all", "acks"}  # names the Redis key scheme uses next to robot ids
SERVICE_USERS = ("learner", "dashboard", "fleetloop-admin")


def check_robot_id(robot_id: str) -> str:
    from fleetloop.buffer.codec import check_id
    return check_id("robot id", robot_id)


def redis_user(robot_id: str) -> str:
    return f"robot-{robot_id}"


def _pw_hash(password: str) -> str:
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def robot_acl(robot_id: str, password: str) -> str:
    """One ACL line (Redis >= 7: selectors give each command its own keys)."""
    r = check_robot_id(robot_id)
    hb = config.HEARTBEAT_PREFIX + r
    ns = config.POLICY_POINTER.rsplit(":", 1)[0]
    reads = " ".join(f"%R~{k}" for k in (config.POLICY_POINTER, f"{ns}:robot_pins", f"{ns}:canary"))
    return " ".join([
        f"user {redis_user(r)} on {_pw_hash(password)} resetkeys resetchannels nocommands",
        "+ping +echo +hello +client|setname +client|id +multi +exec +discard",
        f"&{config.POLICY_CHANNEL} &{config.CONTROL_CHANNEL_PREFIX}{r} +subscribe +unsubscribe",
        f"(~{config.EPISODE_STREAM} +xadd)",
        f"(~{config.CONTROL_CHANNEL_PREFIX}acks +xadd)",
        f"(~{hb} +hset +expire +pexpire)",
        f"(~{config.HEARTBEAT_PREFIX}all +sadd)",
        f"({reads} +hget +hmget +hgetall)",
    ])


def service_acl(name: str, password: str) -> str:
    keys = "~fleetloop:*"
    if name == "fleetloop-admin":
        return f"user {name} on {_pw_hash(password)} ~* &* +@all"
    channels = {"learner": f"&{config.POLICY_CHANNEL}",
                "dashboard": f"&{config.POLICY_CHANNEL} &{config.CONTROL_CHANNEL_PREFIX}*"}[name]
    return f"user {name} on {_pw_hash(password)} resetkeys resetchannels {keys} {channels} +@all -@admin -@dangerous " \
           f"+info +client|setname +client|id"


def acl_file(passwords: dict[str, str], robots: Iterable[str]) -> str:
    lines = ["user default off resetkeys resetchannels nocommands"]  # ACL files take no comments
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
    elif who == "dashboard":
        st = [_statement(["s3:GetObject"], [f"{root}/{p}*"], "ReadAll"),
              _statement(["s3:PutObject"], [f"{root}/{p}labels/*"], "WriteLabels"),
              _statement(["s3:ListBucket", "s3:GetBucketLocation"], [root], "List")]
    else:
        raise ValueError(f"unknown identity {who!r}")
    return {"Version": "2012-10-17", "Statement": st}


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)


def issue(out: str | os.PathLike, robots: Iterable[str], redis_host: str = "redis:6379", bucket: str = "fleetloop",
          s3_endpoint: str = "http://minio:9000", prefix: str = "") -> dict:
    """Write everything described in the module docstring; returns {identity: password}."""
    out = Path(out)
    robots = sorted({check_robot_id(r) for r in robots})
    pw_path = out / "passwords.json"
    passwords = json.loads(pw_path.read_text()) if pw_path.exists() else {}
    for name in list(SERVICE_USERS) + [redis_user(r) for r in robots]:
        passwords.setdefault(name, secrets.token_urlsafe(32))
    _write_secret(pw_path, json.dumps(passwords, indent=1, sort_keys=True))
    _write_secret(out / "redis" / "users.acl", acl_file(passwords, robots))
    (out / "minio").mkdir(parents=True, exist_ok=True)
    setup = ["#!/bin/sh", "# MinIO users and policies (fleetloop credentials issue). Needs `mc alias set fleet ...`.",
             "set -eu", 'ALIAS="${MC_ALIAS:-fleet}"']
    for who in ["learner", "dashboard"] + [redis_user(r) for r in robots]:
        doc = out / "minio" / f"policy-{who}.json"
        doc.write_text(json.dumps(s3_policy(who, bucket, prefix), indent=1))
        setup += [f'mc admin user add "$ALIAS" {who} "$(jq -r \'.["{who}"]\' passwords.json)"',
                  f'mc admin policy create "$ALIAS" fleetloop-{who} minio/{doc.name}',
                  f'mc admin policy attach "$ALIAS" fleetloop-{who} --user {who}']
    _write_secret(out / "minio" / "setup.sh", "\n".join(setup) + "\n")
    os.chmod(out / "minio" / "setup.sh", 0o700)
    for who in ["learner", "dashboard"] + [redis_user(r) for r in robots]:
        env = {"FLEETLOOP_REDIS_URL": f"redis://{who}:{passwords[who]}@{redis_host}/0",
               "FLEETLOOP_STORE": f"s3://{bucket}/{prefix}".rstrip("/"), "FLEETLOOP_S3_ENDPOINT": s3_endpoint,
               "AWS_ACCESS_KEY_ID": who, "AWS_SECRET_ACCESS_KEY": passwords[who], "FLEETLOOP_S3_CREATE_BUCKET": "0"}
        if who.startswith("robot-"):
            env["FLEETLOOP_TRUSTED_KEYS"] = "/etc/fleetloop/trusted"
        else:
            env["FLEETLOOP_SIGNING_KEY"] = "/etc/fleetloop/keys/signing.key"
        _write_secret(out / "env" / f"{who}.env", "".join(f"{k}={v}\n" for k, v in env.items()))
    keys = out / "keys"
    if not (keys / "signing.key").exists():
        from fleetloop.policy import signing
        _priv, pub, _kid = signing.generate_keypair(keys)
        (keys / "trusted").mkdir(parents=True, exist_ok=True)
        (keys / "trusted" / pub.name).write_bytes(pub.read_bytes())
    return passwords


# ---- CLI ------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    i = sub.add_parser("issue", help="Redis ACL users, S3/MinIO policies, env files and the signing key")
    i.add_argument("--robots", required=True, help="comma-separated robot ids")
    i.add_argument("--out", required=True, help="directory for the generated files (keep it secret)")
    i.add_argument("--redis-host", default="redis:6379", help="host:port robots and services reach Redis at")
    i.add_argument("--bucket", default="fleetloop")
    i.add_argument("--prefix", default="", help="store prefix inside the bucket")
    i.add_argument("--s3-endpoint", default="http://minio:9000")
    k = sub.add_parser("keys", help="an Ed25519 policy-signing key pair (private key 0600 + <key id>.pub)")
    k.add_argument("--out", required=True)
    k.add_argument("--name", default="signing")


def run(args) -> int:
    if args.what == "keys":
        from fleetloop.policy import signing
        priv, pub, kid = signing.generate_keypair(args.out, args.name)
        print(f"key id {kid}\n  private (learner/dashboard: FLEETLOOP_SIGNING_KEY): {priv}\n"
              f"  public (robots: FLEETLOOP_TRUSTED_KEYS): {pub}")
        return 0
    robots = [r.strip() for r in args.robots.split(",") if r.strip()]
    try:
        issue(args.out, robots, args.redis_host, args.bucket, args.s3_endpoint, args.prefix)
    except ValueError as e:
        print(f"fleetloop credentials: {e}")
        return 2
    print(f"fleetloop credentials: wrote {args.out}: redis/users.acl, minio/, env/ ({len(robots)} robots), keys/")
    return 0
