"""The LeRobotDataset v3 writer of `fleetloop export` (fleetloop/lerobot/export.py): episodes are
added one at a time; frames go to the data parquet files as one row group per episode, images to
the video encoder frame by frame, statistics are merged as they come."""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetloop.buffer.codec import LoadedEpisode, decode_image, outcome_name
from fleetloop.lerobot.format import (
    ACTION_KEY,
    CODEBASE_VERSION,
    DATA_PATH,
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_DATA_FILE_SIZE_MB,
    DONE_KEY,
    EP_ENDED_NS,
    EP_EPISODE_ID,
    EP_INCOMPLETE,
    EP_INTERVENTIONS,
    EP_KIND,
    EP_OUTCOME,
    EP_OUTCOME_SOURCE,
    EP_POLICY_VERSION,
    EP_ROBOT_ID,
    EP_STARTED_NS,
    EP_TASK_ID,
    EPISODES_PATH,
    FL_EPISODE_ID,
    FL_INTERVENTION,
    FL_OUTCOME,
    FL_POLICY_VERSION,
    FL_ROBOT_ID,
    FL_TIMESTAMP_NS,
    FLEETLOOP_FEATURES,
    INDEX_FEATURES,
    INFO_PATH,
    REWARD_KEY,
    STATE_KEY,
    STATS_PATH,
    TASKS_PATH,
    VIDEO_PATH,
    FeatureStats,
    ImageStats,
    camera_to_key,
    next_file,
    sampled_frames,
    to_rgb,
    video_column,
)
from fleetloop.lerobot.video import RollingVideoWriter, VideoSettings
from fleetloop.proto.v1 import episode_pb2 as pb

KIND_NAMES = {pb.EPISODE_KIND_UNSPECIFIED: "unspecified", pb.EPISODE_KIND_ROLLOUT: "rollout",
              pb.EPISODE_KIND_DEMONSTRATION: "demonstration"}
LABEL_SOURCE_NAMES = {pb.LABEL_SOURCE_UNSPECIFIED: "unspecified", pb.LABEL_SOURCE_ROBOT: "robot",
                      pb.LABEL_SOURCE_ENVIRONMENT: "environment", pb.LABEL_SOURCE_OPERATOR: "operator"}


def task_string(m: pb.EpisodeManifest) -> str:
    """LeRobot's task is the natural-language instruction."""
    return m.instruction or m.task_id or "unspecified task"


class RollingParquet:
    """data/ or meta/episodes/ parquet files: tables are appended as row groups; a new file is
    started (before a write) once the current one is past the size limit."""

    def __init__(self, root: Path, template: str, file_size_mb: float, chunks_size: int):
        self.root, self.template = root, template
        self.file_size_mb, self.chunks_size = file_size_mb, chunks_size
        self.chunk_index, self.file_index = 0, -1
        self._writer = None
        self._path: Path | None = None

    def location(self) -> tuple[int, int]:
        """The (chunk, file) the next write goes to, rolling over if the current file is full."""
        full = self._path is not None and os.path.getsize(self._path) / 2**20 >= self.file_size_mb
        if self._writer is None or full:
            self.close()
            if self.file_index < 0:
                self.file_index = 0
            else:
                self.chunk_index, self.file_index = next_file(self.chunk_index, self.file_index,
                                                              self.chunks_size)
            self._path = self.root / self.template.format(chunk_index=self.chunk_index,
                                                          file_index=self.file_index)
        return self.chunk_index, self.file_index

    def write(self, table, location: tuple[int, int]) -> None:
        import pyarrow.parquet as pq
        assert location == (self.chunk_index, self.file_index)
        if self._writer is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._path, table.schema, compression="snappy")
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass
class EpisodeSchema:
    """What every episode of one dataset must share: the first exported episode sets it."""
    state_dim: int
    action_dim: int
    cameras: dict[str, tuple[int, int]]   # camera -> (height, width)

    @classmethod
    def of(cls, ep: LoadedEpisode, first_step: pb.Step | None) -> EpisodeSchema:
        sizes = {img.camera: (img.height, img.width) for img in (first_step.images if first_step else [])}
        names = list(ep.manifest.cameras) or list(sizes)
        cameras = {cam: sizes[cam] for cam in names if cam in sizes}
        return cls(ep.states.shape[1], ep.actions.shape[1], cameras)

    def mismatch(self, ep: LoadedEpisode, chunks: dict[int, pb.StepChunk]) -> str | None:
        """Why this episode cannot go into the dataset, or None."""
        if ep.manifest.num_steps == 0:
            return "no steps"
        if ep.actions.shape[1] == 0:
            return "no actions"
        if (ep.states.shape[1], ep.actions.shape[1]) != (self.state_dim, self.action_dim):
            return (f"state/action dims {ep.states.shape[1]}/{ep.actions.shape[1]}, the dataset has "
                    f"{self.state_dim}/{self.action_dim}")
        for chunk in chunks.values():
            for step in chunk.steps:
                images = {img.camera: img for img in step.images}
                for cam, hw in self.cameras.items():
                    img = images.get(cam)
                    if img is None or (img.height, img.width) != hw:
                        size = "missing" if img is None else f"{img.height}x{img.width}"
                        return f"step {step.index}: camera {cam!r} is {size}, the dataset has {hw[0]}x{hw[1]}"
                    if img.channels not in (1, 3, 4):
                        return f"step {step.index}: camera {cam!r} has {img.channels} channels"
                    # a damaged image skips this episode, not the whole export (decoded again when
                    # written: the episode's frames are not all held in memory)
                    try:
                        arr = decode_image(img)
                    except Exception as e:  # noqa: BLE001 -- PIL raises many types for damaged data
                        return f"step {step.index}: camera {cam!r} image does not decode ({type(e).__name__})"
                    if arr.shape[:2] != hw:
                        return f"step {step.index}: camera {cam!r} decodes to {arr.shape[0]}x{arr.shape[1]}, not {hw[0]}x{hw[1]}"
        return None


class LeRobotWriter:
    """Builds a v3 dataset under `root`, one episode at a time."""

    def __init__(self, root: Path, fps: int, video: VideoSettings,
                 data_file_size_mb: float = DEFAULT_DATA_FILE_SIZE_MB,
                 chunks_size: int = DEFAULT_CHUNKS_SIZE, episodes_per_flush: int = 64):
        self.root, self.fps, self.video = root, fps, video
        self.chunks_size, self.data_file_size_mb = chunks_size, data_file_size_mb
        self.data = RollingParquet(root, DATA_PATH, data_file_size_mb, chunks_size)
        self.episodes_meta = RollingParquet(root, EPISODES_PATH, data_file_size_mb, chunks_size)
        self.schema: EpisodeSchema | None = None
        self.videos: dict[str, RollingVideoWriter] = {}
        self.tasks: dict[str, int] = {}
        self.stats: dict[str, FeatureStats] = {}
        self.total_episodes = self.total_frames = 0
        self._pending_rows: list[dict] = []
        self._episode_row_schema = None
        self._episodes_per_flush = episodes_per_flush
        self._data_schema = None

    # -- schema --

    def _start(self, schema: EpisodeSchema) -> None:
        import pyarrow as pa
        self.schema = schema
        for cam, (h, w) in schema.cameras.items():
            self.videos[cam] = RollingVideoWriter(self.root, camera_to_key(cam), self.fps, h, w, self.video)
        fields = []
        if schema.state_dim:
            fields.append(pa.field(STATE_KEY, pa.list_(pa.float32(), schema.state_dim)))
        fields += [pa.field(ACTION_KEY, pa.list_(pa.float32(), schema.action_dim)),
                   pa.field("timestamp", pa.float32()), pa.field("frame_index", pa.int64()),
                   pa.field("episode_index", pa.int64()), pa.field("index", pa.int64()),
                   pa.field("task_index", pa.int64()), pa.field(REWARD_KEY, pa.float32()),
                   pa.field(DONE_KEY, pa.bool_()), pa.field(FL_INTERVENTION, pa.bool_()),
                   pa.field(FL_OUTCOME, pa.string()), pa.field(FL_POLICY_VERSION, pa.string()),
                   pa.field(FL_EPISODE_ID, pa.string()), pa.field(FL_ROBOT_ID, pa.string()),
                   pa.field(FL_TIMESTAMP_NS, pa.int64())]
        self._data_schema = pa.schema(fields)

    def features(self, names: dict | None = None) -> dict:
        """names: feature key -> the `names` an imported dataset had (kept when they fit)."""
        s = self.schema
        names = names or {}

        def fitting(key, n, default):
            v = names.get(key)
            return v if _names_fit(v, n) else default
        feats: dict[str, dict] = {}
        if s.state_dim:
            feats[STATE_KEY] = {"dtype": "float32", "shape": [s.state_dim],
                                "names": fitting(STATE_KEY, s.state_dim, [f"state_{i}" for i in range(s.state_dim)])}
        feats[ACTION_KEY] = {"dtype": "float32", "shape": [s.action_dim],
                             "names": fitting(ACTION_KEY, s.action_dim, [f"action_{i}" for i in range(s.action_dim)])}
        for cam, writer in self.videos.items():
            feats[camera_to_key(cam)] = {"dtype": "video", "shape": [writer.height, writer.width, 3],
                                         "names": ["height", "width", "channels"], "info": writer.info()}
        feats.update(copy.deepcopy(INDEX_FEATURES))
        feats.update(copy.deepcopy(FLEETLOOP_FEATURES))
        return feats

    def accepts(self, ep: LoadedEpisode, chunks: dict[int, pb.StepChunk]) -> str | None:
        """None if the episode fits the dataset (fixing the schema on the first one), else why not."""
        if self.schema is None:
            first = chunks[min(chunks)].steps[0] if chunks and chunks[min(chunks)].steps else None
            candidate = EpisodeSchema.of(ep, first)
            problem = candidate.mismatch(ep, chunks)
            if problem is None:
                self._start(candidate)
            return problem
        return self.schema.mismatch(ep, chunks)

    # -- episodes --

    def add_episode(self, ep: LoadedEpisode, chunks: dict[int, pb.StepChunk]) -> int:
        """Write one episode (accepted by `accepts`). Consumes `chunks`. Returns its frame count."""
        import pyarrow as pa
        m = ep.manifest
        n = int(m.num_steps)
        episode_index, first_index = self.total_episodes, self.total_frames
        task = task_string(m)
        task_index = self.tasks.setdefault(task, len(self.tasks))

        image_stats = {cam: ImageStats() for cam in self.videos}
        sampled = sampled_frames(n)
        for writer in self.videos.values():
            writer.begin_episode()
        rewards = np.zeros(n, dtype=np.float32)
        stamps = np.zeros(n, dtype=np.int64)
        i = 0
        for chunk_index in sorted(chunks):
            chunk = chunks.pop(chunk_index)   # free each chunk once it is written
            for step in chunk.steps:
                rewards[i], stamps[i] = step.reward, step.timestamp_ns
                by_camera = {img.camera: img for img in step.images}
                for cam, writer in self.videos.items():
                    rgb = to_rgb(decode_image(by_camera[cam]))
                    writer.add_frame(rgb)
                    if i in sampled:
                        image_stats[cam].add(rgb)
                i += 1
        spans = {cam: writer.end_episode() for cam, writer in self.videos.items()}

        frame_index = np.arange(n, dtype=np.int64)
        outcome = outcome_name(m.outcome)
        columns = {
            STATE_KEY: ep.states, ACTION_KEY: ep.actions,
            "timestamp": (frame_index / self.fps).astype(np.float32), "frame_index": frame_index,
            "episode_index": np.full(n, episode_index, dtype=np.int64),
            "index": first_index + frame_index, "task_index": np.full(n, task_index, dtype=np.int64),
            REWARD_KEY: rewards, DONE_KEY: frame_index == n - 1, FL_INTERVENTION: ep.intervention,
            FL_TIMESTAMP_NS: stamps,
        }
        arrays = []
        for f in self._data_schema:
            if f.name in (STATE_KEY, ACTION_KEY):
                values = np.ascontiguousarray(columns[f.name], dtype=np.float32)
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]))
            elif f.name in columns:
                arrays.append(pa.array(columns[f.name], type=f.type))
            else:
                value = {FL_OUTCOME: outcome, FL_POLICY_VERSION: m.policy_version,
                         FL_EPISODE_ID: m.episode_id, FL_ROBOT_ID: m.robot_id}[f.name]
                arrays.append(pa.array([value] * n, type=pa.string()))
        table = pa.Table.from_arrays(arrays, schema=self._data_schema)
        location = self.data.location()
        self.data.write(table, location)

        # Statistics: per episode (a row of meta/episodes) and merged into meta/stats.json.
        ep_stats: dict[str, FeatureStats] = {}
        for name, values in columns.items():
            if name == STATE_KEY and not self.schema.state_dim:
                continue
            values = np.asarray(values)
            ep_stats[name] = FeatureStats.of(values.reshape(n, -1))
        for cam, acc in image_stats.items():
            result = acc.result()
            if result is not None:
                ep_stats[camera_to_key(cam)] = result
        for name, st in ep_stats.items():
            self.stats[name] = st.merge(self.stats.get(name))

        row = {"episode_index": episode_index, "tasks": [task], "length": n,
               "data/chunk_index": location[0], "data/file_index": location[1],
               "dataset_from_index": first_index, "dataset_to_index": first_index + n}
        for cam, span in spans.items():
            key = camera_to_key(cam)
            row[video_column(key, "chunk_index")] = span.chunk_index
            row[video_column(key, "file_index")] = span.file_index
            row[video_column(key, "from_timestamp")] = span.from_timestamp
            row[video_column(key, "to_timestamp")] = span.to_timestamp
        row.update({
            EP_EPISODE_ID: m.episode_id, EP_ROBOT_ID: m.robot_id, EP_TASK_ID: m.task_id,
            EP_OUTCOME: outcome, EP_OUTCOME_SOURCE: LABEL_SOURCE_NAMES.get(m.outcome_source, "unspecified"),
            EP_POLICY_VERSION: m.policy_version, EP_KIND: KIND_NAMES.get(m.kind, "unspecified"),
            EP_STARTED_NS: int(m.started_ns), EP_ENDED_NS: int(m.ended_ns), EP_INCOMPLETE: bool(m.incomplete),
            EP_INTERVENTIONS: json.dumps([{"start_step": s.start_step, "end_step": s.end_step,
                                           "operator": s.operator, "reason": s.reason} for s in m.interventions]),
        })
        for name, st in ep_stats.items():
            for stat, value in st.to_json().items():
                row[f"stats/{name}/{stat}"] = value
        self._pending_rows.append(row)
        if len(self._pending_rows) >= self._episodes_per_flush:
            self._flush_episode_rows()

        self.total_episodes += 1
        self.total_frames += n
        return n

    def _flush_episode_rows(self) -> None:
        import pyarrow as pa
        if not self._pending_rows:
            return
        location = self.episodes_meta.location()
        for row in self._pending_rows:
            row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = location
        if self._episode_row_schema is None:
            self._episode_row_schema = pa.Table.from_pylist(self._pending_rows[:1]).schema
        table = pa.Table.from_pylist(self._pending_rows, schema=self._episode_row_schema)
        self.episodes_meta.write(table, location)
        self._pending_rows.clear()

    # -- closing --

    def finish(self, robot_type: str | None = "fleetloop", names: dict | None = None) -> dict:
        """Close every file and write meta/tasks.parquet, meta/stats.json and meta/info.json."""
        for writer in self.videos.values():
            writer.close()
        self.data.close()
        self._flush_episode_rows()
        self.episodes_meta.close()
        write_tasks(self.root / TASKS_PATH, self.tasks)
        stats = {name: st.to_json() for name, st in self.stats.items()}
        (self.root / STATS_PATH).write_text(json.dumps(stats, indent=2))
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": robot_type,
            "total_episodes": self.total_episodes,
            "total_frames": self.total_frames,
            "total_tasks": len(self.tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": _number(self.data_file_size_mb),
            "video_files_size_in_mb": _number(self.video.file_size_mb),
            "fps": self.fps,
            "splits": {"train": f"0:{self.total_episodes}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.videos else None,
            "features": self.features(names),
        }
        (self.root / INFO_PATH).write_text(json.dumps(info, indent=4))
        return info

    def abort(self) -> None:
        """Close what is open after a failure (best effort: the directory is deleted anyway)."""
        for closable in [*self.videos.values(), self.data, self.episodes_meta]:
            with contextlib.suppress(Exception):
                closable.close()


def _names_fit(names, n: int) -> bool:
    """LeRobot feature names: a list of n strings, or {"group": [n strings]}."""
    if isinstance(names, list):
        return len(names) == n and all(isinstance(x, str) for x in names)
    if isinstance(names, dict) and len(names) == 1:
        return _names_fit(next(iter(names.values())), n)
    return False


class SourceMetadata:
    """What imported episodes remember of their LeRobot dataset (manifest attributes written by
    fleetloop.lerobot.importer): fps, robot type, feature names. Written back when every exported
    episode agrees."""

    KEYS = {"fps": "lerobot.fps", "robot_type": "lerobot.robot_type", "names": "lerobot.feature_names"}

    def __init__(self):
        self.values: dict[str, set] = {k: set() for k in self.KEYS}

    def add(self, m: pb.EpisodeManifest) -> None:
        for k, attr in self.KEYS.items():
            self.values[k].add(m.attributes.get(attr, ""))

    def agreed(self, key: str) -> str | None:
        v = self.values[key]
        return next(iter(v)) if len(v) == 1 and "" not in v else None

    def fps(self) -> int | None:
        v = self.agreed("fps")
        try:
            f = float(v) if v is not None else None
        except ValueError:
            return None
        return int(f) if f and f > 0 and float(f).is_integer() else None

    def names(self) -> dict:
        v = self.agreed("names")
        try:
            d = json.loads(v) if v else {}
        except json.JSONDecodeError:
            return {}
        return d if isinstance(d, dict) else {}


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def write_tasks(path: Path, tasks: dict[str, int]) -> None:
    """meta/tasks.parquet as LeRobot writes it: a pandas frame indexed by the task string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(tasks, key=tasks.get)
    try:
        import pandas as pd
    except ImportError:  # same columns, without the pandas index marker
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"task_index": pa.array([tasks[t] for t in ordered], pa.int64()),
                                 "task": pa.array(ordered, pa.string())}), path)
        return
    frame = pd.DataFrame({"task_index": [tasks[t] for t in ordered]}, index=pd.Index(ordered, name="task"))
    frame.to_parquet(path)
