#!/usr/bin/env bash
# Build every image docker-compose.yml (with deploy/compose.local.yml) needs from what this machine
# can reach -- Debian's package archive and PyPI -- for a host where no image registry is reachable.
# Real users with a registry do not need this: `docker compose build` pulls python/redis/minio.
#
#   deploy/images.sh            build what is missing or out of date (a re-run is cheap: Docker's
#                               layer cache, and the base rootfs is built once per Debian suite)
#
# What it builds (tags can be changed with the variables below):
#   $LOCAL_BASE_IMAGE   fleetloop-local/debian:bookworm   debootstrap'd Debian (minbase) with
#                       python3, venv, redis-server, wget, libosmesa6, imported with `docker import`
#   $REDIS_IMAGE        fleetloop-local/redis:7.0          Debian's redis-server on that base
#   $S3_IMAGE           fleetloop-local/s3:moto            moto's S3 server (stands in for MinIO)
#   $FLEETLOOP_IMAGE    fleetloop:cpu                      deploy/Dockerfile.cpu on that base
#
# pip runs on the host (its CA bundle and pip configuration stay on the host): it fills
# deploy/wheelhouse/ with every wheel the images install, and the image builds install from there
# with PIP_NO_INDEX=1, so nothing of the host's configuration is baked into an image.
# Needs root (debootstrap), a running Docker engine (DOCKER_HOST), and python3 with pip.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
LOCAL_BASE_IMAGE="${LOCAL_BASE_IMAGE:-fleetloop-local/debian:${SUITE}}"
REDIS_IMAGE="${REDIS_IMAGE:-fleetloop-local/redis:7.0}"
S3_IMAGE="${S3_IMAGE:-fleetloop-local/s3:moto}"
FLEETLOOP_IMAGE="${FLEETLOOP_IMAGE:-fleetloop:cpu}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
RAY_VERSION="${RAY_VERSION:-2.60.0}"
MOTO_SPEC="${MOTO_SPEC:-moto[server]>=5.0}"
PY="${PYTHON:-python3}"
WHEELS=deploy/wheelhouse
# Packages of the base rootfs: what the fleetloop image's final stage would otherwise apt-get
# (wget, libosmesa6), Python, and Redis for the redis image.
BASE_PACKAGES="ca-certificates,python3,python3-venv,redis-server,redis-tools,wget,libosmesa6,procps"

log() { echo "[images] $*" >&2; }
die() { echo "[images] error: $*" >&2; exit 1; }

command -v docker >/dev/null || die "no docker client on PATH (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers at ${DOCKER_HOST:-the default socket}; start dockerd (deploy/e2e.sh starts one)"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# The legacy builder (what a Docker engine without buildx uses) sends the whole context and knows
# no per-Dockerfile .dockerignore, so each build gets a staged context of exactly what it copies.
build() {  # build TAG DOCKERFILE CONTEXT [docker build args...]
  local tag="$1" dockerfile="$2" context="$3"; shift 3
  log "building ${tag} (${dockerfile})"
  local t0=$SECONDS
  if ! DOCKER_BUILDKIT=0 docker build -q -t "${tag}" -f "${dockerfile}" "$@" "${context}" >"${context}.log" 2>&1; then
    tail -n 30 "${context}.log" >&2
    die "the image ${tag} did not build (${dockerfile}); the log's end is above"
  fi
  log "built ${tag} in $((SECONDS - t0)) s"
}

# -- 1. the Debian base: debootstrap + docker import (once per suite and package list) ----------
base_id="$(printf '%s %s %s' "${SUITE}" "${MIRROR}" "${BASE_PACKAGES}" | sha256sum | cut -c1-12)"
if [ "$(docker image inspect -f '{{ index .Config.Labels "fleetloop.base-id" }}' "${LOCAL_BASE_IMAGE}" 2>/dev/null)" != "${base_id}" ]; then
  command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  rootfs="$(mktemp -d /var/tmp/fleetloop-rootfs.XXXXXX)"
  trap 'rm -rf "${rootfs}"' EXIT
  log "debootstrap ${SUITE} (minbase + ${BASE_PACKAGES}) from ${MIRROR}"
  t0=$SECONDS
  debootstrap --variant=minbase --include="${BASE_PACKAGES}" "${SUITE}" "${rootfs}" "${MIRROR}" \
    >"${rootfs}.log" 2>&1 || { tail -n 20 "${rootfs}.log" >&2; die "debootstrap failed"; }
  # `python` as the official image names it; no apt lists or caches in the image.
  ln -sf /usr/bin/python3 "${rootfs}/usr/local/bin/python"
  rm -rf "${rootfs}"/var/lib/apt/lists/* "${rootfs}"/var/cache/apt/*.bin "${rootfs}"/var/cache/apt/archives/*.deb
  tar -C "${rootfs}" -c . | docker import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL fleetloop.base-id=${base_id}" \
    --change 'CMD ["/bin/bash"]' - "${LOCAL_BASE_IMAGE}" >/dev/null
  rm -rf "${rootfs}" "${rootfs}.log"
  trap - EXIT
  log "imported ${LOCAL_BASE_IMAGE} in $((SECONDS - t0)) s"
else
  log "${LOCAL_BASE_IMAGE} is up to date"
fi

# -- 2. the wheelhouse: every wheel the images install, fetched by the host's pip ---------------
stage="$(mktemp -d /var/tmp/fleetloop-build.XXXXXX)"
trap 'rm -rf "${stage}" "${stage}".*.log' EXIT
"${PY}" - >"${stage}/requirements.txt" <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extra = project["optional-dependencies"]
print("\n".join(project["dependencies"] + extra["sim"] + extra["vla"]))
EOF
{
  cat "${stage}/requirements.txt"
  echo "torch==${TORCH_VERSION}"
  echo "ray[default,train]==${RAY_VERSION}"
  echo "${MOTO_SPEC}"
  # Markers are evaluated for the host's Python by `pip wheel`; Debian bookworm's 3.11.2 also needs:
  echo "async-timeout>=4.0.3"
  # pip's isolated build of fleetloop itself (pyproject's build-system.requires)
  echo "setuptools>=77"; echo "wheel"; echo "grpcio-tools>=1.60"
} >"${stage}/wheelhouse.txt"
want="$(sha256sum "${stage}/wheelhouse.txt" | cut -c1-16)"
if [ "$(cat "${WHEELS}/.complete" 2>/dev/null)" != "${want}" ]; then
  log "filling ${WHEELS}/ with the host's pip (torch ${TORCH_VERSION} CPU, ray ${RAY_VERSION}, fleetloop's dependencies, moto)"
  t0=$SECONDS
  printf 'torch==%s\nray==%s\n' "${TORCH_VERSION}" "${RAY_VERSION}" >"${stage}/constraints.txt"
  "${PY}" -m pip wheel -q --wheel-dir "${WHEELS}" -c "${stage}/constraints.txt" -r "${stage}/wheelhouse.txt" \
    >"${stage}/pip.log" 2>&1 || { tail -n 30 "${stage}/pip.log" >&2; die "pip could not fetch the wheels"; }
  echo "${want}" >"${WHEELS}/.complete"
  log "wheelhouse ready in $((SECONDS - t0)) s ($(du -sh "${WHEELS}" | cut -f1))"
else
  log "${WHEELS}/ is up to date"
fi

# A staged build context: only what a Dockerfile copies (its .dockerignore's allow-list).
stage_context() {  # stage_context DIR PATH...
  local dir="$1"; shift
  mkdir -p "${dir}"
  for p in "$@"; do
    cp -a --parents "${p}" "${dir}/"
  done
  find "${dir}" -name __pycache__ -prune -exec rm -rf {} +
  rm -f "${dir}"/proto/v1/*_pb2.py "${dir}"/proto/v1/*_pb2.pyi "${dir}"/proto/v1/*_pb2_grpc.py
}

# -- 3. redis: Debian's redis-server on the base ------------------------------------------------
mkdir -p "${stage}/redis"
cp deploy/local/Dockerfile.redis "${stage}/redis/Dockerfile"
build "${REDIS_IMAGE}" "${stage}/redis/Dockerfile" "${stage}/redis" --build-arg "BASE_IMAGE=${LOCAL_BASE_IMAGE}"

# -- 4. the S3 stand-in: moto's server, from the wheelhouse ------------------------------------
stage_context "${stage}/s3" deploy/wheelhouse deploy/local/Dockerfile.s3
build "${S3_IMAGE}" "${stage}/s3/deploy/local/Dockerfile.s3" "${stage}/s3" \
  --build-arg "BASE_IMAGE=${LOCAL_BASE_IMAGE}" --build-arg "MOTO_SPEC=${MOTO_SPEC}"

# -- 5. fleetloop:cpu: deploy/Dockerfile.cpu, unchanged, on the local base, wheels only ----------
stage_context "${stage}/fleetloop" pyproject.toml setup.py README.md fleetloop actor buffer learner proto \
  deploy/ray-worker.sh deploy/wheelhouse
build "${FLEETLOOP_IMAGE}" deploy/Dockerfile.cpu "${stage}/fleetloop" \
  --build-arg "PYTHON_IMAGE=${LOCAL_BASE_IMAGE}" --build-arg PIP_NO_INDEX=1 \
  --build-arg "TORCH_VERSION=${TORCH_VERSION}" --build-arg "RAY_VERSION=${RAY_VERSION}"
# Each rebuild after a code change leaves the previous images untagged (a few GB each, the venv
# layer): drop them so a machine that rebuilds on every CI run does not fill its disk.
docker image prune -f >/dev/null || log "could not prune untagged images"
log "images ready: ${LOCAL_BASE_IMAGE} ${REDIS_IMAGE} ${S3_IMAGE} ${FLEETLOOP_IMAGE}"
