#!/usr/bin/env python3
"""A robot's peak memory when a version's manifest.sig is huge (issue 22, item 6): writes a
signed-looking version whose signature object is N MiB into a temporary file:// store and asks
a robot's registry to verify it. Prints one JSON line (ru_maxrss before and after).

    .venv/bin/python scripts/signature-memory.py 400
"""
import json
import resource
import sys
import tempfile

import redis

from fleetloop.buffer.store import LocalStore
from fleetloop.release import signing
from fleetloop.release.registry import PolicyRegistry, manifest_key, manifest_to_bytes, signature_key
from fleetloop.proto.v1 import policy_pb2 as ppb


def main(mib: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        signer = signing.Signer.from_file(signing.generate_keypair(tmp + "/keys")[0])
        store = LocalStore(tmp + "/store")
        store.put(manifest_key("v000001"), manifest_to_bytes(ppb.PolicyManifest(version="v000001")))
        with open(store.root / signature_key("v000001"), "wb") as f:
            for _ in range(mib):
                f.write(b" " * (1 << 20))
        robot = PolicyRegistry(store, redis.Redis(port=1))  # this path never talks to Redis
        robot.trust = signing.TrustStore.of(signer.public_key())
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            robot.verified_manifest("v000001")
            outcome = "accepted"
        except signing.SignatureError as e:
            outcome = f"refused: {str(e)[:100]}"
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"signature_mib": mib, "peak_rss_mib_before": round(before / 1024), "peak_rss_mib_after": round(after / 1024),
            "outcome": outcome}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 400)))
