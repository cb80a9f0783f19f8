"""The uploader: spool -> object store -> Redis stream, in the background, never losing an episode.

Per sealed episode: put every chunk, put the manifest (the commit point), XADD the event,
then delete the spool copy. Puts are write-once (If-None-Match: *): a committed object is never
overwritten, so the store can enforce it (docs/security.md). Each step is
idempotent, so a kill -9 anywhere means redoing at most one step after restart; a duplicate
event is absorbed by the consumer's dedupe. Store or Redis outages are retried with
exponential backoff while the robot keeps recording into the spool.

An entry that no retry can fix never blocks the ones behind it: an unusable end.json is sealed
again from the chunks (every step kept, marked incomplete); a missing chunk of an episode the
store already committed just finishes the steps after the commit point; anything else (a chunk
gone before the commit, an unreadable meta.json) is moved aside to `.damaged-<id>`, logged as an
error and counted (`damaged_episodes` in the heartbeat, the dashboard and /metrics).
"""
from __future__ import annotations

import logging
import threading
import time

import redis
from google.protobuf import json_format

from fleetloop.actor.spool import Spool, read_json
from fleetloop.buffer.codec import (EncodedChunk, EpisodeRejected, chunk_ref, decode_chunk, decode_image_chunk,
                                   finish_manifest, manifest_from_bytes, manifest_key,
                                   manifest_to_bytes)
from fleetloop.buffer.queue import event_to_fields
from fleetloop.ingest import LocalWrites, Refused, Throttled
from fleetloop.buffer.store import ObjectStore, StoreError
from fleetloop.proto.v1 import SCHEMA_VERSION
from fleetloop.proto.v1 import episode_pb2 as pb

log = logging.getLogger(__name__)


class DamagedEntry(Exception):
    """A sealed spool entry that no retry can upload (a file gone or unreadable)."""


def recover_unsealed(spool: Spool) -> list[str]:
    """After a crash, seal episodes that were still recording: what reached the disk is kept,
    marked incomplete (outcome unknown). A chunk cut short by the crash, and any after it,
    is dropped."""
    recovered = []
    for episode_id in spool.unsealed():
        try:
            if reseal_from_chunks(spool, episode_id):
                recovered.append(episode_id)
        except (DamagedEntry, *_MALFORMED) as e:
            spool.set_aside(episode_id, str(e) or repr(e))
    return recovered


def reseal_from_chunks(spool: Spool, episode_id: str) -> bool:
    """Seal one episode from the chunks on disk (replacing an unreadable end.json, if any);
    False when there is nothing to keep (removed); DamagedEntry when meta.json is unusable."""
    d = spool.path(episode_id)
    meta = read_json(d / "meta.json")
    if meta is None and not (d / "end.json").exists():
        spool.remove(episode_id)  # died before the episode really began
        return False
    if not isinstance(meta, dict) or not isinstance(meta.get("robot_id"), str):
        raise DamagedEntry(f"spool entry {episode_id} lacks a usable meta.json")
    refs, flags, cameras = [], [], []
    for i, f in enumerate(sorted(d.glob("chunk-*.flc"))):
        try:
            enc = EncodedChunk.from_object(f.read_bytes(), str(f))
            chunk = decode_chunk(enc.steps, str(f))
            images = decode_image_chunk(enc.images, str(f)) if enc.images else None
        except EpisodeRejected:
            log.warning("recovery: %s was cut short by the crash; dropping it and later chunks", f)
            break
        if images is not None and not cameras and images.steps:
            cameras = [img.camera for img in images.steps[0].images]
        refs.append(json_format.MessageToDict(chunk_ref(meta["robot_id"], episode_id, i, len(chunk.steps), enc)))
        flags.extend(s.intervention for s in chunk.steps)
    segments, start = [], None
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            segments.append({"start_step": start, "end_step": i, "operator": "", "reason": ""})
            start = None
    spool.seal(episode_id, {"outcome": pb.OUTCOME_UNKNOWN, "outcome_source": 0, "labelled_by": "",
                            "incomplete": True, "ended_ns": time.time_ns(), "num_steps": len(flags),
                            "chunks": refs,
                            "interventions": segments, "cameras": cameras})
    log.warning("recovered episode %s from the spool (%d steps, marked incomplete)", episode_id, len(flags))
    return True


def build_manifest(meta: dict, end: dict) -> pb.EpisodeManifest:
    m = pb.EpisodeManifest(
        schema_version=SCHEMA_VERSION, episode_id=meta["episode_id"], robot_id=meta["robot_id"],
        task_id=meta["task_id"], instruction=meta["instruction"], policy_version=meta["policy_version"],
        kind=meta["kind"], outcome=end["outcome"], outcome_source=end["outcome_source"],
        outcome_labelled_by=end["labelled_by"], started_ns=meta["started_ns"], ended_ns=end["ended_ns"],
        num_steps=end["num_steps"], incomplete=end["incomplete"],
        action_dim=end.get("action_dim", 0), state_dim=end.get("state_dim", 0))  # 0: an older spool entry
    for s in end["interventions"]:
        m.interventions.add(**s)
    m.cameras.extend(end.get("cameras", []))
    return m


_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, json_format.ParseError)


_EMPTY_END = {"outcome": 0, "outcome_source": 0, "labelled_by": "", "ended_ns": 0, "num_steps": 0,
              "incomplete": False, "interventions": []}


def _check_meta(episode_id: str, meta) -> None:
    """DamagedEntry unless meta.json can make a manifest (its fields and ids)."""
    if not isinstance(meta, dict):
        raise DamagedEntry(f"spool entry {episode_id} lacks a readable meta.json")
    try:
        manifest_key(meta["robot_id"], episode_id)
        build_manifest(meta, _EMPTY_END)
    except _MALFORMED as e:
        raise DamagedEntry(f"spool entry {episode_id} has an unusable meta.json: {e!r}") from None


def _parse_entry(episode_id: str, meta: dict, end: dict | None) -> tuple[str, pb.EpisodeManifest, list[pb.ChunkRef]]:
    """The manifest key, the manifest (without chunks) and the chunk refs of a sealed entry;
    raises one of _MALFORMED when a field is missing or of the wrong type."""
    if end is None:
        raise ValueError("")
    refs = [json_format.ParseDict(r, pb.ChunkRef()) for r in end["chunks"]]
    return manifest_key(meta["robot_id"], episode_id), build_manifest(meta, end), refs


class Uploader:
    def __init__(self, spool: Spool, store: ObjectStore, client: redis.Redis,
                 max_backoff_s: float = 5.0, on_uploaded=None, writes=None):
        """writes: where the event goes (fleetloop.ingest: the gate in this process on `client`
        by default, or GatewayWrites to `fleetloop ingest` for a robot with issued credentials)."""
        self.spool, self.store = spool, store
        self.writes = writes or LocalWrites(client)
        self.max_backoff_s = max_backoff_s
        self.on_uploaded = on_uploaded  # callback(episode_id, manifest) for metrics/tests
        self.uploaded = 0
        self.failures = 0
        self.last_error: str | None = None

    def upload_one(self, episode_id: str) -> None:
        """Raises DamagedEntry for an entry that can never upload; outages propagate."""
        d = self.spool.path(episode_id)
        meta, end = read_json(d / "meta.json"), read_json(d / "end.json")
        _check_meta(episode_id, meta)  # before touching end.json: a bad meta is not fixed by resealing
        try:
            mkey, manifest, refs = _parse_entry(episode_id, meta, end)
        except _MALFORMED as e:
            # Its seal did not survive (a power cut on a disk that lies about flushes) or was
            # written wrong: seal again from the chunks, which hold every step.
            log.warning("spool entry %s has an unusable end.json (%s); sealing it again from its chunks",
                        episode_id, str(e) or "unreadable")
            try:
                reseal_from_chunks(self.spool, episode_id)
            except _MALFORMED as e:
                raise DamagedEntry(f"cannot seal it again from its chunks: {e!r}") from None
            end = read_json(d / "end.json")
            try:
                mkey, manifest, refs = _parse_entry(episode_id, meta, end)
            except _MALFORMED as e:
                raise DamagedEntry(f"no manifest can be built even after resealing: {e!r}") from None
        for i, ref in enumerate(refs):
            try:
                data = (d / f"chunk-{i:05d}.flc").read_bytes()
            except FileNotFoundError:
                if self.store.exists(mkey):
                    # Committed before a spool that deleted file by file was cut short: finish the
                    # steps after the commit point (announce again -- deduped -- and delete).
                    manifest_bytes = self.store.get(mkey)
                    try:
                        manifest = manifest_from_bytes(manifest_bytes, mkey)
                    except EpisodeRejected as e:
                        raise DamagedEntry(f"chunk {i} is missing and the stored manifest is bad: {e}") from None
                    break
                raise DamagedEntry(f"chunk {i} of {len(refs)} is missing") from None
            # Write-once (If-None-Match: *), so a bucket policy can forbid overwrites of episodes
            # (docs/security.md). A chunk already there was stored by this robot before a crash:
            # same key, same bytes.
            self.store.put_new(ref.key, data)
            manifest.chunks.append(ref)
        else:
            finish_manifest(manifest)
            manifest_bytes = manifest_to_bytes(manifest)
            if not self.store.put_new(mkey, manifest_bytes):  # the commit point
                manifest_bytes = self.store.get(mkey)  # committed before a crash: that one counts
        event = pb.EpisodeEvent(
            episode_id=episode_id, manifest_key=mkey, robot_id=meta["robot_id"], task_id=meta["task_id"],
            ended_ns=end["ended_ns"], schema_version=SCHEMA_VERSION, manifest_json=manifest_bytes.decode())
        try:
            self.writes.episode(event_to_fields(event))
        except Throttled:
            raise  # over the robot's rate: retried with backoff like an outage
        except Refused as e:  # the gate will never take this event: keep the entry aside, go on
            raise DamagedEntry(f"the ingest gate refused its event: {e}") from None
        self.spool.remove(episode_id)
        self.uploaded += 1
        if self.on_uploaded:
            self.on_uploaded(episode_id, manifest)

    def drain_once(self) -> int:
        """Upload everything sealed now; returns the number uploaded. Raises on outage."""
        n = 0
        for episode_id in self.spool.sealed():
            try:
                self.upload_one(episode_id)
            except DamagedEntry as e:
                self.spool.set_aside(episode_id, str(e))
                continue
            n += 1
        return n

    def run(self, stop: threading.Event) -> None:
        """Call recover_unsealed(spool) once before recording starts, then run this."""
        backoff = 0.05
        while not stop.is_set():
            self.spool.sealed_event.clear()
            try:
                self.drain_once()
                backoff = 0.05
                self.last_error = None
            except Exception as e:  # outages (store, Redis, disk) and anything unforeseen: the thread lives on
                self.failures += 1
                self.last_error = str(e)
                expected = isinstance(e, (StoreError, redis.RedisError, OSError, Throttled))
                log.warning("upload failed (%s); retrying in %.2fs; the robot keeps recording", e, backoff,
                            exc_info=not expected)
                stop.wait(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
                continue
            self.spool.sealed_event.wait(0.5)

    def start_thread(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(stop,), name="uploader", daemon=True)
        t.start()
        return t
