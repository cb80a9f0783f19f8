"""One-shot S3 setup for deploy/compose.local.yml (the `minio-init` service there): the bucket the
store URI names, on the S3 server that stands in for MinIO. Reads the same environment and the
same issued files as deploy/minio/init.sh; moto has no users to create, so it only checks that
every identity `fleetloop credentials issue` wrote has its keys. Exits non-zero, with one line
saying what to fix, on any failure (the services that depend on it then do not start)."""
import os
import sys
import time
from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError


def fail(message: str) -> None:
    print(f"s3-init: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    url = os.environ.get("MINIO_URL", "http://minio:9000")
    bucket = os.environ.get("S3_BUCKET") or fail("S3_BUCKET is not set")
    secrets = Path(os.environ.get("FLEETLOOP_MINIO_SECRETS", "/etc/fleetloop/minio"))
    users = secrets / "users"
    if not users.is_file():
        fail(f"{users} is missing: run 'fleetloop credentials issue --robots ... --out deploy/secrets' first (docs/deploy.md)")
    try:
        listed = users.read_text().splitlines()
    except OSError as e:
        fail(f"cannot read {users}: {e.strerror}")
    identities = []
    for line in listed:
        who, _, secret = line.strip().partition(" ")
        if not who:
            continue
        if not secret or not (secrets / f"policy-{who}.json").is_file():
            fail(f"{who}: no policy-{who}.json or no secret in {users}")
        identities.append(who)
    s3 = boto3.client("s3", endpoint_url=url, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                      aws_access_key_id=os.environ.get("MINIO_ROOT_USER") or fail("MINIO_ROOT_USER is not set"),
                      aws_secret_access_key=os.environ.get("MINIO_ROOT_PASSWORD") or fail("MINIO_ROOT_PASSWORD is not set"))
    for attempt in range(10):
        try:
            existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            if bucket not in existing:
                s3.create_bucket(Bucket=bucket)
            break
        except (BotoCoreError, ClientError) as e:
            if attempt == 9:
                fail(f"cannot create bucket {bucket} at {url}: {e}")
            time.sleep(1)
    print(f"s3-init: bucket {bucket} ready; {len(identities)} identities issued "
          f"(this S3 server accepts their keys but enforces no per-identity policy)")


if __name__ == "__main__":
    main()
