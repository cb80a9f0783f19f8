#!/bin/sh
# One-shot MinIO setup for fleetloop (the compose service `minio-init`, image minio/mc):
#   1. create the bucket the store URI names (s3://$S3_BUCKET/...), if it does not exist;
#   2. create one MinIO user per identity that `fleetloop credentials issue` wrote into
#      $FLEETLOOP_MINIO_SECRETS (deploy/secrets/minio, mounted read-only): `users` holds
#      "<who> <secret>" lines, `policy-<who>.json` each one's S3 policy. learner, dashboard,
#      fleetloop-admin and every robot get only what their policy allows (docs/security.md), so
#      no service or robot holds the MinIO root credentials.
# Idempotent: safe to run on every `docker compose up` (re-creating a user updates its secret,
# re-creating a policy updates it; robots issued later are added). Exits non-zero on any failure,
# which keeps the services that depend on it (condition: service_completed_successfully) from
# starting.
set -eu

: "${MINIO_URL:=http://minio:9000}"
: "${MINIO_ROOT_USER:?MINIO_ROOT_USER is not set}"
: "${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is not set}"
: "${S3_BUCKET:?S3_BUCKET is not set}"
: "${FLEETLOOP_MINIO_SECRETS:=/etc/fleetloop/minio}"

users="${FLEETLOOP_MINIO_SECRETS}/users"
if [ ! -r "${users}" ]; then
  echo "minio-init: ${users} is missing: run 'fleetloop credentials issue --robots ... --out deploy/secrets' first (docs/deploy.md)" >&2
  exit 1
fi

mc alias set fleet "${MINIO_URL}" "${MINIO_ROOT_USER}" "${MINIO_ROOT_PASSWORD}" >/dev/null
mc mb --ignore-existing "fleet/${S3_BUCKET}"

n=0
while read -r who secret; do
  [ -n "${who}" ] || continue
  policy="${FLEETLOOP_MINIO_SECRETS}/policy-${who}.json"
  if [ ! -r "${policy}" ] || [ -z "${secret}" ]; then
    echo "minio-init: ${who}: no policy-${who}.json or no secret in ${users}" >&2
    exit 1
  fi
  if [ "${who}" = "${MINIO_ROOT_USER}" ]; then
    echo "minio-init: ${who} is the MinIO root user's name; pick another MINIO_ROOT_USER" >&2
    exit 1
  fi
  mc admin policy create fleet "fleetloop-${who}" "${policy}" >/dev/null
  mc admin user add fleet "${who}" "${secret}" >/dev/null
  if ! out="$(mc admin policy attach fleet "fleetloop-${who}" --user "${who}" 2>&1)"; then
    case "${out}" in
      *"already"*) ;;  # attached on an earlier run
      *) echo "${out}" >&2; exit 1 ;;
    esac
  fi
  n=$((n + 1))
done < "${users}"
echo "minio-init: bucket ${S3_BUCKET} ready; ${n} users with their own policies"
