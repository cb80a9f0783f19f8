"""Shared fixtures: real servers on free loopback ports, one of each per test session."""
from __future__ import annotations

import os

import pytest
import redis

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

from fleetloop.config import S3Settings  # noqa: E402
from fleetloop.services import MotoS3Server, RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_server():
    with MotoS3Server() as server:
        yield server


@pytest.fixture
def s3_settings(s3_server):
    env = s3_server.env()
    return S3Settings(endpoint_url=env["FLEETLOOP_S3_ENDPOINT"], access_key="test", secret_key="test")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (starting one costs seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def isolated_bases(tmp_path_factory, monkeypatch):
    """resolve_base finds only the VLA bases a test provisions: not a developer's
    ~/.fleetloop/bases, nor FLEETLOOP_BASE_DIRS from the environment. Modules that build hf-vla
    policies use it for every test: pytestmark = pytest.mark.usefixtures("isolated_bases")."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.setenv("FLEETLOOP_BASE_DIRS", "")
