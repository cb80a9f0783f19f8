#!/usr/bin/env bash
# The cloud side in containers, end to end (deploy/e2e.py says what is checked; docs/deploy.md,
# "Checking a deployment end to end"). Installs what it needs first: fleetloop's virtualenv
# (./dev setup) and, as root on Debian, docker.io, docker-compose and debootstrap.
#
#   bash deploy/e2e.sh --json
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[e2e] installing ${missing[*]}" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1 \
    || echo "[e2e] could not install ${missing[*]}" >&2
fi
./dev setup
exec .venv/bin/python deploy/e2e.py "$@"
