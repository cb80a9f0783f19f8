"""docker-compose.yml, run as processes: the fleetloop services compose names (ray-head running
`ray start --head ... && exec fleetloop learner ...`, and the dashboard) are started here with
the compose file's own commands and environment, interpolated from a test .env built from
.env.example, against loopback stand-ins for the infrastructure services:

  secrets     the documented one-time step, `fleetloop credentials issue --robots ... --out
              deploy/secrets --prefix ... --no-keys`, run here into a temp dir
  redis       redis-server run with the compose command's own arguments (`--aclfile` on the issued
              ACL file, as the bind mount maps it), and the compose healthcheck run against it
  minio       moto's S3 server (same protocol; it does not enforce IAM policies -- the MinIO side of
              the wiring is deploy/minio/init.sh, tested in test_deploy.py); the bucket is created
              the way minio-init does
  minio-init  boto3 create_bucket (the services run with FLEETLOOP_S3_CREATE_BUCKET=0)

Each fleetloop service gets its compose `env_file` (deploy/secrets/env/<identity>.env) under its
`environment`, as compose does: the learner connects to Redis as the `learner` ACL user, the
dashboard as `dashboard`, and the robot as its own `robot-<id>` user -- so every Redis command
the learner, dashboard and actor daemon issue in this test passes the least-privilege ACLs.

Only two kinds of rewriting happen, both outside the command text: the compose network's host
names are resolved to loopback ports (minio:9000, redis:6379, ray-head:$RAY_HEAD_PORT), and the mount point
of the service's volume (/var/lib/fleetloop) is mapped to a temp dir, as a volume would be. A
robot's actor daemon then runs as the systemd unit runs it (`fleetloop actor --config FILE`,
with deploy/robot/actor.example.toml as the file and the documented environment variables
overriding it), and one episode is driven through its gRPC robot link; the test asserts that it
reaches the store, the learner's online buffer and the dashboard.

Every process gets a marker variable; teardown ends each process carrying it, by pid (Ray's
daemons included), and never runs `ray stop` (which would stop every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from envfile import env_example
import redis
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
ACTOR_TOML = REPO / "deploy" / "robot" / "actor.example.toml"
BIN = Path(sys.executable).parent

VOLUME_MOUNT = "/var/lib/fleetloop"   # where learner-home / dashboard-home are mounted
KEYS_MOUNT = "/etc/fleetloop/keys"      # the signing-keys volume (keys-init, learner, dashboard)
MARK = "FLEETLOOP_COMPOSE_TEST_ID"

pytestmark = pytest.mark.timeout(240)


# -- compose interpolation ---------------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
    ${VAR?err}, applied to every scalar of the (YAML-parsed) file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        have = env.get(name)
        unset = have is None or (op is not None and op.startswith(":") and have == "")
        if op in (":-", "-"):
            return arg if unset else have
        if op in (":?", "?"):
            if unset:
                raise AssertionError(f"compose would refuse to start: {name}: {arg}")
            return have
        return have or ""
    return _VAR.sub(sub, value)


def compose_services(dotenv: dict[str, str]) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text())["services"], dotenv)


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


SECRETS_DIR = "deploy/secrets"   # where the documented `fleetloop credentials issue` writes


# -- processes ---------------------------------------------------------------------------------

def free_port() -> int:
    from fleetloop.services import free_port as fp
    return fp()


def marked_pids(mark: str) -> list[int]:
    """Every process of ours whose environment carries MARK=mark (the services, the shell, Ray's
    daemons and workers, which all inherit it)."""
    needle = f"{MARK}={mark}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                out.append(int(d.name))
        except OSError:
            continue
    return out


class Procs:
    def __init__(self, mark: str, logdir: Path):
        self.mark, self.logdir = mark, logdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        p = subprocess.Popen(argv, env={**env, MARK: self.mark}, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[name] = p
        return p

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"----- {n} (exit {p.poll()}) -----\n{self.log(n)}" for n, p in self.procs.items())

    def check_alive(self, *names: str) -> None:
        for n in names or self.procs:
            if self.procs[n].poll() is not None:
                pytest.fail(f"{n} exited with code {self.procs[n].returncode}\n{self.logs()}")

    def stop(self) -> None:
        # Graceful first (SIGTERM to each process group: compose's `docker stop`), then SIGKILL
        # to every process still carrying the marker -- Ray's daemons included, by pid.
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _ in range(3):
            left = marked_pids(self.mark)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


def wait_for(what: str, fn, timeout: float, procs: Procs, alive=(), interval: float = 0.3):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        procs.check_alive(*alive)
        try:
            got = fn()
            if got:
                return got
        except Exception as e:  # noqa: BLE001 -- keep polling; report the last error on timeout
            last = e
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last error: {last!r})\n{procs.logs()}")


def http_json(url: str, token: str | None = None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


# -- the test ----------------------------------------------------------------------------------

def test_compose_services_run_an_episode_end_to_end(tmp_path):
    for tool in ("ray", "fleetloop"):
        if not (BIN / tool).exists() and not shutil.which(tool):
            pytest.skip(f"the `{tool}` command is not installed in this environment")
    import boto3

    from fleetloop.actor.link import RobotLinkClient
    from fleetloop.buffer.codec import manifest_key, read_manifest
    from fleetloop.buffer.store import open_store
    from fleetloop.config import LEARNER_STATS_KEY, S3Settings
    from fleetloop.policy.interface import Observation
    from fleetloop.policy.model import ModelConfig, VLAPolicyNet, save_checkpoint
    from fleetloop.release.registry import PolicyRegistry
    from fleetloop.proto.v1 import episode_pb2 as pb
    from fleetloop.services import MotoS3Server, redis_server_binary

    # -- the test's .env: .env.example with every "change-me" replaced, as the operator would -----
    dotenv = env_example()
    for key, value in dotenv.items():
        if "change-me" in value:
            name, sep, _ = value.partition(":")
            fresh = secrets.token_hex(16)  # URL-safe: REDIS_PASSWORD goes into a URL
            dotenv[key] = f"{name}:{fresh}" if sep and key.endswith("_TOKENS") else fresh
    dotenv["FLEETLOOP_VIEWER_TOKENS"] = f"wallboard:{secrets.token_hex(16)}"
    # The ports the services listen on inside their containers, moved to free ones the way
    # .env offers (the processes here share the host's network).
    ray_head_port, dashboard_port, ingest_port = free_port(), free_port(), free_port()
    dotenv["RAY_HEAD_PORT"], dotenv["DASHBOARD_CONTAINER_PORT"] = str(ray_head_port), str(dashboard_port)
    dotenv["INGEST_CONTAINER_PORT"] = str(ingest_port)
    operator_token = dotenv["FLEETLOOP_OPERATOR_TOKENS"].split(",")[0].partition(":")[2]
    viewer_token = dotenv["FLEETLOOP_VIEWER_TOKENS"].partition(":")[2]
    services = compose_services(dotenv)

    # A short private dir: Ray's unix sockets live under RAY_TMPDIR (path length limit ~107).
    scratch = Path(tempfile.mkdtemp(prefix="flc-", dir="/tmp"))
    mark = uuid.uuid4().hex
    procs = Procs(mark, tmp_path)
    s3 = MotoS3Server()
    robot_id = "arm-compose-1"
    try:
        # -- the one-time step: every identity's credentials, as docs/deploy.md says -------------
        secrets_dir = scratch / "secrets"
        done = subprocess.run(["fleetloop", "credentials", "issue", "--robots", f"{robot_id},arm-compose-2",
                               "--out", str(secrets_dir), "--bucket", dotenv["S3_BUCKET"],
                               "--prefix", dotenv["S3_PREFIX"], "--no-keys"],
                              env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        passwords = json.loads((secrets_dir / "passwords.json").read_text())

        def host_path(compose_path: str) -> Path:
            """A bind mount's or env_file's path in the compose file -> the issued temp dir."""
            rel = compose_path.removeprefix("./")
            assert rel.startswith(SECRETS_DIR + "/"), compose_path
            return secrets_dir / rel[len(SECRETS_DIR) + 1:]

        # -- infrastructure: redis (its compose command, on the issued ACL file), minio (moto) -----
        redis_svc = services["redis"]
        redis_cmd = redis_svc["command"]
        assert redis_cmd[0] == "redis-server" and "--requirepass" not in redis_cmd
        acl_in_container = redis_cmd[redis_cmd.index("--aclfile") + 1]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in redis_svc["volumes"] if v.startswith("./")}
        acl_file = host_path(mounts[acl_in_container])
        redis_port = free_port()
        (scratch / "redis").mkdir()
        argv = [redis_server_binary()] + [a if a != acl_in_container else str(acl_file) for a in redis_cmd[1:]]
        procs.start("redis", argv + ["--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(scratch / "redis"),
                                     "--save", ""], dict(os.environ), cwd=scratch / "redis")
        health = redis_svc["healthcheck"]["test"]
        assert health[0] == "CMD-SHELL"
        redis_health = health[1].replace("redis-cli ", f"redis-cli -p {redis_port} ", 1)
        wait_for("the redis compose healthcheck", lambda: subprocess.run(["sh", "-c", redis_health],
                                                                          timeout=10).returncode == 0,
                 30, procs, alive=("redis",))
        with pytest.raises(redis.AuthenticationError):  # no client can be the default user
            redis.Redis(port=redis_port).get("x")
        rds = redis.Redis(port=redis_port, username="fleetloop-admin", password=passwords["fleetloop-admin"])
        rds.ping()
        s3.start()
        init_env = services["minio-init"]["environment"]
        bucket = init_env["S3_BUCKET"]
        admin_env = read_env_file(host_path(services["admin"]["env_file"]))
        boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                     aws_access_key_id=admin_env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=admin_env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)

        homes = {name: scratch / name for name in ("ray-head", "dashboard")}

        def localize(value: str, home: Path) -> str:
            """The compose network's names -> loopback; the volume mount point -> this service's dir."""
            return (value.replace("http://minio:9000", s3.endpoint)
                    .replace("http://ingest:8090", f"http://127.0.0.1:{ingest_port}")
                    .replace("@redis:6379/", f"@127.0.0.1:{redis_port}/")
                    .replace(f"ray-head:{ray_head_port}", f"127.0.0.1:{ray_head_port}")
                    .replace(KEYS_MOUNT, str(scratch / "keys"))
                    .replace(VOLUME_MOUNT, str(home)))

        base_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("FLEETLOOP_", "AWS_", "RAY_", "REDIS", "OMP_"))}
        base_env["PATH"] = f"{BIN}{os.pathsep}{base_env.get('PATH', '/usr/bin:/bin')}"
        base_env["PYTHONUNBUFFERED"] = "1"

        identities = {"ray-head": "learner", "dashboard": "dashboard"}

        def service_env(name: str) -> dict[str, str]:
            # compose: the env_file first, `environment` over it
            from_file = read_env_file(host_path(services[name]["env_file"]))
            svc_env = {**from_file, **services[name]["environment"]}
            env = {k: localize(str(v), homes[name]) for k, v in svc_env.items()}
            # what compose resolved must have been the compose network's names, nothing else
            who = identities[name]
            assert svc_env["FLEETLOOP_S3_ENDPOINT"] == "http://minio:9000"
            assert svc_env["FLEETLOOP_REDIS_URL"] == f"redis://{who}:{passwords[who]}@redis:6379/0"
            assert svc_env["AWS_ACCESS_KEY_ID"] == who and svc_env["AWS_SECRET_ACCESS_KEY"] == passwords[who]
            assert svc_env["FLEETLOOP_STORE"] == from_file["FLEETLOOP_STORE"]  # issued for this bucket/prefix
            assert svc_env["RAY_ADDRESS"] == f"ray-head:{ray_head_port}"
            assert svc_env["RAY_HEAD_PORT"] == str(ray_head_port)
            assert env["FLEETLOOP_HOME"] == str(homes[name])
            return {**base_env, **env}

        # -- keys-init: the fleet's signing key, once, in the volume the learner and dashboard share
        keys = services["keys-init"]
        assert keys["command"][:2] == ["sh", "-c"]
        keys_cmd = ["sh", "-c", localize(keys["command"][2], scratch)]
        for _ in range(2):  # the second run must keep the key it made the first time
            done = subprocess.run(keys_cmd, env=base_env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
        public = sorted((scratch / "keys").glob("*.pub"))
        assert (scratch / "keys" / "signing.key").is_file() and len(public) == 1

        # -- ray-head: `ray start --head ... && exec fleetloop learner $FLEETLOOP_LEARNER_ARGS` ---
        head = services["ray-head"]
        assert head["command"][:2] == ["sh", "-c"] and "entrypoint" not in head
        head_env = service_env("ray-head")
        head_env["RAY_TMPDIR"] = str(scratch / "ray")   # Ray's own variable: keep its sessions here
        (scratch / "ray").mkdir()
        init_dir = Path(head_env["FLEETLOOP_LEARNER_ARGS"].split("--init", 1)[1].split()[0])
        assert init_dir == homes["ray-head"] / "init", head_env["FLEETLOOP_LEARNER_ARGS"]
        # docs/deploy.md's "first policy": a pretrained checkpoint in the learner's volume
        save_checkpoint(VLAPolicyNet(ModelConfig.preset("tiny", use_images=False, state_dim=39, action_dim=4)),
                        init_dir)
        for h in homes.values():
            h.mkdir(exist_ok=True)
        procs.start("ray-head", head["command"], head_env, cwd=homes["ray-head"])

        # -- dashboard -------------------------------------------------------------------------
        dash = services["dashboard"]
        dash_env = service_env("dashboard")
        assert dash_env["FLEETLOOP_OPERATOR_TOKENS"] == dotenv["FLEETLOOP_OPERATOR_TOKENS"]
        procs.start("dashboard", dash["command"], dash_env, cwd=homes["dashboard"])
        dash_url = f"http://127.0.0.1:{dashboard_port}"
        # the compose healthcheck, verbatim (python -c "... urlopen('http://127.0.0.1:8080/api/health') ...")
        health = dash["healthcheck"]["test"]
        assert health[0] == "CMD"

        def dashboard_healthy():
            return subprocess.run(health[1:], env=dash_env, capture_output=True, timeout=10).returncode == 0
        wait_for("the dashboard's compose healthcheck", dashboard_healthy, 60, procs, alive=("dashboard",), interval=1)
        assert http_json(f"{dash_url}/api/whoami", viewer_token)["name"] == "wallboard"

        # -- ingest: the robot write gate (robots' Redis users may not write), its own identity ------
        ing = services["ingest"]
        ing_file = read_env_file(host_path(ing["env_file"]))
        assert ing_file["FLEETLOOP_REDIS_URL"] == f"redis://ingest:{passwords['ingest']}@redis:6379/0"
        (scratch / "ingest").mkdir()
        ing_env = {**base_env, **{k: localize(str(v), scratch / "ingest")
                                  for k, v in {**ing_file, **ing["environment"]}.items()}}
        procs.start("ingest", ing["command"], ing_env, cwd=scratch / "ingest")
        ing_health = ing["healthcheck"]["test"]
        assert ing_health[0] == "CMD"
        wait_for("the ingest gate's compose healthcheck",
                 lambda: subprocess.run(ing_health[1:], env=ing_env, capture_output=True, timeout=10).returncode == 0,
                 60, procs, alive=("ingest",), interval=1)

        # -- the learner publishes its initial version --------------------------------------------
        store_uri = head_env["FLEETLOOP_STORE"]
        assert store_uri == f"s3://{dotenv['S3_BUCKET']}/{dotenv['S3_PREFIX']}"
        settings = S3Settings(endpoint_url=s3.endpoint, access_key=admin_env["AWS_ACCESS_KEY_ID"],
                              secret_key=admin_env["AWS_SECRET_ACCESS_KEY"], create_bucket=False)
        store = open_store(store_uri, settings)
        registry = PolicyRegistry(store, rds)
        version = wait_for("the learner's initial policy version", registry.latest_version, 120, procs,
                           alive=("ray-head", "dashboard"), interval=1)

        # -- a robot: `fleetloop actor --config FILE`, environment overriding the example file ----
        # Its actor.env is the issued robot-<id>.env (docs/deploy.md): its own Redis ACL user.
        robot_file = read_env_file(secrets_dir / "env" / f"robot-{robot_id}.env")
        assert robot_file["FLEETLOOP_ROBOT_ID"] == robot_id and robot_file["FLEETLOOP_STORE"] == store_uri
        assert robot_file["FLEETLOOP_REDIS_URL"].startswith(f"redis://robot-{robot_id}:")
        assert robot_file["FLEETLOOP_INGEST_URL"] == "http://ingest:8090"  # its writes go through the gate
        grpc_port = free_port()
        actor_env = {**base_env,
                     "HF_HUB_OFFLINE": "1", "FLEETLOOP_HOME": str(scratch / "robot"),  # the systemd unit's
                     **{k: localize(v, scratch / "robot") for k, v in robot_file.items()},
                     "AWS_DEFAULT_REGION": dotenv["AWS_DEFAULT_REGION"],
                     "FLEETLOOP_SPOOL_DIR": str(scratch / "robot" / "spool"),
                     "FLEETLOOP_SPOOL_MAX": "64MiB",
                     "FLEETLOOP_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
                     # the operator handed the robot the fleet key's public half (docs/deploy.md)
                     "FLEETLOOP_TRUSTED_KEYS": str(scratch / "robot" / "trusted"),
                     "FLEETLOOP_POLICY_POLL_INTERVAL": "500ms"}
        (scratch / "robot" / "trusted").mkdir(parents=True)
        shutil.copy(public[0], scratch / "robot" / "trusted")  # only the public half leaves the cloud
        procs.start("actor", ["fleetloop", "actor", "--config", str(ACTOR_TOML)], actor_env, cwd=scratch / "robot")

        def listening():
            with socket.create_connection(("127.0.0.1", grpc_port), timeout=1):
                return True
        wait_for(f"the actor's robot link on port {grpc_port}", listening, 60, procs, alive=("actor",))
        link = RobotLinkClient(f"127.0.0.1:{grpc_port}", robot_id, timeout_s=10)
        assert link.status().robot_id == robot_id

        def policy_fetched():  # fetched and waiting for an episode boundary, or already in use
            st = link.status()
            return version in (st.policy_version, st.pending_version)
        wait_for("the actor to fetch the learner's policy", policy_fetched, 30, procs, alive=("actor",))

        # -- one episode over gRPC ----------------------------------------------------------------
        task = "reach-v3"
        rng = np.random.default_rng(0)
        eid = link.start_episode(task, "reach the goal")
        assert link.policy_version == version
        steps = 12
        for t in range(steps):
            if t == 4:
                link.begin_intervention("alice", "drift")
            if t == 8:
                link.end_intervention()
            obs = Observation(images={}, state=rng.standard_normal(39).astype(np.float32))
            chunk = link.act(obs)
            assert chunk.shape[1] == 4 and np.isfinite(chunk).all()
            action = [0.5, 0.0, 0.0, 0.0] if 4 <= t < 8 else chunk[0]
            link.report_step(obs, action, intervention=4 <= t < 8, policy_chunk=chunk)
        end = link.end_episode(pb.OUTCOME_SUCCESS)
        link.close()
        assert end.num_steps == steps and end.spooled

        # the store: the manifest the uploader wrote
        key = manifest_key(robot_id, eid)
        wait_for("the episode's manifest in the store", lambda: store.exists(key), 30, procs, alive=("actor",))
        m = read_manifest(store, key)
        assert m.num_steps == steps and m.policy_version == version
        assert [(s.start_step, s.end_step, s.operator) for s in m.interventions] == [(4, 8, "alice")]

        # the learner: its online buffer holds the episode (stats hash in Redis)
        def learner_has_it():
            raw = rds.hget(LEARNER_STATS_KEY, "buffer")
            buf = json.loads(raw) if raw else {}
            return buf.get("tasks", {}).get(task, {}).get("online", {}).get("episodes", 0) >= 1
        wait_for("the learner's online buffer to hold the episode", learner_has_it, 60, procs,
                 alive=("ray-head",), interval=1)

        # the dashboard: the robot and the episode
        def dashboard_lists_robot():
            body = http_json(f"{dash_url}/api/robots", viewer_token)
            robots = body if isinstance(body, list) else body.get("robots", [])
            return any((r.get("robot_id") or r.get("id")) == robot_id for r in robots)
        wait_for("the dashboard's /api/robots to show the robot", dashboard_lists_robot, 30, procs,
                 alive=("dashboard",))

        def dashboard_lists_episode():
            body = http_json(f"{dash_url}/api/episodes", operator_token)
            episodes = body if isinstance(body, list) else body.get("episodes", [])
            return any(e.get("episode_id") == eid for e in episodes)
        wait_for("the dashboard's /api/episodes to list the episode", dashboard_lists_episode, 30, procs,
                 alive=("dashboard",))
        with pytest.raises(urllib.error.HTTPError) as denied:
            http_json(f"{dash_url}/api/robots", "not-a-token-at-all")
        assert denied.value.code == 401
        procs.check_alive()
    finally:
        procs.stop()
        leftover = marked_pids(mark)
        s3.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    assert not leftover, f"processes outlived teardown: {leftover}"
