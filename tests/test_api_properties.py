"""Property-based test of the operator API against its own OpenAPI document: the real
`fleetloop dashboard` process (uvicorn) on a free port, a real Redis, a real actor daemon on the
gRPC robot link, real published policy versions and a real recorded episode; then schemathesis'
command line, with the operator token and every check on (no server error, no schema
violation, no undocumented status code or content type, schema-valid requests accepted,
schema-invalid ones refused, Allow headers right, auth enforced). Afterwards the service still
answers and the audit log still lists.

Run time is bounded with --max-examples (FLEETLOOP_API_EXAMPLES, default 25 per operation) so the
suite stays within CI's budget; FLEETLOOP_API_SEED reproduces a run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fleetloop import config
from fleetloop.actor.link import RobotLinkClient
from fleetloop.buffer.store import LocalStore
from fleetloop.release.registry import PolicyRegistry
from fleetloop.services import free_port

from test_dashboard import ConstantPolicy, record_episode, wait_for  # noqa: F401  (shared helpers)

OP_TOKEN = "prop-operator-token-0001"
VIEWER_TOKEN = "prop-viewer-token-0001"

st_bin = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
pytestmark = pytest.mark.skipif(st_bin is None, reason="schemathesis is not installed")


def _schemathesis_config(path: Path, robots, episodes, versions) -> Path:
    """Known ids, used half the time, so the run reaches the routes' logic, not only their 404s."""
    def words(name, values):
        return f"[dictionaries.{name}]\nvalues = {json.dumps(list(values))}\n"
    text = (words("robots", robots) + words("episodes", episodes) + words("versions", versions) + "\n"
            "[parameters]\n"
            '"path.robot_id" = { dictionary = "robots", probability = 0.5 }\n'
            '"path.episode_id" = { dictionary = "episodes", probability = 0.5 }\n'
            '"path.version" = { dictionary = "versions", probability = 0.5 }\n'
            '"body.version" = { dictionary = "versions", probability = 0.5 }\n'
            '"body.robot_ids[*]" = { dictionary = "robots", probability = 0.5 }\n')
    path.write_text(text)
    return path


def _dashboard(tmp_path: Path, redis_url: str, store_dir: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETLOOP_")}
    env.update(FLEETLOOP_HOME=str(tmp_path / "home"), FLEETLOOP_REDIS_URL=redis_url,
               FLEETLOOP_STORE=store_dir.resolve().as_uri(), PYTHONUNBUFFERED="1",
               FLEETLOOP_OPERATOR_TOKENS=f"alice:{OP_TOKEN}", FLEETLOOP_VIEWER_TOKENS=f"wall:{VIEWER_TOKEN}")
    port = free_port()
    log = open(tmp_path / "dashboard.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "fleetloop.cli", "dashboard", "--port", str(port),
                             "--offline-after", "30", "--access-log"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}", tmp_path / "dashboard.log"


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_openapi_properties_against_the_running_service(tmp_path, redis_server, redis_client):
    from fleetloop.actor.daemon import ActorDaemon, FixedPolicySource
    from fleetloop.actor.spool import Spool
    store_dir = tmp_path / "store"
    store = LocalStore(store_dir)
    registry = PolicyRegistry(store, redis_client)
    versions = [registry.publish(f"weights-{i}".encode() * 100, json.dumps({"i": i}), learner_step=i,
                                 algorithm="hg-dagger", metrics={"loss": 1.0 / i}).version for i in (1, 2)]
    daemon = ActorDaemon("robot-1", store, redis_client, Spool(tmp_path / "spool"),
                         FixedPolicySource(ConstantPolicy(versions[0])), grpc_address="127.0.0.1:0",
                         heartbeat_interval_s=0.2, episode_idle_timeout_s=30).start()
    proc = None
    try:
        wait_for(lambda: redis_client.pubsub_numsub(config.CONTROL_CHANNEL_PREFIX + "robot-1")[0][1] >= 1,
                 what="robot-1 subscribed")
        eid = record_episode(RobotLinkClient(daemon.address, "robot-1"), intervene=(2, 4))
        proc, base, log_path = _dashboard(tmp_path, redis_server.url, store_dir)
        wait_for(lambda: _up(base), timeout=60, what="dashboard up")
        op = {"Authorization": f"Bearer {OP_TOKEN}"}
        wait_for(lambda: httpx.get(f"{base}/api/episodes/{eid}", headers=op).status_code == 200, timeout=30,
                 what="episode indexed")

        cfg = _schemathesis_config(tmp_path / "schemathesis.toml", ["robot-1", "robot-2", "all"], [eid],
                                   versions + ["v999999"])
        cmd = [st_bin, "--config-file", str(cfg), "run", f"{base}/openapi.json",
               "-H", f"Authorization: Bearer {OP_TOKEN}", "--checks", "all",
               "--max-examples", os.environ.get("FLEETLOOP_API_EXAMPLES", "25"),
               "--request-timeout", "20", "--workers", "1", "--no-color",
               "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml")]
        if os.environ.get("FLEETLOOP_API_SEED"):
            cmd += ["--seed", os.environ["FLEETLOOP_API_SEED"]]
        t0 = time.monotonic()
        run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        took = time.monotonic() - t0
        summary = run.stdout[-6000:]
        print(f"schemathesis took {took:.1f} s\n{summary}")
        assert run.returncode == 0, f"schemathesis found problems (exit {run.returncode}):\n{summary}\n{run.stderr[-2000:]}"
        assert " passed" in run.stdout

        # The service still answers, the audit log still lists (every entry readable), and the
        # token never reached the access log.
        assert _up(base)
        assert httpx.get(f"{base}/api/whoami", headers=op).json()["role"] == "operator"
        audit = httpx.get(f"{base}/api/audit", headers=op, params={"limit": 1000})
        assert audit.status_code == 200 and audit.json()["entries"]
        assert OP_TOKEN not in log_path.read_text()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        daemon.stop()
