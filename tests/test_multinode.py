"""The learner across Ray nodes: tests/multinode_harness.py (the command: scripts/multinode.py)
builds a head and two worker nodes in their own network namespaces (plus one for robots), trains
with one DDP worker on each worker node, kills one node mid-training and checks that Ray Train
restarts the group, the learner resumes from its checkpoint, versions keep coming and no version
number is used twice. About 2-3 minutes here.
Needs root and `ip netns` (CI runs as root); skipped otherwise."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "multinode_harness.py"


def _netns_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces, veth pairs and a bridge (CI runs as root)"
    for tool in ("ip", "redis-server"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` on PATH"
    probe = f"flmnprobe{uuid.uuid4().hex[:4]}"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"`ip netns add` does not work here: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    p = subprocess.run(["ip", "link", "add", probe, "type", "bridge"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"cannot create a bridge here: {p.stderr.strip()}"
    subprocess.run(["ip", "link", "del", probe], capture_output=True)
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_learner_across_ray_nodes_survives_a_node_kill():
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    p = subprocess.run([sys.executable, str(SCRIPT), "--compact"], capture_output=True, text=True, timeout=840)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    assert lines, f"no summary (rc {p.returncode}); stderr:\n{p.stderr[-4000:]}"
    s = json.loads(lines[-1])
    assert s["ok"], json.dumps(s, indent=1)[-6000:]
    assert p.returncode == 0

    workers = s["train_workers"]
    ips = s["namespaces"]
    for phase in ("before_kill", "after_recovery"):  # one rank on each worker node, never on the head
        assert sorted(w["ip"] for w in workers[phase]) == sorted([ips["w1"]["ip"], ips["w2"]["ip"]])
        assert len({w["node_id"] for w in workers[phase]}) == 2
    killed = s["kill"]["node_id"]
    assert killed not in {w["node_id"] for w in workers["after_recovery"]}  # the replacement is a new node
    assert s["placement"]["replay_actor"]["before_kill"] == [ips["head"]["ip"]]

    v = s["versions"]
    assert v["reused"] == 0 and v["numbers_contiguous"] and v["manifests_match"]
    assert len(v["before_kill"]) >= 3 and len(v["after_kill"]) >= 3
    assert v["after_kill_all_higher"]
    assert v["parents"][v["after_kill"][0]] in v["before_kill"]  # lineage: from the checkpoint's version
    st = s["steps"]
    assert st["resumed_from_checkpoint"] is not None and st["resumed_from_checkpoint"] <= st["at_kill"]
    assert st["first_after_kill"] > st["resumed_from_checkpoint"]
    assert s["robots"]["episodes_indexed"] > 0 and s["robots"]["versions_fetched_by_follower"] > 0
    assert s["learner_final"]["status"] == "stopped" and s["learner_final"]["error"] is None

    # Torn down: no namespace, bridge or Ray process of this run is left.
    assert s["teardown"]["leftovers"] == []
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not {n for n in after - before if n.startswith(f"flmn{s['tag']}-")}
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"/tmp/flmn{s['tag']}/" not in ps
