"""The episode codec: how an episode is laid out in the object store, and how it is checked.

Layout (relative to the store root; documented in the README):
  episodes/<robot_id>/<episode_id>/chunk-00000.pb   StepChunk protobuf (binary)
  episodes/<robot_id>/<episode_id>/chunk-00001.pb
  episodes/<robot_id>/<episode_id>/manifest.json    EpisodeManifest, protobuf JSON mapping

The manifest is written last: it is the commit point. A reader that finds a manifest finds
every chunk it names, each verifiable by its sha256. `read_episode` checks everything a
consumer must not trust blindly and raises `EpisodeRejected` with a reason code.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from fleetloop.buffer.store import ObjectNotFound, ObjectStore
from fleetloop.proto.v1 import SCHEMA_VERSION
from fleetloop.proto.v1 import episode_pb2 as pb

SUPPORTED_SCHEMA_VERSIONS = {SCHEMA_VERSION}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class EpisodeRejected(Exception):
    """An episode that can never be ingested as it is. `reason` is a short stable code:
    bad-manifest, unknown-schema-version, oversized, missing-chunk, checksum-mismatch,
    corrupt-chunk, inconsistent, non-finite."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    max_steps: int = 20_000
    max_bytes: int = 512 * 1024 * 1024


def check_id(kind: str, value: str) -> str:
    if not _SAFE_ID.match(value or ""):
        raise ValueError(f"invalid {kind} {value!r}: use letters, digits, '.', '_' or '-' (max 128)")
    return value


def episode_prefix(robot_id: str, episode_id: str) -> str:
    return f"episodes/{check_id('robot id', robot_id)}/{check_id('episode id', episode_id)}"


def chunk_key(robot_id: str, episode_id: str, chunk_index: int) -> str:
    return f"{episode_prefix(robot_id, episode_id)}/chunk-{chunk_index:05d}.pb"


def manifest_key(robot_id: str, episode_id: str) -> str:
    return f"{episode_prefix(robot_id, episode_id)}/manifest.json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_sha256(chunk_digests: list[str]) -> str:
    return sha256_hex("".join(chunk_digests).encode())


# ---- images -------------------------------------------------------------------------------

def encode_image(array: np.ndarray, camera: str = "front", encoding: str = "png") -> pb.Image:
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    h, w, c = arr.shape
    if encoding == "raw":
        data = arr.tobytes()
    elif encoding == "png":
        from PIL import Image as PILImage
        buf = io.BytesIO()
        PILImage.fromarray(arr if c != 1 else arr[:, :, 0]).save(buf, format="PNG", compress_level=1)
        data = buf.getvalue()
    else:
        raise ValueError(f"unknown image encoding {encoding!r}")
    return pb.Image(camera=camera, encoding=encoding, height=h, width=w, channels=c, data=data)


def decode_image(img: pb.Image) -> np.ndarray:
    if img.encoding == "raw":
        arr = np.frombuffer(img.data, dtype=np.uint8)
        expected = img.height * img.width * img.channels
        if arr.size != expected:
            raise ValueError(f"raw image has {arr.size} bytes, expected {expected}")
        return arr.reshape(img.height, img.width, img.channels)
    if img.encoding == "png":
        from PIL import Image as PILImage
        arr = np.asarray(PILImage.open(io.BytesIO(img.data)))
        return arr if arr.ndim == 3 else arr[:, :, None]
    raise ValueError(f"unknown image encoding {img.encoding!r}")


# ---- chunks and manifests -----------------------------------------------------------------

def encode_chunk(episode_id: str, chunk_index: int, steps: list[pb.Step]) -> bytes:
    return pb.StepChunk(episode_id=episode_id, chunk_index=chunk_index, steps=steps).SerializeToString()


def decode_chunk(data: bytes, where: str = "") -> pb.StepChunk:
    chunk = pb.StepChunk()
    try:
        chunk.ParseFromString(data)
    except DecodeError as e:
        raise EpisodeRejected("corrupt-chunk", f"{where}: cannot parse StepChunk ({e})") from None
    return chunk


def manifest_to_bytes(manifest: pb.EpisodeManifest) -> bytes:
    return json_format.MessageToJson(manifest, indent=1, preserving_proto_field_name=True).encode()


def manifest_from_bytes(data: bytes, where: str = "") -> pb.EpisodeManifest:
    manifest = pb.EpisodeManifest()
    try:
        json_format.Parse(data.decode("utf-8"), manifest, ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError, ValueError) as e:
        raise EpisodeRejected("bad-manifest", f"{where}: {e}") from None
    if manifest.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        raise EpisodeRejected("unknown-schema-version",
                              f"{where}: schema_version={manifest.schema_version}, "
                              f"this build reads {sorted(SUPPORTED_SCHEMA_VERSIONS)}")
    if not manifest.episode_id or not manifest.chunks and manifest.num_steps:
        raise EpisodeRejected("bad-manifest", f"{where}: missing episode_id or chunks")
    return manifest


def commit_episode(store: ObjectStore, manifest: pb.EpisodeManifest,
                   chunks: list[tuple[bytes, int]]) -> str:
    """Write chunks (bytes, number of steps), then the manifest: the commit point. Idempotent:
    re-running after a crash rewrites the same bytes. Fills in the chunk refs and the content
    checksum; returns the manifest key."""
    del manifest.chunks[:]
    for i, (data, num_steps) in enumerate(chunks):
        key = chunk_key(manifest.robot_id, manifest.episode_id, i)
        store.put(key, data)
        manifest.chunks.append(pb.ChunkRef(key=key, num_steps=num_steps, size_bytes=len(data),
                                           sha256=sha256_hex(data)))
    manifest.content_sha256 = content_sha256([r.sha256 for r in manifest.chunks])
    manifest.schema_version = manifest.schema_version or SCHEMA_VERSION
    key = manifest_key(manifest.robot_id, manifest.episode_id)
    store.put(key, manifest_to_bytes(manifest))
    return key


# ---- reading and validating ---------------------------------------------------------------

@dataclass
class LoadedEpisode:
    """What the index keeps per episode: small per-frame arrays, no images."""
    manifest: pb.EpisodeManifest
    manifest_key: str
    states: np.ndarray        # [T, S] float32
    actions: np.ndarray       # [T, A] float32
    intervention: np.ndarray  # [T] bool
    chunk_starts: np.ndarray  # [num_chunks] first step index of each chunk
    payload_bytes: int


def read_manifest(store: ObjectStore, key: str) -> pb.EpisodeManifest:
    try:
        data = store.get(key)
    except ObjectNotFound:
        raise EpisodeRejected("bad-manifest", f"manifest {key} not found") from None
    return manifest_from_bytes(data, key)


def read_episode(store: ObjectStore, key: str, limits: Limits = Limits(),
                 keep_chunks: dict | None = None) -> LoadedEpisode:
    """Fetch and verify a whole episode. Raises EpisodeRejected (never ingestible) or
    StoreError (transient: retry). `keep_chunks`, if given, receives decoded chunks by index."""
    m = read_manifest(store, key)
    total = sum(c.size_bytes for c in m.chunks)
    if m.num_steps > limits.max_steps or total > limits.max_bytes:
        raise EpisodeRejected("oversized", f"{key}: {m.num_steps} steps, {total} bytes "
                                           f"(limits {limits.max_steps} steps, {limits.max_bytes} bytes)")
    if m.content_sha256 and content_sha256([c.sha256 for c in m.chunks]) != m.content_sha256:
        raise EpisodeRejected("checksum-mismatch", f"{key}: content_sha256 does not match its chunks")
    states, actions, flags, starts = [], [], [], []
    step_count = 0
    for i, ref in enumerate(m.chunks):
        try:
            data = store.get(ref.key)
        except ObjectNotFound:
            raise EpisodeRejected("missing-chunk", f"{key}: chunk {ref.key} not found") from None
        if len(data) != ref.size_bytes or sha256_hex(data) != ref.sha256:
            raise EpisodeRejected("checksum-mismatch", f"{ref.key}: bytes do not match the manifest")
        chunk = decode_chunk(data, ref.key)
        if chunk.episode_id != m.episode_id:
            raise EpisodeRejected("inconsistent", f"{ref.key} belongs to episode {chunk.episode_id!r}")
        starts.append(step_count)
        for step in chunk.steps:
            states.append(step.state)
            actions.append(step.action)
            flags.append(step.intervention)
            step_count += 1
        if keep_chunks is not None:
            keep_chunks[i] = chunk
    if step_count != m.num_steps:
        raise EpisodeRejected("inconsistent", f"{key}: manifest says {m.num_steps} steps, chunks hold {step_count}")
    a_dims = {len(a) for a in actions}
    s_dims = {len(s) for s in states}
    if len(a_dims) > 1 or len(s_dims) > 1:
        raise EpisodeRejected("inconsistent", f"{key}: ragged action/state dims {a_dims}/{s_dims}")
    act = np.asarray(actions, dtype=np.float32).reshape(step_count, -1 if step_count else 0)
    st = np.asarray(states, dtype=np.float32).reshape(step_count, -1 if step_count else 0)
    if not (np.isfinite(act).all() and np.isfinite(st).all()):
        bad = int(np.argmax(~np.isfinite(act).all(axis=1))) if not np.isfinite(act).all() else -1
        raise EpisodeRejected("non-finite", f"{key}: NaN/inf in actions or state (first bad action step {bad})")
    return LoadedEpisode(manifest=m, manifest_key=key, states=st, actions=act,
                         intervention=np.asarray(flags, dtype=bool), chunk_starts=np.asarray(starts, dtype=np.int64),
                         payload_bytes=total)


def outcome_name(outcome: int) -> str:
    return {pb.OUTCOME_SUCCESS: "success", pb.OUTCOME_FAILURE: "failure"}.get(outcome, "unknown")


def is_finite_vector(v) -> bool:
    return all(math.isfinite(x) for x in v)
