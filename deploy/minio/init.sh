#!/bin/sh
# One-shot MinIO setup for fleetloop (the compose service `minio-init`, image minio/mc):
#   1. create the bucket the store URI names (s3://$S3_BUCKET/...), if it does not exist;
#   2. create the fleetloop user ($AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY) with a policy that
#      allows everything on that bucket and nothing else, so the services and robots never hold
#      the MinIO root credentials.
# Idempotent: safe to run on every `docker compose up`. Exits non-zero on any failure, which
# keeps the services that depend on it (condition: service_completed_successfully) from starting.
set -eu

: "${MINIO_URL:=http://minio:9000}"
: "${MINIO_ROOT_USER:?MINIO_ROOT_USER is not set}"
: "${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is not set}"
: "${S3_BUCKET:?S3_BUCKET is not set}"
: "${AWS_ACCESS_KEY_ID:?AWS_ACCESS_KEY_ID is not set}"
: "${AWS_SECRET_ACCESS_KEY:?AWS_SECRET_ACCESS_KEY is not set}"

mc alias set fleet "${MINIO_URL}" "${MINIO_ROOT_USER}" "${MINIO_ROOT_PASSWORD}" >/dev/null
mc mb --ignore-existing "fleet/${S3_BUCKET}"

if [ "${AWS_ACCESS_KEY_ID}" = "${MINIO_ROOT_USER}" ]; then
  echo "minio-init: the services use the MinIO root user; no fleetloop user created"
  exit 0
fi

policy_file="$(mktemp)"
cat >"${policy_file}" <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::${S3_BUCKET}"]},
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                   "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::${S3_BUCKET}/*"]}
  ]
}
EOF
mc admin policy create fleet fleetloop-bucket "${policy_file}"
rm -f "${policy_file}"
mc admin user add fleet "${AWS_ACCESS_KEY_ID}" "${AWS_SECRET_ACCESS_KEY}"
if ! out="$(mc admin policy attach fleet fleetloop-bucket --user "${AWS_ACCESS_KEY_ID}" 2>&1)"; then
  case "${out}" in
    *"already"*) ;;  # attached on an earlier run
    *) echo "${out}" >&2; exit 1 ;;
  esac
fi
echo "minio-init: bucket ${S3_BUCKET} ready; user ${AWS_ACCESS_KEY_ID} may use it"
