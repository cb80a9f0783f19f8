"""`fleetloop export --format lerobot`: write fleet episodes from the store as a LeRobotDataset v3.

Episodes are read and written one at a time (the writer: writer.py): frames go to the data
parquet files as one row group per episode (pyarrow ParquetWriter), images are decoded and fed to
the video encoder frame by frame, statistics are merged as they come. Memory is bounded by one episode, whatever the
size of the dataset. The dataset is built in a temporary directory next to --out and renamed to
--out at the end, so --out never holds a half-written dataset.

Column mapping: docs/lerobot.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleetloop.buffer.codec import EpisodeRejected, read_episode, read_manifest
from fleetloop.buffer.store import ObjectStore, StoreError, open_store
from fleetloop.lerobot.format import (
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_DATA_FILE_SIZE_MB,
    DEFAULT_VIDEO_FILE_SIZE_MB,
    LeRobotFormatError,
    Progress,
)
from fleetloop.lerobot.video import CODECS, VideoSettings
from fleetloop.lerobot.writer import LeRobotWriter, SourceMetadata
from fleetloop.proto.v1 import episode_pb2 as pb

log = logging.getLogger(__name__)

OUTCOMES = {"success": pb.OUTCOME_SUCCESS, "failure": pb.OUTCOME_FAILURE, "unknown": pb.OUTCOME_UNKNOWN}
KINDS = {"rollout": pb.EPISODE_KIND_ROLLOUT, "demonstration": pb.EPISODE_KIND_DEMONSTRATION}


# ---- selecting episodes -----------------------------------------------------------------------

@dataclass
class ExportFilter:
    task: str | None = None      # matches the manifest's task_id or its instruction
    robot: str | None = None
    outcome: str | None = None   # success | failure | unknown
    kind: str | None = None      # rollout | demonstration

    def matches(self, m: pb.EpisodeManifest) -> bool:
        if self.task is not None and self.task not in (m.task_id, m.instruction):
            return False
        if self.robot is not None and m.robot_id != self.robot:
            return False
        if self.outcome is not None and m.outcome != OUTCOMES[self.outcome]:
            return False
        return self.kind is None or m.kind == KINDS[self.kind]


def manifest_keys(store: ObjectStore, robot: str | None = None) -> list[str]:
    """The manifest keys of every committed episode in the store (optionally one robot's)."""
    prefix = f"episodes/{robot}/" if robot else "episodes/"
    return sorted(k for k in store.list(prefix) if k.endswith("/manifest.json"))


@dataclass
class ExportSummary:
    out_dir: str
    episodes: int = 0
    frames: int = 0
    tasks: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


# ---- the whole export -------------------------------------------------------------------------

def export_dataset(store: ObjectStore, out_dir: str | Path, *, fps: int | None = None,
                   where: ExportFilter | None = None, video: VideoSettings | None = None,
                   data_file_size_mb: float = DEFAULT_DATA_FILE_SIZE_MB,
                   chunks_size: int = DEFAULT_CHUNKS_SIZE, progress: bool = True) -> ExportSummary:
    """Export the store's episodes matching `where` as a LeRobot v3 dataset in `out_dir` (which
    must not exist or be empty). Episodes the store rejects or that do not fit the dataset's
    schema (set by the first exported episode) are skipped and listed in the summary. fps None:
    the frame rate the episodes were imported with (manifest attribute lerobot.fps) when they
    all agree, else 30; robot type and feature names likewise come back from imported episodes."""
    where = where or ExportFilter()
    video = video or VideoSettings()
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LeRobotFormatError(f"{out} exists and is not an empty directory")
    if fps is not None and fps <= 0:
        raise ValueError(f"--fps must be positive, got {fps}")
    started = time.monotonic()
    summary = ExportSummary(out_dir=str(out))

    selected = []  # (started_ns, key): the dataset is in chronological order
    source = SourceMetadata()
    for key in manifest_keys(store, where.robot):
        try:
            manifest = read_manifest(store, key)
        except EpisodeRejected as e:
            summary.skipped.append(f"{key}: {e}")
            continue
        if where.matches(manifest):
            selected.append((manifest.started_ns, key))
            source.add(manifest)
    if fps is None:
        fps = source.fps() or 30
    keys = [key for _, key in sorted(selected)]
    if not keys:
        raise LeRobotFormatError(f"no episode in {store.uri} matches the filters")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writer = LeRobotWriter(tmp, fps, video, data_file_size_mb, chunks_size)
    bar = Progress(len(keys), "export", enabled=progress)
    try:
        for key in keys:
            chunks: dict[int, pb.StepChunk] = {}
            try:
                ep = read_episode(store, key, keep_chunks=chunks)
            except EpisodeRejected as e:
                summary.skipped.append(f"{key}: {e}")
                log.debug("skipping %s: %s", key, e)
                bar.update(1)
                continue
            problem = writer.accepts(ep, chunks)
            if problem:
                summary.skipped.append(f"{key}: {problem}")
                log.debug("skipping %s: %s", key, problem)
                bar.update(1)
                continue
            frames = writer.add_episode(ep, chunks)
            bar.update(1, frames)
        if writer.total_episodes == 0:
            raise LeRobotFormatError(f"none of the {len(keys)} matching episodes could be exported: "
                                     + "; ".join(summary.skipped[:5]))
        writer.finish(robot_type=source.agreed("robot_type") or "fleetloop", names=source.names())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    summary.episodes, summary.frames, summary.tasks = writer.total_episodes, writer.total_frames, len(writer.tasks)
    summary.seconds = time.monotonic() - started
    return summary


# ---- CLI --------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fleetloop.config import default_store_uri
    parser.add_argument("--format", choices=["lerobot"], default="lerobot", help="output format")
    parser.add_argument("--store", default=default_store_uri(), help="store URI (file:///path or s3://bucket/prefix)")
    parser.add_argument("--out", required=True, help="dataset directory to create (must not exist or be empty)")
    parser.add_argument("--task", help="only episodes with this task id or instruction")
    parser.add_argument("--robot", help="only this robot's episodes")
    parser.add_argument("--outcome", choices=sorted(OUTCOMES), help="only episodes with this outcome")
    parser.add_argument("--kind", choices=sorted(KINDS), help="only rollouts or only demonstrations")
    parser.add_argument("--fps", type=int, default=None,
                        help="frame rate of the dataset (default: the rate imported episodes came with, else 30)")
    parser.add_argument("--vcodec", choices=sorted(CODECS), default="h264",
                        help="video codec (default h264; LeRobot's own default is av1)")
    parser.add_argument("--crf", type=int, help="encoder quality (lower is better; codec default if unset)")
    parser.add_argument("--gop", type=int, default=2, help="keyframe interval in frames (default 2)")
    parser.add_argument("--data-file-mb", type=float, default=DEFAULT_DATA_FILE_SIZE_MB,
                        help="start a new data parquet file past this size")
    parser.add_argument("--video-file-mb", type=float, default=DEFAULT_VIDEO_FILE_SIZE_MB,
                        help="start a new mp4 file past this size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    where = ExportFilter(task=args.task, robot=args.robot, outcome=args.outcome, kind=args.kind)
    video = VideoSettings(codec=args.vcodec, crf=args.crf, gop=args.gop, file_size_mb=args.video_file_mb)
    try:
        store = open_store(args.store)
        summary = export_dataset(store, args.out, fps=args.fps, where=where, video=video,
                                 data_file_size_mb=args.data_file_mb, progress=not args.no_progress)
    except (LeRobotFormatError, ValueError, StoreError, OSError) as e:
        print(f"fleetloop export: error: {e}", file=sys.stderr)
        return 1
    for line in summary.skipped:
        print(f"fleetloop export: skipped {line}", file=sys.stderr)
    print(f"exported {summary.episodes} episodes ({summary.frames} frames, {summary.tasks} tasks) to "
          f"{summary.out_dir} in {summary.seconds:.1f} s ({summary.frames_per_s:.0f} frames/s)"
          + (f"; skipped {len(summary.skipped)}" if summary.skipped else ""))
    return 0
