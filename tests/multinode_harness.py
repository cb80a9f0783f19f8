#!/usr/bin/env python3
"""The learner across Ray nodes, on one machine: a Ray head and two worker nodes in their own
network namespaces, the learner's two DDP training workers (gloo, CPU) on different nodes,
synthetic robots in a fourth namespace reaching Redis and S3 (moto's server) over veth links;
then a worker node is killed mid-training and Ray Train restarts the worker group.

    sudo .venv/bin/python scripts/multinode.py            # prints a JSON summary, exit 0 if it held
    sudo .venv/bin/python scripts/multinode.py --cleanup  # remove what a killed run left behind

Needs root (ip netns, veth, a bridge), `ip` and `redis-server`. Run it with the virtualenv's
python (its ray and fleetloop are used). Layout (K: a free 10.213.K.0/24):

    bridge flmnXXbr 10.213.K.1 (this namespace: the orchestrator, seeding and checks)
      |-- flmnXX-head   10.213.K.10  Ray head (GCS :6380), Redis :6390, moto S3 :9000, the learner driver
      |-- flmnXX-w1     10.213.K.11  Ray worker node, 1 CPU, resource fleetloop_trainer: 1
      |-- flmnXX-w2     10.213.K.12  Ray worker node, 1 CPU, resource fleetloop_trainer: 1
      `-- flmnXX-robots 10.213.K.20  synthetic robots (episodes -> S3 + Redis) and a weight follower

The learner: LearnerConfig(num_workers=2, placement_strategy="STRICT_SPREAD",
worker_resources={"fleetloop_trainer": 1}): one training worker per node that offers the resource
(the head offers none), so the two ranks run on w1 and w2 and talk gloo over the veth network
(GLOO_SOCKET_IFNAME=eth0 on every node). Tiny policy, state only, small batches, capped step rate.

The kill: every process in w2's namespace gets SIGKILL (raylet, its workers, the training worker
on it): the node is gone. A replacement node joins from the same namespace a moment later (what
an autoscaler or a Kubernetes node pool does), with a new node id. Ray Train sees the worker die,
tears the group down and starts a new one (FailureConfig(max_failures)); the new ranks resume
from the learner's last checkpoint in the store and go on publishing. The summary checks that no
version number was ever used twice (every notice and every indexed version) and that every
version published after the kill is numbered above every version published before it.

Everything (processes in the namespaces, the namespaces, the bridge, a firewall rule if one was
needed, the temporary directory) is removed at the end, also on failure, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PREFIX = "flmn"
ROLES = ("head", "w1", "w2", "robots")
HOST = {"head": 10, "w1": 11, "w2": 12, "robots": 20}
GCS_PORT, REDIS_PORT, S3_PORT = 6380, 6390, 9000
TRAINER = "fleetloop_trainer"
BUCKET = "fleetloop-multinode"
TASK = "synthetic-v0"
STATE_DIM, ACTION_DIM = 39, 4


def log(msg: str) -> None:
    print(f"[multinode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(args), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def ns_pids(ns: str) -> list[int]:
    p = run("ip", "netns", "pids", ns, check=False)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def kill_namespace(ns: str, grace_s: float = 0.0) -> int:
    """Kill every process whose network namespace is `ns` (ours alone: we made the namespace):
    SIGTERM and up to grace_s to exit, then SIGKILL. Returns how many there were."""
    pids = ns_pids(ns)
    n = len(pids)
    if grace_s and pids:
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and ns_pids(ns):
            time.sleep(0.1)
    for _ in range(50):
        pids = ns_pids(ns)
        if not pids:
            break
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.1)
    return n


def _signal(pid: int, sig: int) -> int:
    try:
        os.kill(pid, sig)
        return 1
    except ProcessLookupError:
        return 0


# ---- the network -------------------------------------------------------------------------------

class Network:
    def __init__(self, tag: str, octet: int):
        self.tag, self.octet = tag, octet
        self.ns = {r: f"{PREFIX}{tag}-{r}" for r in ROLES}
        self.ip = {r: f"10.213.{octet}.{HOST[r]}" for r in ROLES}
        self.bridge = f"{PREFIX}{tag}br"
        self.bridge_ip = f"10.213.{octet}.1"
        self.firewall_rule: list[str] | None = None

    @classmethod
    def pick(cls) -> "Network":
        used_ns = set(run("ip", "netns", "list", check=False).stdout.split())
        addrs = run("ip", "-o", "addr", check=False).stdout
        links = run("ip", "-o", "link", check=False).stdout
        for _ in range(200):
            octet = random.randrange(1, 255)
            tag = f"{octet:02x}"
            if f"10.213.{octet}." in addrs or f"{PREFIX}{tag}" in links or any(
                    n.startswith(f"{PREFIX}{tag}-") for n in used_ns):
                continue
            return cls(tag, octet)
        raise RuntimeError("no free 10.213.K.0/24 subnet / name tag")

    def up(self) -> None:
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for role in ROLES:
            ns, host, peer = self.ns[role], self.host_end(role), f"{PREFIX}{self.tag}{role}p"
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            run("ip", "link", "set", peer, "netns", ns)
            run("ip", "-n", ns, "link", "set", peer, "name", "eth0")  # the same name everywhere: GLOO_SOCKET_IFNAME
            run("ip", "-n", ns, "addr", "add", f"{self.ip[role]}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "link", "set", host, "master", self.bridge)
            run("ip", "link", "set", host, "up")
        # A host whose bridged traffic goes through iptables (br_netfilter) with a DROP policy
        # (Docker sets one) would drop ours: let this bridge's traffic through, for this run only.
        nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        if nf.exists() and nf.read_text().strip() == "1" and shutil.which("iptables"):
            rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
            if run("iptables", "-I", *rule, check=False).returncode == 0:
                self.firewall_rule = rule

    def host_end(self, role: str) -> str:
        return f"{PREFIX}{self.tag}{role}"

    def down(self) -> dict:
        # Clients first, servers last: a socket closed towards a live peer is done at once, one
        # left talking to a vanished peer would keep its namespace (and veth) alive for minutes.
        killed = {r: kill_namespace(self.ns[r], grace_s=2.0) for r in ("robots", "w1", "w2", "head")}
        for role in ROLES:  # deleting one end of a veth pair deletes both, whatever holds the namespace
            run("ip", "link", "del", self.host_end(role), check=False)
        for ns in self.ns.values():
            run("ip", "netns", "del", ns, check=False)
        run("ip", "link", "del", self.bridge, check=False)
        if self.firewall_rule:
            run("iptables", "-D", *self.firewall_rule, check=False)
        return killed

    def leftovers(self) -> list[str]:
        names = set(run("ip", "netns", "list", check=False).stdout.split())
        links = run("ip", "-o", "link", check=False).stdout
        return sorted(n for n in names if n.startswith(f"{PREFIX}{self.tag}-")) + [
            name for name in [self.bridge, *map(self.host_end, ROLES)] if f" {name}:" in links or f" {name}@" in links]


def cleanup_all() -> list[str]:
    """Remove every flmn* namespace and bridge (what runs that were SIGKILLed left behind)."""
    removed = []
    for ns in run("ip", "netns", "list", check=False).stdout.split():
        if ns.startswith(PREFIX) and "-" in ns:
            kill_namespace(ns, grace_s=1.0)
            run("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    for line in run("ip", "-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX) and name.endswith("br"):
            run("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


def wait_port(host: str, port: int, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{what} not listening on {host}:{port} after {timeout:.0f}s")


# ---- the run -----------------------------------------------------------------------------------

class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.net = Network.pick()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{self.net.tag}-", dir=args.workdir))
        (self.dir / "logs").mkdir()
        # Ray's unix sockets live under its temp dir: keep the path short (~107 characters max).
        self.ray_tmp = Path(f"/tmp/{PREFIX}{self.net.tag}")
        self.procs: dict[str, subprocess.Popen] = {}
        self.py = sys.executable
        self.ray = str(Path(sys.executable).with_name("ray"))
        head = self.net.ip["head"]
        self.redis_url = f"redis://{head}:{REDIS_PORT}/0"
        self.s3_endpoint = f"http://{head}:{S3_PORT}"
        self.store_uri = f"s3://{BUCKET}/fleet"
        self.notices: list[tuple[float, str]] = []  # (seconds since start, version) as announced
        self._stop = threading.Event()

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def env(self, **extra: str) -> dict:
        e = dict(os.environ)
        for k in ("RAY_ADDRESS", "FLEETLOOP_REDIS_URL", "FLEETLOOP_STORE"):
            e.pop(k, None)
        e.update({
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0",
            "FLEETLOOP_S3_ENDPOINT": self.s3_endpoint, "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
            "FLEETLOOP_REDIS_URL": self.redis_url, "PYTHONUNBUFFERED": "1",
            # Node death noticed in ~3 s rather than ~30 s (GCS health checks of the raylets).
            "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(self.args.group_start_timeout_s),
        })
        e.update(extra)
        return e

    def spawn(self, name: str, role: str, argv: list[str], **env: str) -> subprocess.Popen:
        out = open(self.dir / "logs" / f"{name}.log", "ab")
        p = subprocess.Popen(["ip", "netns", "exec", self.net.ns[role], *argv], env=self.env(**env),
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=str(self.dir))
        out.close()
        self.procs[name] = p
        return p

    # -- pieces

    def start_services(self) -> None:
        head = self.net.ip["head"]
        data = self.dir / "redis"
        data.mkdir()
        p = self.spawn("redis", "head", [shutil.which("redis-server") or "redis-server", "--bind", head,
                                         "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no",
                                         "--protected-mode", "no", "--dir", str(data)])
        wait_port(head, REDIS_PORT, 20, "redis", p)
        code = (f"from moto.server import ThreadedMotoServer; import time\n"
                f"s = ThreadedMotoServer(ip_address='{head}', port={S3_PORT}, verbose=False); s.start()\n"
                f"while True: time.sleep(3600)\n")
        p = self.spawn("s3", "head", [self.py, "-c", code])
        wait_port(head, S3_PORT, 60, "moto S3 server", p)

    def start_node(self, role: str, name: str | None = None) -> subprocess.Popen:
        name = name or f"ray-{role}"
        ip = self.net.ip[role]
        tmp = self.ray_tmp / name.replace("ray-", "")
        common = ["--node-ip-address", ip, "--num-cpus", "1", "--object-store-memory", str(80 * 1024 ** 2),
                  "--disable-usage-stats", "--block", "--temp-dir", str(tmp)]
        if role == "head":
            argv = [self.ray, "start", "--head", "--port", str(GCS_PORT), "--include-dashboard", "false",
                    "--resources", "{}", *common]
        else:
            argv = [self.ray, "start", "--address", f"{self.net.ip['head']}:{GCS_PORT}",
                    "--resources", json.dumps({TRAINER: 1}), *common]
        return self.spawn(name, role, argv, RAY_TMPDIR=str(tmp))

    def seed(self) -> None:
        """The pretrained policy (tiny, state only) and a few demonstrations, into the store over
        the bridge."""
        import numpy as np
        import torch

        from fleetloop.buffer.codec import commit_episode, encode_chunk
        from fleetloop.buffer.store import open_store
        from fleetloop.config import S3Settings
        from fleetloop.policy.backend import save_checkpoint
        from fleetloop.policy.model import ModelConfig, VLAPolicyNet
        from fleetloop.proto.v1 import episode_pb2 as pb

        torch.manual_seed(0)
        save_checkpoint(VLAPolicyNet(ModelConfig.preset("tiny", use_images=False)), self.dir / "init")
        store = open_store(self.store_uri, S3Settings(endpoint_url=self.s3_endpoint, access_key="test",
                                                      secret_key="test"))
        rng = np.random.default_rng(0)
        for k in range(4):
            eid, steps = f"demo-{k}", 40
            st = rng.standard_normal((steps, STATE_DIM)).astype(np.float32)
            msgs = [pb.Step(index=t, state=st[t], action=np.tanh(st[t, :ACTION_DIM])) for t in range(steps)]
            m = pb.EpisodeManifest(episode_id=eid, robot_id="teleop", task_id=TASK, instruction="do the synthetic thing",
                                   kind=pb.EPISODE_KIND_DEMONSTRATION, outcome=pb.OUTCOME_SUCCESS, num_steps=steps,
                                   action_dim=ACTION_DIM, state_dim=STATE_DIM)
            commit_episode(store, m, [(encode_chunk(eid, 0, msgs), steps)])

    def start_driver(self) -> subprocess.Popen:
        a = self.args
        cfg = {"num_workers": 2, "placement_strategy": "STRICT_SPREAD", "worker_resources": {TRAINER: 1},
               "cpus_per_worker": 1.0, "batch_size": a.batch_size, "publish_every": a.publish_every,
               "checkpoint_every": a.checkpoint_every, "max_updates_per_s": a.max_updates_per_s,
               "stats_interval_s": 0.5, "max_failures": a.max_failures, "gc_every_publishes": 0,
               "lease_ttl_s": 15.0, "warmup_steps": 5, "run_name": "multinode",
               "storage_path": str(self.dir / "ray-train"),
               "ray_address": f"{self.net.ip['head']}:{GCS_PORT}"}
        argv = [self.py, os.path.abspath(__file__), "_driver", "--events", str(self.dir / "events.jsonl"),
                "--stop-file", str(self.dir / "stop"), "--store", self.store_uri, "--redis", self.redis_url,
                "--init", str(self.dir / "init"), "--config", json.dumps(cfg)]
        return self.spawn("driver", "head", argv, RAY_TMPDIR=str(self.ray_tmp / "head"))

    def start_robots(self) -> None:
        for k in range(self.args.robots):
            argv = [self.py, "-m", "fleetloop.actor.synthetic", "--robot-id", f"robot-{k}", "--store", self.store_uri,
                    "--redis", self.redis_url, "--spool", str(self.dir / f"spool-{k}"), "--episodes", "100000",
                    "--episode-kb", str(self.args.episode_kb), "--interval-s", str(self.args.episode_interval_s),
                    "--seed", str(k)]
            self.spawn(f"robot-{k}", "robots", argv)
        argv = [self.py, os.path.abspath(__file__), "_follower", "--store", self.store_uri, "--redis", self.redis_url,
                "--out", str(self.dir / "follower.jsonl")]
        self.spawn("follower", "robots", argv)

    def listen_notices(self) -> None:
        """Every policy notice, as announced on the channel (seen from this namespace, over the bridge)."""
        import redis

        from fleetloop import config
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        ps = client.pubsub(ignore_subscribe_messages=True)
        ps.subscribe(config.POLICY_CHANNEL)
        while not self._stop.is_set():
            try:
                msg = ps.get_message(timeout=0.5)
            except Exception:  # noqa: BLE001 -- redis gone at teardown
                return
            if msg and msg.get("type") == "message":
                try:
                    v = json.loads(msg["data"]).get("version", "")
                except ValueError:
                    v = ""
                if v:
                    self.notices.append((self.now(), v))

    def events(self) -> list[dict]:
        path = self.dir / "events.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line being written
        return out

    def wait_event(self, pred, timeout: float, what: str, start: int = 0) -> dict:
        """The first driver event from index `start` on that satisfies pred."""
        deadline = time.monotonic() + timeout
        seen = start
        while time.monotonic() < deadline:
            drv = self.procs.get("driver")
            evs = self.events()
            for ev in evs[seen:]:
                if ev.get("event") == "error":
                    raise RuntimeError(f"driver: {ev.get('error')}")
                if pred(ev):
                    return ev
            seen = len(evs)
            if drv is not None and drv.poll() is not None:
                raise RuntimeError(f"the learner driver exited ({drv.returncode}) while waiting for {what}")
            time.sleep(0.25)
        last = self.events()[-1:] or [{}]
        raise TimeoutError(f"{what}: not after {timeout:.0f}s (last driver event: {json.dumps(last[0])[:600]})")

    # -- the scenario

    def main(self) -> dict:
        a = self.args
        summary: dict = {"ok": False, "tag": self.net.tag, "subnet": f"10.213.{self.net.octet}.0/24"}
        self.net.up()
        summary["namespaces"] = {r: {"netns": self.net.ns[r], "ip": self.net.ip[r]} for r in ROLES}
        log(f"namespaces up: {self.net.ns} on {self.net.bridge}")
        self.start_services()
        self.seed()
        log("redis, S3 (moto) up in the head namespace; init policy and 4 demonstrations stored")
        head = self.start_node("head")
        wait_port(self.net.ip["head"], GCS_PORT, 90, "ray head", head)
        self.start_node("w1")
        self.start_node("w2")
        threading.Thread(target=self.listen_notices, daemon=True).start()
        self.start_driver()
        ev = self.wait_event(lambda e: e.get("event") == "cluster", a.node_timeout_s, "3 Ray nodes up")
        summary["cluster_up_s"] = self.now()
        nodes_before = ev["nodes"]
        log(f"cluster: {len(nodes_before)} nodes ({self.now()} s)")

        def placed(e):
            return e.get("event") == "tick" and e.get("status") == "training" and len(e.get("workers", [])) == 2
        ev = self.wait_event(placed, a.group_start_timeout_s + 120, "two training workers running")
        summary["training_started_s"] = self.now()
        log(f"training: workers on {[w['ip'] for w in ev['workers']]} ({self.now()} s)")
        self.start_robots()

        # Before the kill: some versions published and at least one checkpoint.
        ev = self.wait_event(lambda e: e.get("event") == "tick" and e.get("versions_published", 0) >= a.versions_before
                             and e.get("last_checkpoint") and len(e.get("workers", [])) == 2,
                             a.phase_timeout_s, f"{a.versions_before} versions and a checkpoint")
        before = ev
        workers_before = before["workers"]
        if len({w["node_id"] for w in workers_before}) != 2:
            raise RuntimeError(f"the two training workers share a node: {workers_before}")
        victim = next(w for w in workers_before if w["ip"] == self.net.ip["w2"])
        n_events = len(self.events())
        kill_notices = len(self.notices)
        versions_before = sorted({v for _, v in self.notices})
        t_kill = self.now()
        killed = kill_namespace(self.net.ns["w2"])
        log(f"killed node w2 ({victim['node_id'][:12]}): {killed} processes, at step {before['step']} "
            f"({self.now()} s)")
        latest = self.latest_checkpoint()  # what the restarted workers will resume from
        summary["kill"] = {"at_s": t_kill, "node": "w2", "node_id": victim["node_id"], "processes_killed": killed,
                           "step": before["step"], "latest_checkpoint": latest,
                           "current_version": before["current_version"]}
        time.sleep(a.replace_after_s)
        self.start_node("w2", name="ray-w2b")  # the replacement node (same namespace, new node id)
        t_replace = self.now()

        old_ids = {w["actor_id"] for w in workers_before}
        ev = self.wait_event(lambda e: e.get("event") == "tick" and len(e.get("workers", [])) == 2
                             and not ({w["actor_id"] for w in e["workers"]} & old_ids)
                             and e.get("status") == "training",
                             a.phase_timeout_s, "a restarted worker group", start=n_events)
        t_group = self.now()
        workers_after = ev["workers"]
        log(f"worker group restarted on {[w['ip'] for w in workers_after]} ({self.now()} s)")

        deadline = time.monotonic() + a.phase_timeout_s
        while True:
            after = [v for t, v in self.notices[kill_notices:] if t >= t_group]
            if len(after) >= a.versions_after:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(after)} versions published after the restart")
            if self.procs["driver"].poll() is not None:
                raise RuntimeError("the learner driver exited")
            time.sleep(0.25)
        t_first_after = next(t for t, v in self.notices[kill_notices:] if t >= t_group)
        (self.dir / "stop").write_text("stop")
        final = self.wait_event(lambda e: e.get("event") == "final", 180, "the learner's stop", start=n_events)
        summary["driver_exit"] = self._wait_proc("driver", 60)
        for name in [n for n in self.procs if n.startswith("robot-") or n == "follower"]:
            self.procs[name].send_signal(signal.SIGTERM)
        self._stop.set()

        # ---- checks, from this namespace: the registry in Redis and the manifests in S3
        import redis

        from fleetloop.buffer.store import open_store
        from fleetloop.config import S3Settings
        from fleetloop.release.registry import PolicyRegistry
        store = open_store(self.store_uri, S3Settings(endpoint_url=self.s3_endpoint, access_key="test",
                                                      secret_key="test"))
        registry = PolicyRegistry(store, redis.Redis.from_url(self.redis_url))
        indexed = registry.list_versions()
        names = [v["version"] for v in indexed]
        announced = [v for _, v in self.notices]
        steps = {v["version"]: v.get("learner_step") for v in indexed}
        manifests_ok = all(registry.manifest(v).version == v for v in names)
        after_kill = [v for v in announced[kill_notices:]]
        reused = (len(announced) - len(set(announced))) + (len(names) - len(set(names)))
        numbers = sorted(int(v.lstrip("v")) for v in names)
        follower = [json.loads(x) for x in (self.dir / "follower.jsonl").read_text().splitlines()] \
            if (self.dir / "follower.jsonl").exists() else []
        nodes_after = final.get("nodes", [])
        summary.update({
            "placement": {"replay_actor": {"before_kill": before.get("replay"), "after_recovery": ev.get("replay")},
                          "train_controller": {"before_kill": before.get("controller"),
                                               "after_recovery": ev.get("controller")}},
            "nodes": {"before_kill": nodes_before, "after_recovery": nodes_after},
            "train_workers": {"before_kill": workers_before, "after_recovery": workers_after},
            "steps": {"at_kill": before["step"], "resumed_from_checkpoint": latest.get("step"),
                      "redone": before["step"] - int(latest.get("step") or 0),
                      "first_after_kill": steps.get(after_kill[0]) if after_kill else None,
                      "final": final["stats"].get("step")},
            "versions": {
                "before_kill": versions_before, "after_kill": after_kill,
                "published_total": len(names), "numbers_contiguous": numbers == list(range(numbers[0], numbers[-1] + 1)),
                "after_kill_all_higher": bool(after_kill) and min(after_kill) > max(versions_before),
                "reused": reused, "manifests_match": manifests_ok,
                "learner_steps": [steps[v] for v in names],
                "parents": {v: registry.manifest(v).parent_version for v in names},
            },
            "recovery": {"node_replaced_after_s": round(t_replace - t_kill, 1),
                         "worker_group_restarted_s": round(t_group - t_kill, 1),
                         "first_version_after_kill_s": round(t_first_after - t_kill, 1)},
            "robots": {"count": a.robots, "episodes_indexed": (final["stats"].get("consumer") or {}).get("indexed"),
                       "versions_fetched_by_follower": len(follower),
                       "follower_in": self.net.ns["robots"]},
            "learner_final": {k: final["stats"].get(k) for k in ("status", "step", "versions_published",
                                                                  "current_version", "last_checkpoint", "error")},
        })
        summary["ok"] = bool(reused == 0 and summary["versions"]["after_kill_all_higher"] and manifests_ok
                             and len({w["node_id"] for w in workers_before}) == 2
                             and len({w["node_id"] for w in workers_after}) == 2
                             and final["stats"].get("status") == "stopped"
                             and len(follower) > 0 and (summary["robots"]["episodes_indexed"] or 0) > 0)
        return summary

    def latest_checkpoint(self) -> dict:
        """The learner's LATEST pointer in the store ({"checkpoint", "step", ...})."""
        from fleetloop.buffer.store import open_store
        from fleetloop.config import S3Settings
        store = open_store(self.store_uri, S3Settings(endpoint_url=self.s3_endpoint, access_key="test",
                                                      secret_key="test"))
        doc = json.loads(store.get("learner/multinode/LATEST"))
        return {"checkpoint": doc.get("checkpoint"), "step": doc.get("step")}

    def _wait_proc(self, name: str, timeout: float) -> int | None:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def teardown(self) -> dict:
        self._stop.set()
        killed = self.net.down()
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        out = {"processes_killed": killed, "leftovers": self.net.leftovers()}
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        return out

    def tail_logs(self, n: int = 15) -> dict:
        out = {}
        for f in sorted((self.dir / "logs").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()
            out[f.stem] = lines[-n:]
        return out


def orchestrate(args) -> int:
    if os.geteuid() != 0:
        print(json.dumps({"ok": False, "error": "needs root (ip netns, veth, bridge)"}))
        return 2
    r = Run(args)
    done = threading.Event()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    def last_resort():
        if not done.is_set():
            r.teardown()
    atexit.register(last_resort)
    summary: dict = {"ok": False}
    try:
        summary = r.main()
    except BaseException as e:  # noqa: BLE001 -- reported in the summary; teardown below either way
        summary = {"ok": False, "error": f"{type(e).__name__}: {e}", "at_s": r.now(),
                   "namespaces": summary.get("namespaces")}
        summary["logs"] = r.tail_logs()
        summary["logs_dir"] = str(r.dir) if args.keep else None
    finally:
        t = time.monotonic()
        try:
            summary["teardown"] = r.teardown()
        finally:
            done.set()
        summary["teardown"]["seconds"] = round(time.monotonic() - t, 1)
        summary["wall_s"] = r.now()
    print(json.dumps(summary, indent=None if args.compact else 2, default=str), flush=True)
    return 0 if summary.get("ok") and not summary["teardown"]["leftovers"] else 1


# ---- inside the head namespace: the learner driver -------------------------------------------

def driver(args) -> int:
    import ray

    from fleetloop.learner.app import LearnerConfig, start_learner
    events = open(args.events, "a", buffering=1)

    def emit(**ev):
        events.write(json.dumps({"t": time.time(), **ev}, default=str) + "\n")

    cfg = LearnerConfig(**json.loads(args.config))
    ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False)
    try:
        deadline = time.monotonic() + 300
        while True:  # the head and two nodes offering the trainer resource
            nodes = _nodes()
            if sum(1 for n in nodes if n["trainer"]) >= 2:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray nodes: {nodes}")
            time.sleep(0.5)
        emit(event="cluster", nodes=nodes, driver_node_id=ray.get_runtime_context().get_node_id())
        handle = start_learner(args.store, args.redis, "hg-dagger", args.init, config=cfg)
        while handle.running and not os.path.exists(args.stop_file):
            try:
                s = handle.stats()
            except Exception as e:  # noqa: BLE001 -- the replay actor restarting
                emit(event="stats_error", error=repr(e))
                time.sleep(1)
                continue
            emit(event="tick", status=s["status"], step=s["step"], versions_published=s["versions_published"],
                 current_version=s["current_version"], last_checkpoint=s.get("last_checkpoint"),
                 indexed=(s.get("consumer") or {}).get("indexed"), workers=_train_workers(),
                 replay=[a["ip"] for a in _actors("ReplayService")],
                 controller=[a["ip"] for a in _actors("TrainController")])
            time.sleep(0.5)
        final = handle.stop(timeout=120)
        emit(event="final", stats=final, error=repr(handle.error) if handle.error else None, nodes=_nodes())
        return 0
    except BaseException as e:  # noqa: BLE001
        emit(event="error", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        ray.shutdown()


def _nodes() -> list[dict]:
    import ray
    return [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": n["Alive"],
             "trainer": bool(n.get("Resources", {}).get(TRAINER))} for n in ray.nodes() if n["Alive"]]


def _actors(class_name: str) -> list[dict]:
    """Live actors of a class: actor id, node id, node IP, pid."""
    from ray._private import state
    out = []
    for aid, a in state.actors().items():
        if class_name in (a.get("ActorClassName") or "") and a.get("State") == "ALIVE":
            addr = a.get("Address") or {}
            out.append({"actor_id": aid, "node_id": addr.get("NodeID", ""), "ip": addr.get("IPAddress", ""),
                        "pid": a.get("Pid")})
    return sorted(out, key=lambda w: w["ip"])


def _train_workers() -> list[dict]:
    return _actors("RayTrainWorker")


# ---- inside the robots namespace: a weight follower -----------------------------------------

def follower(args) -> int:
    """Fetches (and verifies) every version announced, as a robot's weight slot would."""
    import redis

    from fleetloop import config
    from fleetloop.buffer.store import open_store
    from fleetloop.release.registry import PolicyRegistry
    client = redis.Redis.from_url(args.redis, socket_timeout=10)
    registry = PolicyRegistry(open_store(args.store), client)
    ps = client.pubsub(ignore_subscribe_messages=True)
    ps.subscribe(config.POLICY_CHANNEL)
    out = open(args.out, "a", buffering=1)
    while True:
        msg = ps.get_message(timeout=1.0)
        if not msg or msg.get("type") != "message":
            continue
        version = json.loads(msg["data"]).get("version", "")
        t = time.perf_counter()
        m, weights = registry.fetch(version)
        out.write(json.dumps({"version": version, "learner_step": m.learner_step, "bytes": len(weights),
                              "fetch_ms": round(1e3 * (time.perf_counter() - t), 1)}) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    d = sub.add_parser("_driver")
    d.add_argument("--events", required=True)
    d.add_argument("--stop-file", required=True)
    d.add_argument("--store", required=True)
    d.add_argument("--redis", required=True)
    d.add_argument("--init", required=True)
    d.add_argument("--config", required=True)
    f = sub.add_parser("_follower")
    f.add_argument("--store", required=True)
    f.add_argument("--redis", required=True)
    f.add_argument("--out", required=True)
    p.add_argument("--cleanup", action="store_true", help="remove flmn* namespaces and bridges left by killed runs")
    p.add_argument("--robots", type=int, default=2)
    p.add_argument("--episode-kb", type=int, default=64)
    p.add_argument("--episode-interval-s", type=float, default=2.0, help="one episode per robot every N s")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--publish-every", type=int, default=5)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--max-updates-per-s", type=float, default=2.0)
    p.add_argument("--max-failures", type=int, default=3)
    p.add_argument("--versions-before", type=int, default=3, help="versions published before the kill")
    p.add_argument("--versions-after", type=int, default=3, help="versions published after the restart")
    p.add_argument("--replace-after-s", type=float, default=2.0, help="the replacement node joins after this")
    p.add_argument("--node-timeout-s", type=float, default=240)
    p.add_argument("--group-start-timeout-s", type=int, default=180)
    p.add_argument("--phase-timeout-s", type=float, default=300)
    p.add_argument("--workdir", default=None, help="parent of the run's temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the run's directory (logs) afterwards")
    p.add_argument("--compact", action="store_true", help="the JSON summary on one line")
    args = p.parse_args(argv)
    if args.cmd == "_driver":
        return driver(args)
    if args.cmd == "_follower":
        return follower(args)
    if args.cleanup:
        print(json.dumps({"removed": cleanup_all()}))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
