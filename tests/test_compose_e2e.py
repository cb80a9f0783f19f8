"""`docker compose up`, for real: deploy/e2e.sh builds the images from what this machine can reach,
brings the cloud side up in containers, runs two robots' actor daemons in theirs, and checks the
loop, the dashboard, and restarts of Redis, the learner and a robot (deploy/e2e.py says how).

Slow (minutes; the images are cached in the engine's data root between runs). Skips, with the
reason, only where no Docker engine answers and none can be started (not root, no dockerd)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]


def engine_available() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0:
        return None
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        return "no Docker engine answers and none can be started here (needs root and Debian's docker.io)"
    return None


def test_compose_up_end_to_end(tmp_path):
    reason = engine_available()
    if reason:
        pytest.skip(reason)
    p = subprocess.run(["bash", str(REPO / "deploy" / "e2e.sh"), "--json", "--logs", str(tmp_path / "logs")],
                       cwd=REPO, capture_output=True, text=True, timeout=2900)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON from deploy/e2e.sh (exit {p.returncode}):\n{p.stderr[-4000:]}"
    result = json.loads(lines[-1])
    if p.returncode == 3:
        pytest.skip(result.get("skipped", "no Docker engine"))
    logs = "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted((tmp_path / "logs").glob("*.log")))
    assert p.returncode == 0 and result["ok"], f"{json.dumps(result, indent=1)}\n{p.stderr[-4000:]}\n{logs}"
    assert set(result["services_healthy"]) >= {"redis", "minio", "ray-head", "dashboard"}
    assert result["episodes_indexed"] > 0
    assert sorted(result["robots_loaded_version"]) == sorted(result["robots"]) and len(result["robots"]) >= 2
    assert result["dashboard_ok"] is True and result["takeover_audited"] is True
    assert result["lost"] == 0 and result["duplicates"] == 0
    assert len(result["restarts_survived"]) == 3
    assert result["down_clean"] is True
