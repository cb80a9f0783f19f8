"""The cloud side in containers, end to end: what `docker compose up` promises a user, checked.

    bash deploy/e2e.sh --json          (the wrapper installs what it needs, then runs this)

Phases, each timed (`phases_s` in the JSON):
  engine       a Docker engine: the one DOCKER_HOST (or the default socket) names, else a dockerd
               started here as root with its own data root and socket, stopped at the end (the data
               root is kept, so built images are cached between runs on this machine)
  images       deploy/images.sh: the Debian base, Redis, the S3 stand-in and fleetloop:cpu
  setup        a project directory with the repository's compose files, a .env made from
               .env.example (fresh secrets, free ports), `fleetloop credentials issue` for the
               robots, and deploy/preflight.py
  first_policy the documented first policy: redis + object store up, `compose run admin fleetloop
               collect`, `compose run admin fleetloop pretrain` into the learner's volume
  up           `compose up -d`; every service's health check passes
  robots       each robot's actor daemon as deploy/robot/compose.yml runs it (its own container,
               its own issued credentials, the fleet key's public half), loading the first version
  episodes     a synthetic robot stack drives episodes over each daemon's gRPC link; they reach the
               store, the learner (its buffer) and the dashboard (its index)
  new_version  the containerised learner publishes a version trained on them; each robot loads it
  dashboard    the published port with an operator token; a takeover reaches the robot's link and
               lands in the audit log
  faults       `compose restart redis`, `docker kill` of the learner container and of a robot's
               container right after it ended episodes (mid-upload), with episodes recorded
               throughout; afterwards every episode is in the store and indexed exactly once and a
               version published after the restart is loaded by every robot
  down         `compose down -v` for the cloud side and the robots; nothing of theirs is left

Prints one JSON object (--json) and exits 0 only if every check passed. Container logs of a failed
run are written to --logs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from collections import Counter
from pathlib import Path

import numpy as np

from fleetloop.services import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preflight import read_env  # noqa: E402 -- deploy/ is not a package; the same .env reader

REPO = Path(__file__).resolve().parents[1]
CLOUD_SERVICES = ("redis", "minio", "ray-head", "dashboard", "ingest")   # those with a health check
STATE_DIM, ACTION_DIM = 39, 4                                    # the simulated arm's (MetaWorld)
TASK = "reach-v3"
# What the e2e project copies from the repository: the files compose reads, at their own paths.
PROJECT_FILES = ("docker-compose.yml", ".env.example", "deploy/compose.local.yml", "deploy/minio/init.sh",
                 "deploy/local/s3-init.py", "deploy/robot/compose.yml", "deploy/robot/actor.example.toml")


class E2EFailure(Exception):
    """A check failed: the message says which and what was seen."""


class NoEngine(Exception):
    """No Docker engine can be had on this machine (the test skips with this reason)."""


def log(msg: str) -> None:
    print(f"[e2e] {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], *, env: dict | None = None, timeout: float = 600, check: bool = True,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
        raise E2EFailure(f"`{' '.join(argv[:6])}` exited {p.returncode}: " + " | ".join(tail))
    return p


def wait_for(what: str, fn, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            got = fn()
            if got:
                return got
            last = got
        except E2EFailure:
            raise   # a definitive failure, not a "not yet"
        except Exception as e:  # noqa: BLE001 -- keep polling; the last error goes in the failure
            last = e
        time.sleep(interval)
    raise E2EFailure(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# -- the Docker engine -------------------------------------------------------------------------

class Engine:
    """The engine DOCKER_HOST names, or a dockerd of our own (root only) under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ)

    def answers(self) -> bool:
        return subprocess.run(["docker", "info"], env=self.env, capture_output=True, timeout=30).returncode == 0

    def ensure(self) -> str:
        if shutil.which("docker") is None:
            raise NoEngine("no docker client on PATH (Debian: apt-get install docker.io)")
        if self.answers():
            return "existing"
        if os.geteuid() != 0 or shutil.which("dockerd") is None:
            raise NoEngine("no Docker engine answers and none can be started here "
                           "(dockerd needs root and Debian's docker.io package)")
        run_dir = Path("/run/fleetloop-e2e")
        run_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "docker").mkdir(parents=True, exist_ok=True)
        sock = run_dir / "docker.sock"
        self.env["DOCKER_HOST"] = f"unix://{sock}"
        if self.answers():   # one of ours from an earlier run that was not stopped
            return "existing"
        logf = open(self.root / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.root / "docker"), "--exec-root", str(run_dir / "exec"),
             "--host", f"unix://{sock}", "--pidfile", str(run_dir / "docker.pid")],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        try:
            wait_for("dockerd to answer", lambda: self.proc.poll() is None and self.answers(), 60)
        except E2EFailure:
            tail = (self.root / "dockerd.log").read_text(errors="replace").splitlines()[-5:]
            self.stop()
            raise NoEngine("dockerd did not start: " + " | ".join(tail))
        return "started"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def compose_command(env: dict) -> list[str]:
    if subprocess.run(["docker", "compose", "version"], env=env, capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise NoEngine("neither `docker compose` nor `docker-compose` is installed")


# -- the project: compose files, .env, credentials --------------------------------------------

class Project:
    def __init__(self, root: Path, name: str, engine_env: dict, robots: list[str]):
        self.dir, self.name, self.robots = root, name, robots
        self.env = dict(engine_env)
        self.compose = compose_command(self.env)
        for rel in PROJECT_FILES:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
        self.dotenv = self._dotenv()
        (root / ".env").write_text("".join(f"{k}={v}\n" for k, v in self.dotenv.items()))
        os.chmod(root / ".env", 0o600)

    def _dotenv(self) -> dict[str, str]:
        values = read_env(REPO / ".env.example")
        for k, v in values.items():   # what an operator does first: every change-me replaced
            if "change-me" in v:
                name, sep, _ = v.partition(":")
                fresh = secrets.token_urlsafe(24)
                values[k] = f"{name}:{fresh}" if sep and k.endswith("_TOKENS") else fresh
        values.update(COMPOSE_PROJECT_NAME=self.name, FLEETLOOP_VIEWER_TOKENS=f"wallboard:{secrets.token_urlsafe(24)}",
                      # published on loopback, on ports free here (this host may run its own Redis)
                      REDIS_BIND="127.0.0.1", REDIS_PORT=str(free_port()), MINIO_BIND="127.0.0.1",
                      MINIO_PORT=str(free_port()), MINIO_CONSOLE_PORT=str(free_port()),
                      DASHBOARD_BIND="127.0.0.1", DASHBOARD_PORT=str(free_port()),
                      INGEST_BIND="127.0.0.1", INGEST_PORT=str(free_port()),
                      RAY_DASHBOARD_PORT=str(free_port()), RAY_SHM_SIZE="512mb",
                      # a learner that publishes often and leaves CPU to the rest of this small host
                      # (--rollout off: every version goes to every robot, as in SOP; the canary
                      # gate would hold the fleet until a canary's autonomous episodes decide)
                      FLEETLOOP_LEARNER_ARGS="--init /var/lib/fleetloop/init --publish-every 25 --batch-size 32 "
                                             "--max-updates-per-s 5 --torch-threads 1 --rollout off")
        return values

    @property
    def operator_token(self) -> str:
        return self.dotenv["FLEETLOOP_OPERATOR_TOKENS"].split(",")[0].partition(":")[2]

    @property
    def operator_name(self) -> str:
        return self.dotenv["FLEETLOOP_OPERATOR_TOKENS"].split(",")[0].partition(":")[0]

    def dc(self, *args: str, timeout: float = 600, check: bool = True, project: str | None = None,
           files: tuple[str, ...] = ("docker-compose.yml", "deploy/compose.local.yml"),
           env: dict | None = None) -> subprocess.CompletedProcess:
        argv = [*self.compose, "--project-directory", str(self.dir), "-p", project or self.name]
        for f in files:
            argv += ["-f", str(self.dir / f)]
        return run([*argv, *args], env={**self.env, **(env or {})}, timeout=timeout, check=check, cwd=self.dir)

    def container(self, service: str, project: str | None = None) -> str:
        out = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project or self.name}",
                   "--filter", f"label=com.docker.compose.service={service}"], env=self.env).stdout.split()
        if not out:
            raise E2EFailure(f"no container for service {service}")
        return out[0]

    def state(self, cid: str) -> dict:
        return json.loads(run(["docker", "inspect", "-f", "{{json .State}}", cid], env=self.env).stdout)

    def wait_healthy(self, services, timeout: float) -> list[str]:
        def all_healthy():
            for svc in services:
                st = self.state(self.container(svc))
                if st.get("Restarting") or (not st.get("Running") and st.get("Status") == "exited"):
                    tail = run(["docker", "logs", "--tail", "5", self.container(svc)], env=self.env, check=False)
                    raise E2EFailure(f"{svc} is not running ({st.get('Status')}, exit {st.get('ExitCode')}): "
                                     + " | ".join((tail.stdout + tail.stderr).strip().splitlines()[-5:]))
                if st.get("Health", {}).get("Status") != "healthy":
                    return False
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all_healthy():
                    return list(services)
            except E2EFailure:
                if time.monotonic() > deadline - timeout / 2:   # a restart in the first half is allowed
                    raise
            if time.monotonic() > deadline:
                raise E2EFailure(f"services not healthy after {timeout:.0f} s: " + ", ".join(
                    f"{s}={self.state(self.container(s)).get('Health', {}).get('Status')}" for s in services))
            time.sleep(2)

    def save_logs(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        ids = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project"], env=self.env,
                  check=False).stdout.split()
        for cid in ids:
            name = run(["docker", "inspect", "-f", "{{.Name}}", cid], env=self.env, check=False).stdout.strip("/\n")
            if not name.startswith(self.name):
                continue
            p = run(["docker", "logs", cid], env=self.env, check=False)
            (out / f"{name}.log").write_text(p.stdout + p.stderr)


# -- the robots: the actor daemon in its container, a synthetic robot stack on its gRPC link ----

class Robot:
    def __init__(self, project: Project, robot_id: str):
        self.p, self.id = project, robot_id
        self.project = f"{project.name}-robot-{robot_id}"
        self.grpc_port = free_port()
        self.env_file = project.dir / "robots" / f"{robot_id}.env"
        self.link = None
        self.ended: list[str] = []     # the ledger: episodes the daemon acknowledged as spooled

    def install(self, trusted: Path) -> None:
        # /etc/fleetloop/actor.env, as docs/deploy.md says: the issued robot-<id>.env, plus this
        # host's choices (two robots share the host's network here: each its own gRPC port).
        issued = (self.p.dir / "deploy" / "secrets" / "env" / f"robot-{self.id}.env").read_text()
        self.env_file.parent.mkdir(parents=True, exist_ok=True)
        self.env_file.write_text(issued.rstrip("\n") + "\n"
                                 f"FLEETLOOP_GRPC_ADDRESS=127.0.0.1:{self.grpc_port}\n"
                                 "FLEETLOOP_SPOOL_MAX=256MiB\nFLEETLOOP_POLICY_POLL_INTERVAL=1s\n")
        os.chmod(self.env_file, 0o600)
        self.compose_env = {"FLEETLOOP_ACTOR_ENV": str(self.env_file),
                            "FLEETLOOP_ACTOR_CONFIG": str(self.p.dir / "deploy" / "robot" / "actor.example.toml"),
                            "FLEETLOOP_TRUSTED_DIR": str(trusted),
                            "FLEETLOOP_IMAGE": self.p.dotenv.get("FLEETLOOP_IMAGE", "fleetloop:cpu")}

    def dc(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.p.dc(*args, project=self.project, files=("deploy/robot/compose.yml",),
                         env=self.compose_env, timeout=timeout)

    def up(self) -> None:
        self.dc("up", "-d", "--no-build")
        self.connect()
        # a (re)started daemon has a policy once it fetched the pointer's version: Act waits for it
        wait_for(f"{self.id} to fetch a policy", lambda: (lambda st: st.policy_version or st.pending_version)(
            self.link.status()), 120)

    def connect(self) -> None:
        from fleetloop.actor.link import RobotLinkClient
        if self.link is not None:
            self.link.close()

        def listening():
            with socket.create_connection(("127.0.0.1", self.grpc_port), timeout=1):
                return True
        wait_for(f"{self.id}'s robot link on port {self.grpc_port}", listening, 120)
        self.link = RobotLinkClient(f"127.0.0.1:{self.grpc_port}", self.id, timeout_s=15)
        wait_for(f"{self.id}'s status", lambda: self.link.status().robot_id == self.id, 60)

    def drive(self, episodes: int, rng: np.random.Generator, steps: int = 12) -> list[str]:
        """A robot stack's episodes: policy actions, with an operator intervention in the middle."""
        from fleetloop.policy.interface import Observation
        from fleetloop.proto.v1 import episode_pb2 as pb
        out = []
        for _ in range(episodes):
            eid = self.link.start_episode(TASK, "reach the goal")
            for t in range(steps):
                if t == 4:
                    self.link.begin_intervention("e2e-operator", "drift")
                if t == 8:
                    self.link.end_intervention()
                obs = Observation(images={}, state=rng.standard_normal(STATE_DIM).astype(np.float32))
                chunk = self.link.act(obs)
                if chunk.shape[1] != ACTION_DIM or not np.isfinite(chunk).all():
                    raise E2EFailure(f"{self.id}: the policy answered a chunk of shape {chunk.shape}")
                action = rng.uniform(-1, 1, ACTION_DIM) if 4 <= t < 8 else chunk[0]
                self.link.report_step(obs, action, intervention=4 <= t < 8, policy_chunk=chunk)
            end = self.link.end_episode(pb.OUTCOME_SUCCESS if rng.random() < 0.5 else pb.OUTCOME_FAILURE)
            if not end.spooled:
                raise E2EFailure(f"{self.id}: episode {eid} was not spooled")
            out.append(eid)
        self.ended += out
        return out

    def running_version(self, rng: np.random.Generator) -> str:
        """The version an episode starts with now (a fetched version is swapped in at the start)."""
        self.drive(1, rng, steps=2)
        return self.link.policy_version


# -- the check ---------------------------------------------------------------------------------

class Check:
    def __init__(self, args):
        self.args = args
        self.phases: dict[str, float] = {}
        self.result: dict = {"ok": False}
        self.rng = np.random.default_rng(0)

    @contextlib.contextmanager
    def phase(self, name: str):
        log(f"phase {name}")
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - t0, 1)
            log(f"phase {name}: {self.phases[name]} s")

    # -- reading the cloud side from the host, as an operator would --------------------------

    def http(self, path: str, method: str = "GET", body: dict | None = None, token: str | None = None):
        url = f"http://127.0.0.1:{self.p.dotenv['DASHBOARD_PORT']}{path}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {token or self.p.operator_token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def admin_redis(self):
        import redis
        pw = json.loads((self.p.dir / "deploy" / "secrets" / "passwords.json").read_text())["fleetloop-admin"]
        return redis.Redis(host="127.0.0.1", port=int(self.p.dotenv["REDIS_PORT"]), username="fleetloop-admin",
                           password=pw, socket_timeout=10)

    def learner_stats(self) -> dict:
        from fleetloop.config import LEARNER_STATS_KEY
        raw = self.admin_redis().hgetall(LEARNER_STATS_KEY)
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def learner_online_episodes(self) -> int:
        buf = self.learner_stats().get("buffer", {})
        return sum(t.get("online", {}).get("episodes", 0) for t in buf.get("tasks", {}).values())

    def current_version(self) -> str:
        return self.learner_stats().get("current_version", "")

    def store_manifests(self) -> Counter:
        """Committed episodes per robot in the store (manifests under episodes/<robot>/)."""
        import boto3
        admin = read_env(self.p.dir / "deploy/secrets/env/fleetloop-admin.env")
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.p.dotenv['MINIO_PORT']}", region_name="us-east-1",
                          aws_access_key_id=admin["AWS_ACCESS_KEY_ID"], aws_secret_access_key=admin["AWS_SECRET_ACCESS_KEY"])
        prefix = f"{self.p.dotenv['S3_PREFIX']}/episodes/"
        found: Counter = Counter()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.p.dotenv["S3_BUCKET"], Prefix=prefix):
            for obj in page.get("Contents", []):
                parts = obj["Key"][len(prefix):].split("/")
                if len(parts) == 3 and parts[2] == "manifest.json":
                    found[(parts[0], parts[1])] += 1
        return found

    def dashboard_episodes(self, robot_id: str) -> list[str]:
        ids, offset = [], 0
        while True:
            body = self.http(f"/api/episodes?robot_id={robot_id}&limit=500&offset={offset}")
            page = body if isinstance(body, list) else body.get("episodes", [])
            ids += [e["episode_id"] for e in page]
            if len(page) < 500:
                return ids
            offset += 500

    def ledger(self) -> dict:
        """Every episode a robot was told is spooled: in the store once, indexed once by the
        dashboard and counted once by the learner."""
        ended = {(r.id, e) for r in self.robots for e in r.ended}
        store = self.store_manifests()
        robot_ids = {r.id for r in self.robots}
        stored = {k for k in store if k[0] in robot_ids}
        listed = Counter((r.id, e) for r in self.robots for e in self.dashboard_episodes(r.id))
        lost = len(ended - stored) + len(ended - set(listed))
        duplicates = (sum(n - 1 for n in listed.values() if n > 1) + len(stored - ended)
                      + max(0, self.learner_online_episodes() - len(ended)))
        return {"recorded": len(ended), "stored": len(stored & ended), "listed": len(set(listed) & ended),
                "learner": self.learner_online_episodes(), "lost": lost, "duplicates": duplicates}

    def wait_all_indexed(self, timeout: float) -> dict:
        def done():
            led = self.ledger()
            self.last_ledger = led
            return led if (led["stored"] == led["listed"] == led["learner"] == led["recorded"]
                           and led["duplicates"] == 0) else None
        self.last_ledger = {}
        try:
            return wait_for("every episode in the store, the dashboard and the learner", done, timeout, interval=2)
        except E2EFailure as e:
            raise E2EFailure(f"{e}; ledger {self.last_ledger}") from None

    def wait_robots_load_newer(self, than: str, timeout: float) -> dict[str, str]:
        """Each robot starts an episode with a version newer than `than` (verified and loaded)."""
        got: dict[str, str] = {}

        def all_loaded():
            for r in self.robots:
                if r.id not in got:
                    v = r.running_version(self.rng)
                    if v and v > than:
                        got[r.id] = v
            return len(got) == len(self.robots)
        wait_for(f"every robot to run a version newer than {than} (have {got})", all_loaded, timeout, interval=2)
        return got

    # -- the run ----------------------------------------------------------------------------

    def main(self) -> int:
        args = self.args
        root = Path(args.state_dir)
        root.mkdir(parents=True, exist_ok=True)
        engine = Engine(root)
        self.robots: list[Robot] = []
        self.p = None
        work = Path(tempfile.mkdtemp(prefix="fleetloop-e2e-"))
        t_start = time.monotonic()
        try:
            with self.phase("engine"):
                self.result["engine"] = engine.ensure()
            with self.phase("images"):
                run(["bash", str(REPO / "deploy" / "images.sh")], env=engine.env, timeout=3000)
            with self.phase("setup"):
                self.setup(work, engine.env)
            with self.phase("first_policy"):
                self.first_policy()
            with self.phase("up"):
                self.p.dc("up", "-d", "--no-build", timeout=900)
                self.result["services_healthy"] = self.p.wait_healthy(CLOUD_SERVICES, args.health_timeout)
                first = wait_for("the learner's first version", self.current_version, 180, interval=2)
                self.result["first_version"] = first
            with self.phase("robots"):
                self.start_robots()
            with self.phase("episodes"):
                for r in self.robots:
                    r.drive(args.episodes, self.rng)
                led = self.wait_all_indexed(180)
                self.result["episodes_indexed"] = led["learner"]
            with self.phase("new_version"):
                trained_on = self.current_version()
                loaded = self.wait_robots_load_newer(trained_on, 300)
                self.result["robots_loaded_version"] = sorted(loaded)
                self.result["versions_loaded"] = loaded
            with self.phase("dashboard"):
                self.dashboard_checks()
            with self.phase("faults"):
                self.faults()
            self.result["ok"] = (self.result.get("lost") == 0 and self.result.get("duplicates") == 0
                                 and self.result.get("dashboard_ok") and self.result.get("takeover_audited"))
        except NoEngine as e:
            self.result.update(ok=False, skipped=str(e))
        except Exception as e:  # noqa: BLE001 -- every failure is reported in the JSON, then re-raised as exit 1
            self.result["error"] = f"{type(e).__name__}: {e}"
            if self.p is not None:
                self.p.save_logs(Path(args.logs))
                self.result["logs"] = str(Path(args.logs).resolve())
        finally:
            with self.phase("down"):
                self.result["down_clean"] = self.teardown(engine) if not args.keep else None
            shutil.rmtree(work, ignore_errors=True)
            self.result["phases_s"] = self.phases
            self.result["wall_s"] = round(time.monotonic() - t_start, 1)
        if self.result.get("down_clean") is False:
            self.result["ok"] = False
        print(json.dumps(self.result, indent=None if args.json else 2))
        if "skipped" in self.result:
            return 3
        return 0 if self.result["ok"] else 1

    def setup(self, work: Path, engine_env: dict) -> None:
        robots = [f"e2e-{i + 1}" for i in range(self.args.robots)]
        self.p = p = Project(work / "project", self.args.project, engine_env, robots)
        # leftovers of an interrupted run of the same name go first
        self.teardown_projects(robots)
        d = p.dotenv
        run([sys.executable, "-m", "fleetloop.cli", "credentials", "issue", "--robots", ",".join(robots),
             "--out", str(p.dir / "deploy" / "secrets"), "--bucket", d["S3_BUCKET"], "--prefix", d["S3_PREFIX"],
             "--no-keys", "--robot-redis-host", f"127.0.0.1:{d['REDIS_PORT']}",
             "--robot-s3-endpoint", f"http://127.0.0.1:{d['MINIO_PORT']}",
             "--ingest-url", f"http://127.0.0.1:{d['INGEST_PORT']}"], timeout=120)
        run([sys.executable, str(REPO / "deploy" / "preflight.py"), "--project-directory", str(p.dir), "--local"],
            env=engine_env, timeout=60)
        self.robots = [Robot(p, r) for r in robots]

    def first_policy(self) -> None:
        p = self.p
        p.dc("up", "-d", "--no-build", "redis", "minio", "minio-init", timeout=300)
        p.wait_healthy(("redis", "minio"), 120)

        def init_done():
            st = p.state(p.container("minio-init"))
            if st["Status"] == "exited" and st["ExitCode"] != 0:
                raise E2EFailure(f"minio-init exited {st['ExitCode']}")
            return st["Status"] == "exited"
        wait_for("minio-init to finish", init_done, 120)
        p.dc("run", "--rm", "--no-deps", "admin", "fleetloop", "collect", "--tasks", TASK, "--episodes",
             str(self.args.demos), "--no-images", timeout=900)
        p.dc("run", "--rm", "--no-deps", "admin", "fleetloop", "pretrain", "--out", "/var/lib/fleetloop/init",
             "--size", "tiny", "--state-only", "--steps", str(self.args.pretrain_steps), "--batch-size", "64",
             timeout=900)

    def start_robots(self) -> None:
        p = self.p
        # The fleet key's public half, handed to each robot (docs/deploy.md, "Policy signing keys").
        keys = p.dir / "fleet-keys"
        run(["docker", "cp", f"{p.container('keys-init')}:/etc/fleetloop/keys", str(keys)], env=p.env)
        trusted = p.dir / "trusted"
        trusted.mkdir()
        pubs = sorted(keys.glob("*.pub"))
        if not pubs:
            raise E2EFailure("keys-init left no public key in the signing-keys volume")
        for pub in pubs:
            shutil.copy(pub, trusted)
        first = self.result["first_version"]
        for r in self.robots:
            r.install(trusted)
            r.up()
        for r in self.robots:
            v = wait_for(f"{r.id} to run the learner's version", lambda r=r: r.running_version(self.rng) or None, 120,
                         interval=2)
            if v < first:
                raise E2EFailure(f"{r.id} runs {v}, older than the learner's first version {first}")
        self.result["robots"] = [r.id for r in self.robots]

    def dashboard_checks(self) -> None:
        viewer = self.p.dotenv["FLEETLOOP_VIEWER_TOKENS"].partition(":")[2]
        who = self.http("/api/whoami", token=viewer)
        robots = self.http("/api/robots", token=viewer)
        listed = {r.get("robot_id") for r in (robots if isinstance(robots, list) else robots.get("robots", []))}
        try:
            self.http("/api/robots", token="not-a-token-at-all")
            refused = False
        except urllib.error.HTTPError as e:
            refused = e.code == 401
        self.result["dashboard_ok"] = bool(who.get("name") == "wallboard" and listed >= {r.id for r in self.robots}
                                           and refused)
        target = self.robots[0]
        t0 = time.time()
        self.http(f"/api/robots/{target.id}/takeover", "POST", {"reason": "e2e takeover"})
        wait_for(f"the takeover to reach {target.id}'s robot link", lambda: target.link.status().takeover_requested, 30)
        self.result["takeover_reached_robot_s"] = round(time.time() - t0, 2)
        entries = self.http("/api/audit?limit=100")
        entries = entries if isinstance(entries, list) else entries.get("entries", [])
        text = [json.dumps(e) for e in entries]
        self.result["takeover_audited"] = any("robot.takeover" in t and target.id in t and self.p.operator_name in t
                                              for t in text)
        self.http(f"/api/robots/{target.id}/release", "POST", {"reason": "e2e done"})
        wait_for(f"the release to reach {target.id}", lambda: not target.link.status().takeover_requested, 30)

    def faults(self) -> None:
        p, args = self.p, self.args
        survived = []
        # Redis restarts (its append-only file keeps the stream and the pointer) while robots record.
        for r in self.robots:
            r.drive(args.episodes, self.rng)
        p.dc("restart", "redis", timeout=120)
        p.wait_healthy(("redis",), 120)
        for r in self.robots:
            r.drive(args.episodes, self.rng)
        self.wait_all_indexed(240)
        survived.append("redis restart")
        # The learner's container is killed (SIGKILL: mid-step or mid-publish) while robots record.
        before_kill = self.current_version()
        head = p.container("ray-head")
        run(["docker", "kill", head], env=p.env)
        for r in self.robots:
            r.drive(args.episodes, self.rng)
        time.sleep(3)
        st = p.state(head)
        if not st.get("Running") and not st.get("Restarting"):
            # `docker kill` counts as a stop the operator asked for; bring it back as an operator would
            p.dc("up", "-d", "--no-build", "ray-head", timeout=300)
        p.wait_healthy(("ray-head",), args.health_timeout)
        survived.append("learner container killed")
        # A robot's container killed right after it ended episodes (its uploads in flight).
        victim = self.robots[-1]
        victim.drive(args.episodes, self.rng)
        run(["docker", "kill", p.container("actor", project=victim.project)], env=p.env)
        victim.up()
        survived.append(f"robot {victim.id} container killed mid-upload")
        for r in self.robots:
            r.drive(args.episodes, self.rng)
        led = self.wait_all_indexed(300)
        self.result["episodes_indexed"] = led["learner"]
        self.result["ledger"] = led
        after = self.wait_robots_load_newer(before_kill, 300)
        self.result["versions_after_restarts"] = after
        self.result["restarts_survived"] = survived
        self.result["lost"], self.result["duplicates"] = led["lost"], led["duplicates"]

    def teardown_projects(self, robot_ids: list[str]) -> bool:
        p = self.p
        empty = p.dir / "empty.env"   # `down` reads the file names, not the robot's files
        empty.touch()
        for rid in robot_ids:
            project = f"{p.name}-robot-{rid}"
            p.dc("down", "-v", "--remove-orphans", project=project, files=("deploy/robot/compose.yml",),
                 env={"FLEETLOOP_ACTOR_ENV": str(empty), "FLEETLOOP_ACTOR_CONFIG": str(empty),
                      "FLEETLOOP_TRUSTED_DIR": str(p.dir)}, timeout=180, check=False)
        p.dc("--profile", "tools", "down", "-v", "--remove-orphans", timeout=300, check=False)
        left = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project"], env=p.env,
                   check=False).stdout.split()
        mine = [c for c in left if run(["docker", "inspect", "-f", '{{ index .Config.Labels "com.docker.compose.project" }}', c],
                                       env=p.env, check=False).stdout.strip().startswith(p.name)]
        return not mine

    def teardown(self, engine: Engine) -> bool | None:
        clean = None
        try:
            for r in self.robots:
                if r.link is not None:
                    r.link.close()
            if self.p is not None:
                clean = self.teardown_projects(self.p.robots)
        finally:
            if engine.proc is not None:
                engine.stop()
        return clean


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as one line of JSON")
    ap.add_argument("--robots", type=int, default=2, help="actor daemons, each in its own container (default 2)")
    ap.add_argument("--episodes", type=int, default=3, help="episodes per robot per round (default 3)")
    ap.add_argument("--demos", type=int, default=5, help="demonstrations for the first policy (default 5)")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--health-timeout", type=float, default=300.0, help="seconds for the health checks to pass")
    ap.add_argument("--project", default="fleetloop-e2e", help="compose project name")
    ap.add_argument("--state-dir", default=os.environ.get("FLEETLOOP_E2E_STATE", "/var/lib/fleetloop-e2e"),
                    help="the started dockerd's data root lives here (images cached between runs)")
    ap.add_argument("--logs", default=str(REPO / "runs" / "e2e-logs"), help="container logs of a failed run")
    ap.add_argument("--keep", action="store_true", help="leave everything running (debugging)")
    args = ap.parse_args()
    if args.robots < 1 or args.episodes < 1:
        ap.error("--robots and --episodes must be at least 1")
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
