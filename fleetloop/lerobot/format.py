"""The LeRobotDataset v3 layout, shared by the exporter and the importer.

A v3 dataset is a directory:

  meta/info.json                                  codebase_version "v3.0", fps, features, path templates
  meta/stats.json                                 per feature: min/max/mean/std/count
  meta/tasks.parquet                              task string (pandas index "task") -> task_index
  meta/episodes/chunk-000/file-000.parquet        one row per episode (lengths, where its frames live)
  data/chunk-000/file-000.parquet                 one row per frame, many episodes per file
  videos/<video_key>/chunk-000/file-000.mp4       one stream per camera, many episodes per file

Files roll over to file-001, ... past a size; every `chunks_size` files the chunk index goes up.
An episode's frames in a shared mp4 sit at [from_timestamp, to_timestamp); a frame's time in the
file is `from_timestamp + timestamp` (timestamps in the data are episode-relative).

docs/lerobot.md documents how fleetloop episodes map onto this.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import numpy as np

CODEBASE_VERSION = "v3.0"
DEFAULT_CHUNKS_SIZE = 1000          # files per chunk directory
DEFAULT_DATA_FILE_SIZE_MB = 100
DEFAULT_VIDEO_FILE_SIZE_MB = 200

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
EPISODES_PATH = EPISODES_DIR + "/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"

IMAGE_KEY_PREFIX = "observation.images."
STATE_KEY = "observation.state"
ACTION_KEY = "action"

# The columns every LeRobot frame has (besides the user features).
INDEX_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}

# LeRobot's conventional RL columns.
REWARD_KEY = "next.reward"
DONE_KEY = "next.done"
SUCCESS_KEY = "next.success"

# fleetloop's own frame columns: LeRobot loads them like any other feature and ignores them
# for training; our importer reads them back.
FL_INTERVENTION = "fleetloop.intervention"
FL_OUTCOME = "fleetloop.outcome"
FL_POLICY_VERSION = "fleetloop.policy_version"
FL_EPISODE_ID = "fleetloop.episode_id"
FL_ROBOT_ID = "fleetloop.robot_id"
FL_TIMESTAMP_NS = "fleetloop.timestamp_ns"

FLEETLOOP_FEATURES = {
    REWARD_KEY: {"dtype": "float32", "shape": [1], "names": None},
    DONE_KEY: {"dtype": "bool", "shape": [1], "names": None},
    FL_INTERVENTION: {"dtype": "bool", "shape": [1], "names": None},
    FL_OUTCOME: {"dtype": "string", "shape": [1], "names": None},
    FL_POLICY_VERSION: {"dtype": "string", "shape": [1], "names": None},
    FL_EPISODE_ID: {"dtype": "string", "shape": [1], "names": None},
    FL_ROBOT_ID: {"dtype": "string", "shape": [1], "names": None},
    FL_TIMESTAMP_NS: {"dtype": "int64", "shape": [1], "names": None},
}

# fleetloop's own per-episode columns in meta/episodes/*.parquet.
EP_EPISODE_ID = "fleetloop.episode_id"
EP_ROBOT_ID = "fleetloop.robot_id"
EP_TASK_ID = "fleetloop.task_id"
EP_OUTCOME = "fleetloop.outcome"
EP_OUTCOME_SOURCE = "fleetloop.outcome_source"
EP_POLICY_VERSION = "fleetloop.policy_version"
EP_KIND = "fleetloop.kind"
EP_STARTED_NS = "fleetloop.started_ns"
EP_ENDED_NS = "fleetloop.ended_ns"
EP_INCOMPLETE = "fleetloop.incomplete"
EP_INTERVENTIONS = "fleetloop.interventions"  # JSON list of {start_step, end_step, operator, reason}

# Episode-metadata columns the importer needs.
EPISODE_COLUMNS = ["episode_index", "length", "data/chunk_index", "data/file_index",
                   "dataset_from_index", "dataset_to_index"]
VIDEO_COLUMNS = ["chunk_index", "file_index", "from_timestamp", "to_timestamp"]


class LeRobotFormatError(Exception):
    """The directory is not a LeRobot v3 dataset we can read, or one of its files is damaged."""


def video_column(video_key: str, name: str) -> str:
    return f"videos/{video_key}/{name}"


def camera_to_key(camera: str) -> str:
    return IMAGE_KEY_PREFIX + camera


def key_to_camera(key: str) -> str:
    """observation.images.front -> front; observation.image -> image (older single-camera sets)."""
    for prefix in (IMAGE_KEY_PREFIX, "observation."):
        if key.startswith(prefix) and len(key) > len(prefix):
            return key[len(prefix):]
    return key


def next_file(chunk_index: int, file_index: int, chunks_size: int) -> tuple[int, int]:
    """The (chunk, file) after this one: file-999 of chunk-000 is followed by file-000 of chunk-001."""
    if file_index + 1 >= chunks_size:
        return chunk_index + 1, 0
    return chunk_index, file_index + 1


def slug(text: str, max_len: int = 64) -> str:
    """A store-safe id from free text ('Pick up the cube!' -> 'pick-up-the-cube')."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip().lower()).strip("-._")
    return s[:max_len].rstrip("-._") or "task"


def to_rgb(image: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 -> HxWx3 (videos are RGB)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    if image.shape[2] != 3:
        raise ValueError(f"cannot turn a {image.shape[2]}-channel image into RGB")
    return image


# ---- statistics (meta/stats.json and per-episode stats/<feature>/<stat> columns) ------------

@dataclass
class FeatureStats:
    """min/max/mean/std/count of one feature, mergeable (LeRobot's parallel-variance rule).
    Vectors keep one value per dimension; images keep one per channel, shaped (C, 1, 1) and
    scaled to [0, 1] as LeRobot does."""
    count: int
    mean: np.ndarray
    var: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> FeatureStats:
        """Stats over the first axis of an [N, ...] array."""
        v = np.asarray(values, dtype=np.float64)
        return cls(count=len(v), mean=v.mean(axis=0), var=v.var(axis=0), min=v.min(axis=0), max=v.max(axis=0))

    def merge(self, other: FeatureStats | None) -> FeatureStats:
        if other is None:
            return self
        n = self.count + other.count
        mean = (self.mean * self.count + other.mean * other.count) / n
        var = ((self.var + (self.mean - mean) ** 2) * self.count
               + (other.var + (other.mean - mean) ** 2) * other.count) / n
        return FeatureStats(count=n, mean=mean, var=var, min=np.minimum(self.min, other.min),
                            max=np.maximum(self.max, other.max))

    def to_json(self) -> dict:
        return {"min": self.min.tolist(), "max": self.max.tolist(), "mean": self.mean.tolist(),
                "std": np.sqrt(np.maximum(self.var, 0.0)).tolist(), "count": [int(self.count)]}


def sampled_frames(length: int) -> set[int]:
    """Which frames of an episode feed the image statistics: all of short episodes, then
    growing like length**0.75 up to 10,000 (LeRobot's sampling)."""
    count = max(min(100, length), min(int(length ** 0.75), 10_000))
    return set(np.round(np.linspace(0, length - 1, count)).astype(int).tolist()) if length else set()


class ImageStats:
    """Per-channel pixel statistics accumulated frame by frame (bounded memory). Large frames
    are subsampled spatially to about 150 pixels a side, as LeRobot does."""

    def __init__(self):
        self.frames = 0
        self.pixels = 0
        self.sum = self.sumsq = self.min = self.max = None

    def add(self, rgb: np.ndarray) -> None:
        step = max(1, max(rgb.shape[:2]) // 150) if max(rgb.shape[:2]) >= 300 else 1
        planes = np.ascontiguousarray(rgb[::step, ::step].transpose(2, 0, 1)).reshape(rgb.shape[2], -1)
        values = planes.astype(np.float32)
        if self.sum is None:
            c = planes.shape[0]
            self.sum, self.sumsq = np.zeros(c), np.zeros(c)
            self.min, self.max = np.full(c, 255.0), np.zeros(c)
        self.frames += 1
        self.pixels += planes.shape[1]
        self.sum += planes.sum(axis=1, dtype=np.uint64)
        self.sumsq += np.einsum("ij,ij->i", values, values, dtype=np.float64)
        self.min = np.minimum(self.min, planes.min(axis=1))
        self.max = np.maximum(self.max, planes.max(axis=1))

    def result(self) -> FeatureStats | None:
        """Stats scaled to [0, 1], each shaped (C, 1, 1)."""
        if not self.frames:
            return None
        mean = self.sum / self.pixels
        var = np.maximum(self.sumsq / self.pixels - mean ** 2, 0.0)
        shape = (-1, 1, 1)
        return FeatureStats(count=self.frames, mean=(mean / 255).reshape(shape), var=(var / 255**2).reshape(shape),
                            min=(self.min / 255).reshape(shape), max=(self.max / 255).reshape(shape))


# ---- progress ---------------------------------------------------------------------------------

class Progress:
    """A progress bar on stderr: tqdm when installed, else a plain line every second or so."""

    def __init__(self, total: int, desc: str, unit: str = "episode", enabled: bool = True):
        self._bar = None
        self._total, self._desc, self._unit, self._enabled = total, desc, unit, enabled
        self._done = 0
        self._frames = 0
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass

    def update(self, episodes: int = 1, frames: int = 0) -> None:
        self._done += episodes
        self._frames += frames
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(frames=self._frames, refresh=False)
            self._bar.update(episodes)
            return
        import time
        now = time.monotonic()
        if now - self._last >= 1.0 or self._done == self._total:
            self._last = now
            print(f"{self._desc}: {self._done}/{self._total} {self._unit}s, {self._frames} frames",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
