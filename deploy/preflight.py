"""Check a compose deployment's settings before `docker compose up`, so that a mistake ends in one
line saying what to fix instead of a container that restarts forever.

    python3 deploy/preflight.py                  # in the directory with docker-compose.yml and .env
    python3 deploy/preflight.py --local          # also the images deploy/compose.local.yml uses

Checks: .env exists and sets every required value with no "change-me" left; MinIO's root password
is long enough for MinIO to start; operator and viewer tokens are name:token pairs the dashboard
accepts; the files `fleetloop credentials issue` writes are all there and were issued for
.env's bucket and prefix; every published port is free on this host. Standard library only (runs
before anything is installed). Exit status 0: all good; 1: the lines printed say what to fix.
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

REQUIRED = ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "FLEETLOOP_OPERATOR_TOKENS")
# (host variable, port variable, default host, default port) of every port compose publishes
PUBLISHED = (("REDIS_BIND", "REDIS_PORT", "0.0.0.0", "6379"), ("MINIO_BIND", "MINIO_PORT", "0.0.0.0", "9000"),
             (None, "MINIO_CONSOLE_PORT", "127.0.0.1", "9001"), ("DASHBOARD_BIND", "DASHBOARD_PORT", "0.0.0.0", "8080"),
             (None, "RAY_DASHBOARD_PORT", "127.0.0.1", "8265"), ("INGEST_BIND", "INGEST_PORT", "0.0.0.0", "8090"))
SECRET_FILES = ("redis/users.acl", "minio/users", "env/learner.env", "env/dashboard.env", "env/ingest.env",
                "env/fleetloop-admin.env")
MIN_TOKEN = 12          # fleetloop/dashboard/auth.py refuses shorter tokens
MIN_MINIO_PASSWORD = 8  # MinIO exits at start with a shorter root password


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip('"').strip("'")
    return out


def port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return False
        except OSError:
            return True


def check(project: Path, local: bool) -> list[str]:
    problems: list[str] = []
    env_path = project / ".env"
    if not env_path.is_file():
        return [f"{env_path} is missing: cp .env.example .env and change every change-me (docs/deploy.md)"]
    env = read_env(env_path)
    for key in REQUIRED:
        if not env.get(key):
            problems.append(f"{key} is not set in {env_path} (see .env.example)")
    for key, value in env.items():
        if "change-me" in value:
            problems.append(f"{key} in {env_path} still holds the example's change-me value: set your own")
    if env.get("MINIO_ROOT_PASSWORD") and len(env["MINIO_ROOT_PASSWORD"]) < MIN_MINIO_PASSWORD:
        problems.append(f"MINIO_ROOT_PASSWORD in {env_path} is shorter than {MIN_MINIO_PASSWORD} characters: MinIO "
                        "would exit at start; set a longer one")
    for key in ("FLEETLOOP_OPERATOR_TOKENS", "FLEETLOOP_VIEWER_TOKENS"):
        for pair in filter(None, (p.strip() for p in env.get(key, "").split(","))):
            name, sep, token = pair.partition(":")
            if not sep or not name or len(token) < MIN_TOKEN:
                problems.append(f"{key} in {env_path}: '{name or pair[:8]}...' is not name:token with a token of at "
                                f"least {MIN_TOKEN} characters (the dashboard would refuse to start)")
    secrets = project / "deploy" / "secrets"
    missing = [f for f in SECRET_FILES if not (secrets / f).is_file()]
    if missing:
        problems.append(f"{secrets}/ lacks {', '.join(missing)}: run `fleetloop credentials issue --robots ... "
                        f"--out deploy/secrets --prefix {env.get('S3_PREFIX', 'fleet')} --no-keys` (docs/deploy.md)")
    elif (secrets / "env" / "learner.env").is_file():
        issued = read_env(secrets / "env" / "learner.env").get("FLEETLOOP_STORE", "")
        want = f"s3://{env.get('S3_BUCKET', 'fleetloop')}/{env.get('S3_PREFIX', 'fleet')}"
        if issued != want:
            problems.append(f"deploy/secrets/ was issued for {issued or 'another store'}, but .env says {want}: "
                            "re-run `fleetloop credentials issue` with --bucket/--prefix from .env")
    for host_var, port_var, host_default, port_default in PUBLISHED:
        host = env.get(host_var, host_default) if host_var else host_default
        port = env.get(port_var, port_default)
        if not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"{port_var}={port} in {env_path} is not a port number")
        elif port_taken(host, int(port)):
            problems.append(f"port {port} ({port_var}) is taken on this host ({host}): stop what uses it or set "
                            f"{port_var} in {env_path} to a free port")
    if local:
        for image in (env.get("FLEETLOOP_IMAGE", "fleetloop:cpu"), env.get("LOCAL_REDIS_IMAGE", "fleetloop-local/redis:7.0"),
                      env.get("LOCAL_S3_IMAGE", "fleetloop-local/s3:moto")):
            if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
                problems.append(f"image {image} is not built: run deploy/images.sh")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project-directory", default=".", help="where docker-compose.yml, .env and deploy/secrets are")
    ap.add_argument("--local", action="store_true", help="check the images deploy/compose.local.yml needs too")
    args = ap.parse_args()
    problems = check(Path(args.project_directory).resolve(), args.local)
    for p in problems:
        print(f"preflight: {p}", file=sys.stderr)
    if not problems:
        print("preflight: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
