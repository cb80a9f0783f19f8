"""A second-language robot stack (issue 11): the Node.js client of docs/robot-link.md
(docs/examples/node/robot_client.js), loading the .proto files straight from the repository with
@grpc/proto-loader, records a good episode against a real daemon and sees each bad step refused
with its reason while the episode's good steps are kept.

The npm packages are installed by the test into a cache directory (FLEETLOOP_NODE_CACHE, default
~/.cache/fleetloop/node-grpc); the test skips only when node or npm is missing."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fleetloop.actor.daemon import ActorDaemon, FixedPolicySource
from fleetloop.actor.spool import Spool
from fleetloop.buffer.codec import read_manifest
from fleetloop.buffer.store import LocalStore
from fleetloop.proto.v1 import episode_pb2 as pb

from test_robot_contract import NoPolicySource, SpecPolicy, consume

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "docs" / "examples" / "node" / "robot_client.js"
PACKAGES = ["@grpc/grpc-js@1", "@grpc/proto-loader@0"]


@pytest.fixture(scope="module")
def node_modules():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the Node.js robot client test (not installed)")
    cache = Path(os.environ.get("FLEETLOOP_NODE_CACHE", Path.home() / ".cache" / "fleetloop" / "node-grpc"))
    mods = cache / "node_modules"
    if not ((mods / "@grpc" / "grpc-js").is_dir() and (mods / "@grpc" / "proto-loader").is_dir()):
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["npm", "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--silent", *PACKAGES],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"npm install {' '.join(PACKAGES)} failed: {r.stderr[-2000:]}"
    return mods


def run_client(node_modules, address, *args):
    r = subprocess.run(["node", str(CLIENT), address, *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NODE_PATH": str(node_modules)})
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    return {e["event"]: e for e in events}, [e for e in events if e["event"] in ("refused", "accepted")]


def make_daemon(tmp_path, redis_client, source):
    return ActorDaemon("robot-1", LocalStore(tmp_path / "store"), redis_client, Spool(tmp_path / "spool"), source,
                       grpc_address="127.0.0.1:0", heartbeat_interval_s=0.2).start()


def test_node_client_records_an_episode_and_sees_bad_steps_refused(tmp_path, redis_client, node_modules):
    d = make_daemon(tmp_path, redis_client, FixedPolicySource(SpecPolicy()))
    try:
        ev, bad = run_client(node_modules, d.address, "--steps", "12", "--show-refusals", "--robot-id", "robot-1")
        spec = ev["spec"]["spec"]
        assert spec["known"] and spec["state_dim"] == 6 and spec["cameras"] == ["front"]
        assert ev["spec"]["limits"]["max_image_pixels"] == 2048 * 2048
        assert ev["started"]["policy_version"] == "v000003"
        reasons = {b["what"]: b for b in bad}
        assert len(reasons) == 6 and all(b["event"] == "refused" and b["code"] == "INVALID_ARGUMENT" for b in bad), bad
        assert "action has 5 values, the policy's actions have 4" in reasons["wrong action length"]["details"]
        assert "action[0] is NaN" in reasons["NaN in the action"]["details"]
        assert "state has 5 values, the policy expects 6" in reasons["wrong state length"]["details"]
        assert "raw data has 5 bytes" in reasons["raw bytes do not match the size"]["details"]
        assert "the PNG" in reasons["undecodable PNG"]["details"]
        assert "81000000 pixels" in reasons["huge image"]["details"]
        end = ev["ended"]
        assert end["num_steps"] == 12 and end["spooled"] and end["reported"] == 12
        index, consumer = consume(d.store, redis_client, 1)
        e = index.get(end["episode_id"])
        assert e is not None and e.num_steps == 12 and e.outcome == "success"
        assert consumer.stats.dead_lettered == 0
    finally:
        d.stop()


def test_node_client_records_a_demonstration_before_any_policy(tmp_path, redis_client, node_modules):
    d = make_daemon(tmp_path, redis_client, NoPolicySource())
    try:
        ev, _ = run_client(node_modules, d.address, "--steps", "5", "--demonstration")
        assert not ev["spec"]["spec"]["known"]
        assert ev["ended"]["num_steps"] == 5
        index, _ = consume(d.store, redis_client, 1)
        m = read_manifest(d.store, index.get(ev["ended"]["episode_id"]).manifest_key)
        assert m.kind == pb.EPISODE_KIND_DEMONSTRATION and m.policy_version == ""
        assert [(s.start_step, s.end_step, s.operator) for s in m.interventions] == [(0, 5, "node-teleop")]
    finally:
        d.stop()
