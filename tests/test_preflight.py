"""deploy/preflight.py: each mistake a compose user makes before `docker compose up` ends in one
line naming what to fix (instead of a container that restarts forever), and a good setup passes."""
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from envfile import env_example

REPO = Path(__file__).resolve().parents[1]
PREFLIGHT = REPO / "deploy" / "preflight.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def issued(tmp_path_factory):
    out = tmp_path_factory.mktemp("issued") / "secrets"
    done = subprocess.run([sys.executable, "-m", "fleetloop.cli", "credentials", "issue", "--robots", "arm-1",
                           "--out", str(out), "--prefix", "fleet", "--no-keys"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def project(tmp_path: Path, issued: Path, **changes) -> Path:
    env = env_example()
    env.update(MINIO_ROOT_PASSWORD="a-long-enough-root-password", FLEETLOOP_OPERATOR_TOKENS="alice:" + "t" * 24)
    for port in ("REDIS_PORT", "MINIO_PORT", "MINIO_CONSOLE_PORT", "DASHBOARD_PORT", "RAY_DASHBOARD_PORT", "INGEST_PORT"):
        env[port] = str(free_port())
    env.update(REDIS_BIND="127.0.0.1", MINIO_BIND="127.0.0.1", DASHBOARD_BIND="127.0.0.1", INGEST_BIND="127.0.0.1")
    env.update(changes)
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    shutil.copytree(issued, tmp_path / "deploy" / "secrets")
    return tmp_path


def preflight(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREFLIGHT), "--project-directory", str(directory)],
                          capture_output=True, text=True, timeout=60)


def problems(p: subprocess.CompletedProcess) -> list[str]:
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert all(line.startswith("preflight: ") for line in lines), lines
    return lines


def test_a_good_setup_passes(tmp_path, issued):
    p = preflight(project(tmp_path, issued))
    assert p.returncode == 0 and p.stdout.strip() == "preflight: ok", p.stderr


def test_no_env_file(tmp_path):
    [line] = problems(preflight(tmp_path))
    assert ".env is missing" in line and "cp .env.example .env" in line


def test_change_me_left_and_short_minio_password(tmp_path, issued):
    lines = problems(preflight(project(tmp_path, issued, MINIO_ROOT_PASSWORD="short",
                                       FLEETLOOP_VIEWER_TOKENS="wall:change-me-viewer")))
    assert any("MINIO_ROOT_PASSWORD" in x and "shorter than 8" in x for x in lines), lines
    assert any("FLEETLOOP_VIEWER_TOKENS" in x and "change-me" in x for x in lines), lines


def test_short_operator_token(tmp_path, issued):
    [line] = problems(preflight(project(tmp_path, issued, FLEETLOOP_OPERATOR_TOKENS="alice:shorty")))
    assert "FLEETLOOP_OPERATOR_TOKENS" in line and "at least 12" in line and "shorty" not in line


def test_missing_secret_file(tmp_path, issued):
    d = project(tmp_path, issued)
    (d / "deploy" / "secrets" / "redis" / "users.acl").unlink()
    [line] = problems(preflight(d))
    assert "redis/users.acl" in line and "fleetloop credentials issue" in line


def test_secrets_issued_for_another_store(tmp_path, issued):
    [line] = problems(preflight(project(tmp_path, issued, S3_PREFIX="elsewhere")))
    assert "s3://fleetloop/fleet" in line and "s3://fleetloop/elsewhere" in line


def test_port_already_taken(tmp_path, issued):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        [line] = problems(preflight(project(tmp_path, issued, REDIS_PORT=str(port))))
    assert f"port {port} (REDIS_PORT) is taken" in line and "set REDIS_PORT" in line
