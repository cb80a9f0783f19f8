"""The delta form of a policy version's weights (fleetloop.release.registry stores it next to the
full weights): the blocks of the safetensors file that differ from the parent's, as a safetensors
file itself ("index": int64 [k], "blocks": uint8 [k, B]). Exact by construction, and the robot still
checks the rebuilt bytes against the manifest's sha256 of the full weights before using them. It
pays off when parts of the network do not change between versions (frozen encoders, adapters)."""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

DELTA_BLOCK = 64 * 1024       # granularity of "changed" in the delta form


def make_delta(parent: bytes, new: bytes, block: int = DELTA_BLOCK) -> Optional[bytes]:
    from safetensors.numpy import save
    if len(parent) != len(new) or not new or block % 8:
        return None
    n_full = len(new) // block
    # Compare whole blocks as uint64 words on zero-copy views (no padded copies of 2 x the model).
    a = np.frombuffer(parent, np.uint64, count=n_full * block // 8).reshape(n_full, block // 8)
    b = np.frombuffer(new, np.uint64, count=n_full * block // 8).reshape(n_full, block // 8)
    changed = np.flatnonzero((a != b).any(axis=1))
    payload = np.frombuffer(new, np.uint8, count=n_full * block).reshape(n_full, block)[changed]
    tail = len(new) - n_full * block
    if tail and parent[-tail:] != new[-tail:]:  # the short last block, zero-padded to a full one
        last = np.zeros((1, block), np.uint8)
        last[0, :tail] = np.frombuffer(new, np.uint8, offset=n_full * block)
        changed, payload = np.append(changed, n_full), np.concatenate([payload, last])
    return save({"index": changed.astype(np.int64), "blocks": np.ascontiguousarray(payload)},
                metadata={"block": str(block), "total": str(len(new))})


def apply_delta(parent: bytes, delta: bytes) -> bytes:
    """Raises ValueError if the delta does not fit the parent."""
    from safetensors.numpy import load
    try:
        t = load(delta)
        meta = _safetensors_metadata(delta)
        block, total = int(meta["block"]), int(meta["total"])
    except Exception as e:  # malformed header or tensors: not usable, fall back to full weights
        raise ValueError(f"unreadable delta: {e}") from None
    if total != len(parent):
        raise ValueError(f"delta is for a {total}-byte parent, have {len(parent)} bytes")
    index, blocks = t["index"], t["blocks"]
    n_blocks = -(-total // block)
    if (blocks.shape != (len(index), block) or (len(index) and (index.min() < 0 or index.max() >= n_blocks))
            or np.any(np.diff(index) <= 0)):
        raise ValueError("delta blocks do not fit the parent")
    # One allocation and one copy, with the GIL released (bytes.join of large buffers): runs of
    # unchanged parent bytes interleaved with the changed blocks.
    src, parts, pos = memoryview(parent), [], 0
    blocks_mv = memoryview(np.ascontiguousarray(blocks).reshape(-1))
    for k, i in enumerate(index.tolist()):
        start = i * block
        parts.append(src[pos:start])
        end = min(start + block, total)
        parts.append(blocks_mv[k * block:k * block + end - start])
        pos = end
    parts.append(src[pos:])
    return b"".join(parts)


def _safetensors_metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})
