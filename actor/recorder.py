"""The episode recorder: the only actor piece the control loop touches.

`add_step` appends to a list; full chunks are handed to a writer thread that serialises them
into the spool. Nothing on the control loop's path waits for the disk or the network.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid

from fleetloop.actor.spool import Spool, SpoolFull
from google.protobuf import json_format

from fleetloop.buffer.codec import chunk_ref, encode_chunk
from fleetloop.proto.v1 import episode_pb2 as pb

log = logging.getLogger(__name__)


def new_episode_id(robot_id: str) -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{robot_id[:40]}-{uuid.uuid4().hex[:12]}"


class _Episode:
    def __init__(self, episode_id: str):
        self.episode_id = episode_id
        self.steps: list[pb.Step] = []
        self.chunks_flushed = 0            # chunks handed to the writer (numbers the next one)
        self.num_steps = 0
        self.approx_bytes = 0
        self.segments: list[dict] = []     # intervention segments [start, end)
        self.cameras: list[str] = []       # camera names, from the first step with images
        self.action_dim = 0                # from the first step (the daemon keeps them constant)
        self.state_dim = 0
        self.chunk_refs: list[dict] = []   # ChunkRef (JSON form) per chunk written
        self.dropped = False


class EpisodeRecorder:
    def __init__(self, spool: Spool, robot_id: str, chunk_steps: int = 64, chunk_bytes: int = 1 << 20):
        self.spool, self.robot_id = spool, robot_id
        self.chunk_steps, self.chunk_bytes = chunk_steps, chunk_bytes
        self._jobs: queue.Queue = queue.Queue()
        self._current: _Episode | None = None
        self._dropped_ids: collections.OrderedDict[str, None] = collections.OrderedDict()  # bounded: newest kept
        self._writer = threading.Thread(target=self._write_loop, name="spool-writer", daemon=True)
        self._writer.start()

    # -- control-loop API (cheap) ----------------------------------------------------------
    def start(self, task_id: str, instruction: str, policy_version: str,
              kind: int = pb.EPISODE_KIND_ROLLOUT, episode_id: str | None = None) -> str:
        if self._current is not None:
            raise RuntimeError(f"episode {self._current.episode_id} is still open")
        ep = _Episode(episode_id or new_episode_id(self.robot_id))
        self._current = ep
        self._jobs.put(("begin", ep, {
            "episode_id": ep.episode_id, "robot_id": self.robot_id, "task_id": task_id,
            "instruction": instruction, "policy_version": policy_version, "kind": int(kind),
            "started_ns": time.time_ns()}))
        return ep.episode_id

    @property
    def episode_id(self) -> str | None:
        return self._current.episode_id if self._current else None

    @property
    def num_steps(self) -> int:
        return self._current.num_steps if self._current else 0

    def add_step(self, step: pb.Step, operator: str = "", reason: str = "") -> None:
        """`operator`, `reason`: who drove an intervention step and why -- they name a segment the
        step's flag opens (without annotate_intervention); a later step's operator replaces an
        empty or "unknown" one."""
        ep = self._require()
        step.index = ep.num_steps
        if not step.timestamp_ns:
            step.timestamp_ns = time.time_ns()
        if step.intervention and (not ep.segments or ep.segments[-1]["end_step"] is not None):
            ep.segments.append({"start_step": ep.num_steps, "end_step": None, "operator": operator,
                                "reason": reason})
        elif step.intervention and operator and ep.segments[-1]["operator"] in ("", "unknown"):
            ep.segments[-1]["operator"] = operator
        elif not step.intervention and ep.segments and ep.segments[-1]["end_step"] is None:
            ep.segments[-1]["end_step"] = ep.num_steps
        if not ep.cameras and step.images:
            ep.cameras = [img.camera for img in step.images]
        if not ep.num_steps:
            ep.action_dim, ep.state_dim = len(step.action), len(step.state)
        ep.steps.append(step)
        ep.num_steps += 1
        ep.approx_bytes += sum(len(i.data) for i in step.images) + 8 * (len(step.state) + len(step.action))
        if len(ep.steps) >= self.chunk_steps or ep.approx_bytes >= self.chunk_bytes:
            self._flush(ep)

    def annotate_intervention(self, operator: str, reason: str) -> None:
        """Name who intervened and why for the open (or next) intervention segment."""
        ep = self._require()
        if ep.segments and ep.segments[-1]["end_step"] is None:
            ep.segments[-1].update(operator=operator, reason=reason)
        else:
            ep.segments.append({"start_step": ep.num_steps, "end_step": None, "operator": operator,
                                "reason": reason, "pending": True})

    def end(self, outcome: int = pb.OUTCOME_UNKNOWN, outcome_source: int = pb.LABEL_SOURCE_UNSPECIFIED,
            labelled_by: str = "", incomplete: bool = False) -> tuple[str, int]:
        ep = self._require()
        self._current = None
        if ep.steps:
            self._flush(ep)
        segments = []
        for s in ep.segments:
            if s.get("pending") and s["end_step"] is None and s["start_step"] >= ep.num_steps:
                continue  # annotated but no intervention step followed
            end_step = s["end_step"] if s["end_step"] is not None else ep.num_steps
            if end_step > s["start_step"]:
                segments.append({"start_step": s["start_step"], "end_step": end_step,
                                 "operator": s["operator"], "reason": s["reason"]})
        self._jobs.put(("seal", ep, {"outcome": int(outcome), "outcome_source": int(outcome_source),
                                     "labelled_by": labelled_by, "incomplete": incomplete,
                                     "ended_ns": time.time_ns(), "num_steps": ep.num_steps,
                                     "interventions": segments,
                                     "cameras": ep.cameras, "action_dim": ep.action_dim,
                                     "state_dim": ep.state_dim}))
        return ep.episode_id, ep.num_steps

    def abort(self, why: str) -> None:
        """Close an episode the robot abandoned (disconnect): kept, marked incomplete."""
        if self._current is not None:
            log.warning("episode %s ends incomplete: %s", self._current.episode_id, why)
            self.end(incomplete=True)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the writer has drained (tests, shutdown)."""
        done = threading.Event()
        self._jobs.put(("sync", None, done))
        return done.wait(timeout)

    def was_dropped(self, episode_id: str) -> bool:
        return episode_id in self._dropped_ids

    def _mark_dropped(self, ep: _Episode) -> None:
        ep.dropped = True
        self._dropped_ids[ep.episode_id] = None
        while len(self._dropped_ids) > 1024:
            self._dropped_ids.popitem(last=False)

    # -- internals ----------------------------------------------------------------------------
    def _require(self) -> _Episode:
        if self._current is None:
            raise RuntimeError("no episode is open: call start() first")
        return self._current

    def _flush(self, ep: _Episode) -> None:
        steps, ep.steps, ep.approx_bytes = ep.steps, [], 0
        self._jobs.put(("chunk", ep, (ep.chunks_flushed, steps)))
        ep.chunks_flushed += 1

    def _write_loop(self) -> None:
        while True:
            kind, ep, payload = self._jobs.get()
            try:
                if kind == "sync":
                    payload.set()
                elif ep.dropped:
                    continue
                elif kind == "begin":
                    self.spool.begin(ep.episode_id, payload)
                elif kind == "chunk":
                    index, steps = payload
                    enc = encode_chunk(ep.episode_id, index, steps)
                    # Digests are computed here, once, off the control loop; end.json carries them.
                    ep.chunk_refs.append(json_format.MessageToDict(
                        chunk_ref(self.robot_id, ep.episode_id, index, len(steps), enc)))
                    self.spool.write_chunk(ep.episode_id, index, enc.to_object())
                elif kind == "seal":
                    self.spool.seal(ep.episode_id, {**payload, "chunks": ep.chunk_refs})
            except SpoolFull as e:
                self._mark_dropped(ep)
                self.spool.drop(ep.episode_id, f"spool full: {e}")
            except Exception:  # never let the writer thread die
                log.exception("spool writer failed on %s for %s", kind, getattr(ep, "episode_id", "?"))
                if ep is not None:
                    self._mark_dropped(ep)
                    self.spool.drop(ep.episode_id, "write error")
