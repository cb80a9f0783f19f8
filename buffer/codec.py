"""The episode codec: how an episode is laid out in the object store, and how it is checked.

Layout (relative to the store root; documented in the README):
  episodes/<robot_id>/<episode_id>/chunk-00000.flc   one chunk of steps (format below)
  episodes/<robot_id>/<episode_id>/chunk-00001.flc
  episodes/<robot_id>/<episode_id>/manifest.json     EpisodeManifest, protobuf JSON mapping

Chunk object: b"FLC1" | uint32 little-endian N | N bytes StepChunk | ImageChunk bytes.
The StepChunk section is small (state, action, flags); the ImageChunk section holds the
pixels. Each section has its own sha256 in the manifest, so the consumer verifies the steps
at ingest with one ranged GET and the images when a frame is first sampled.

The manifest is written last: it is the commit point. A reader that finds a manifest finds
every chunk it names. `read_episode` checks everything a consumer must not trust blindly and
raises `EpisodeRejected` with a reason code.
"""
from __future__ import annotations

import hashlib
import io
import re
import struct
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
    max_image_pixels: int = 4096 * 4096  # decoding refuses more: a forged frame cannot cost GBs


MAX_IMAGE_PIXELS = Limits.max_image_pixels


RESERVED_IDS = {"all", "acks"}  # names the Redis key scheme uses next to robot ids


def check_id(kind: str, value: str) -> str:
    if not _SAFE_ID.fullmatch(value or ""):
        raise ValueError(f"invalid {kind} {value!r}: use letters, digits, '.', '_' or '-' (max 128)")
    if value in RESERVED_IDS:
        raise ValueError(f"{kind} {value!r} is reserved")
    return value


def episode_prefix(robot_id: str, episode_id: str) -> str:
    return f"episodes/{check_id('robot id', robot_id)}/{check_id('episode id', episode_id)}"


def chunk_key(robot_id: str, episode_id: str, chunk_index: int) -> str:
    return f"{episode_prefix(robot_id, episode_id)}/chunk-{chunk_index:05d}.flc"


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


def decode_image(img: pb.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """HxWxC uint8. Frames above max_pixels are refused before anything is allocated for them
    (a PNG's size is read from its header first)."""
    if img.encoding == "raw":
        if img.height * img.width > max_pixels:
            raise ValueError(f"image of {img.width}x{img.height} exceeds {max_pixels} pixels")
        arr = np.frombuffer(img.data, dtype=np.uint8)
        expected = img.height * img.width * img.channels
        if arr.size != expected:
            raise ValueError(f"raw image has {arr.size} bytes, expected {expected}")
        return arr.reshape(img.height, img.width, img.channels)
    if img.encoding == "png":
        from PIL import Image as PILImage
        with PILImage.open(io.BytesIO(img.data)) as im:  # lazy: only the header is read here
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"image of {w}x{h} exceeds {max_pixels} pixels")
            arr = np.asarray(im)
        return arr if arr.ndim == 3 else arr[:, :, None]
    raise ValueError(f"unknown image encoding {img.encoding!r}")


# ---- chunks and manifests -----------------------------------------------------------------

CHUNK_MAGIC = b"FLC1"
CHUNK_HEADER = 8


@dataclass
class EncodedChunk:
    """One chunk of steps: the small per-step section and the image section."""
    steps: bytes
    images: bytes  # b"" when no step has images

    def to_object(self) -> bytes:
        return CHUNK_MAGIC + struct.pack("<I", len(self.steps)) + self.steps + self.images

    @staticmethod
    def from_object(data: bytes, where: str = "") -> "EncodedChunk":
        if len(data) < CHUNK_HEADER or data[:4] != CHUNK_MAGIC:
            raise EpisodeRejected("corrupt-chunk", f"{where}: not a fleetloop chunk object")
        (n,) = struct.unpack("<I", data[4:8])
        if CHUNK_HEADER + n > len(data):
            raise EpisodeRejected("corrupt-chunk", f"{where}: steps section runs past the end")
        return EncodedChunk(data[CHUNK_HEADER:CHUNK_HEADER + n], data[CHUNK_HEADER + n:])


def encode_chunk(episode_id: str, chunk_index: int, steps: list[pb.Step]) -> EncodedChunk:
    """Split steps into a StepChunk (images stripped) and an ImageChunk. Takes the images out
    of the given Step messages (they are consumed)."""
    images = pb.ImageChunk(episode_id=episode_id, chunk_index=chunk_index)
    any_images = False
    for step in steps:
        holder = images.steps.add()
        if step.images:
            any_images = True
            holder.images.extend(step.images)
            del step.images[:]
    chunk = pb.StepChunk(episode_id=episode_id, chunk_index=chunk_index, steps=steps)
    return EncodedChunk(chunk.SerializeToString(), images.SerializeToString() if any_images else b"")


def decode_chunk(data: bytes, where: str = "") -> pb.StepChunk:
    chunk = pb.StepChunk()
    try:
        chunk.ParseFromString(data)
    except DecodeError as e:
        raise EpisodeRejected("corrupt-chunk", f"{where}: cannot parse StepChunk ({e})") from None
    return chunk


def decode_image_chunk(data: bytes, where: str = "") -> pb.ImageChunk:
    chunk = pb.ImageChunk()
    try:
        chunk.ParseFromString(data)
    except DecodeError as e:
        raise EpisodeRejected("corrupt-chunk", f"{where}: cannot parse ImageChunk ({e})") from None
    return chunk


def merge_images(chunk: pb.StepChunk, images: pb.ImageChunk, where: str = "") -> pb.StepChunk:
    if len(images.steps) != len(chunk.steps):
        raise EpisodeRejected("inconsistent", f"{where}: {len(images.steps)} image entries for {len(chunk.steps)} steps")
    for step, holder in zip(chunk.steps, images.steps):
        step.images.extend(holder.images)
    return chunk


def chunk_digests(refs) -> list[str]:
    out = []
    for r in refs:
        out.append(r.steps_sha256)
        if r.images_bytes:
            out.append(r.images_sha256)
    return out


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


def chunk_ref(robot_id: str, episode_id: str, index: int, num_steps: int, enc: EncodedChunk) -> pb.ChunkRef:
    return pb.ChunkRef(key=chunk_key(robot_id, episode_id, index), num_steps=num_steps,
                       size_bytes=CHUNK_HEADER + len(enc.steps) + len(enc.images),
                       steps_bytes=len(enc.steps), steps_sha256=sha256_hex(enc.steps),
                       images_bytes=len(enc.images), images_sha256=sha256_hex(enc.images) if enc.images else "")


def finish_manifest(manifest: pb.EpisodeManifest) -> pb.EpisodeManifest:
    manifest.content_sha256 = content_sha256(chunk_digests(manifest.chunks))
    manifest.schema_version = manifest.schema_version or SCHEMA_VERSION
    return manifest


def commit_episode(store: ObjectStore, manifest: pb.EpisodeManifest,
                   chunks: list[tuple[EncodedChunk, int]]) -> str:
    """Write the chunks (encoded chunk, number of steps), then the manifest: the commit point.
    Idempotent: re-running after a crash rewrites the same bytes. Fills in the chunk refs and
    the content checksum; returns the manifest key."""
    del manifest.chunks[:]
    for i, (enc, num_steps) in enumerate(chunks):
        ref = chunk_ref(manifest.robot_id, manifest.episode_id, i, num_steps, enc)
        store.put(ref.key, enc.to_object())
        manifest.chunks.append(ref)
    finish_manifest(manifest)
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


def fetch_images(store: ObjectStore, ref: pb.ChunkRef) -> pb.ImageChunk:
    """Fetch the image section of one chunk and verify it against the manifest digest."""
    try:
        data, _total = store.get_range(ref.key, CHUNK_HEADER + ref.steps_bytes, ref.images_bytes)
    except ObjectNotFound:
        raise EpisodeRejected("missing-chunk", f"chunk {ref.key} not found") from None
    if len(data) != ref.images_bytes or sha256_hex(data) != ref.images_sha256:
        raise EpisodeRejected("checksum-mismatch", f"{ref.key}: image section does not match the manifest")
    return decode_image_chunk(data, ref.key)


def _read_steps(store: ObjectStore, ref: pb.ChunkRef, with_images: bool) -> tuple[pb.StepChunk, bytes]:
    """One request: the steps section (or the whole object), checking the object's size."""
    try:
        if with_images:
            data = store.get(ref.key)
            total = len(data)
        else:
            data, total = store.get_range(ref.key, 0, CHUNK_HEADER + ref.steps_bytes)
    except ObjectNotFound:
        raise EpisodeRejected("missing-chunk", f"chunk {ref.key} not found") from None
    if total != ref.size_bytes:
        raise EpisodeRejected("checksum-mismatch", f"{ref.key}: {total} bytes, manifest says {ref.size_bytes}")
    enc = EncodedChunk.from_object(data, ref.key)
    if len(enc.steps) != ref.steps_bytes or sha256_hex(enc.steps) != ref.steps_sha256:
        raise EpisodeRejected("checksum-mismatch", f"{ref.key}: steps section does not match the manifest")
    chunk = decode_chunk(enc.steps, ref.key)
    if with_images and ref.images_bytes:
        if sha256_hex(enc.images) != ref.images_sha256:
            raise EpisodeRejected("checksum-mismatch", f"{ref.key}: image section does not match the manifest")
        merge_images(chunk, decode_image_chunk(enc.images, ref.key), ref.key)
    return chunk, enc.images


def read_episode(store: ObjectStore, key: str, limits: Limits = Limits(),
                 keep_chunks: dict | None = None, verify_images: bool = False,
                 manifest: pb.EpisodeManifest | None = None) -> LoadedEpisode:
    """Fetch and verify an episode. Raises EpisodeRejected (never ingestible) or StoreError
    (transient: retry).

    The steps section of every chunk is fetched and verified in full; the image sections only
    by the object's size unless `verify_images` or `keep_chunks` is given (otherwise the payload
    cache verifies them when first read). `keep_chunks`, if given, receives each decoded
    StepChunk with its images merged back in, by chunk index. `manifest` skips fetching it
    (the queue event may carry a copy)."""
    m = manifest if manifest is not None else read_manifest(store, key)
    total = sum(c.size_bytes for c in m.chunks)
    if m.num_steps > limits.max_steps or total > limits.max_bytes:
        raise EpisodeRejected("oversized", f"{key}: {m.num_steps} steps, {total} bytes "
                                           f"(limits {limits.max_steps} steps, {limits.max_bytes} bytes)")
    if m.content_sha256 and content_sha256(chunk_digests(m.chunks)) != m.content_sha256:
        raise EpisodeRejected("checksum-mismatch", f"{key}: content_sha256 does not match its chunks")
    states, actions, flags, starts = [], [], [], []
    step_count = 0
    for i, ref in enumerate(m.chunks):
        chunk, _images = _read_steps(store, ref, with_images=verify_images or keep_chunks is not None)
        if chunk.episode_id != m.episode_id:
            raise EpisodeRejected("inconsistent", f"{ref.key} belongs to episode {chunk.episode_id!r}")
        if len(chunk.steps) != ref.num_steps:
            raise EpisodeRejected("inconsistent", f"{ref.key}: {len(chunk.steps)} steps, manifest says {ref.num_steps}")
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
