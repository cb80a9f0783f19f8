"""`fleetloop import --format lerobot DIR`: load a LeRobotDataset v3 (one we exported, or one
LeRobot produced) into the store as DEMONSTRATION episodes -- the offline buffer.

The directory is checked before anything is written (meta/info.json, codebase_version, the
columns of every parquet file, that every referenced data and video file exists and opens), so
an invalid dataset is refused with a clear message and leaves the store untouched. Episodes are
then imported one at a time: frames are read, video frames decoded and PNG-encoded, and the
episode is committed (chunks, then manifest) only once all of it decoded. A damaged episode
found mid-way stops the import with an error; the episodes committed before it are complete,
and re-running rewrites them under the same ids.

Column mapping: docs/lerobot.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetloop.buffer.codec import Limits, check_id, commit_episode, encode_chunk, encode_image, episode_prefix
from fleetloop.buffer.store import ObjectStore, StoreError, open_store
from fleetloop.lerobot.format import (
    ACTION_KEY,
    DATA_PATH,
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
    EPISODE_COLUMNS,
    EPISODES_DIR,
    FL_EPISODE_ID,
    FL_INTERVENTION,
    FL_OUTCOME,
    FL_POLICY_VERSION,
    FL_ROBOT_ID,
    FL_TIMESTAMP_NS,
    INFO_PATH,
    REWARD_KEY,
    STATE_KEY,
    SUCCESS_KEY,
    TASKS_PATH,
    VIDEO_COLUMNS,
    VIDEO_PATH,
    LeRobotFormatError,
    Progress,
    key_to_camera,
    slug,
    to_rgb,
    video_column,
)
from fleetloop.lerobot.video import decode_frames
from fleetloop.proto.v1 import SCHEMA_VERSION
from fleetloop.proto.v1 import episode_pb2 as pb

STEPS_PER_CHUNK = 100
DEFAULT_ROBOT_ID = "lerobot-import"
OUTCOMES = {"success": pb.OUTCOME_SUCCESS, "failure": pb.OUTCOME_FAILURE, "unknown": pb.OUTCOME_UNKNOWN}
LABEL_SOURCES = {"robot": pb.LABEL_SOURCE_ROBOT, "environment": pb.LABEL_SOURCE_ENVIRONMENT,
                 "operator": pb.LABEL_SOURCE_OPERATOR}
# Frame columns read when present (besides action, the state, the cameras and the index columns).
OPTIONAL_FRAME_COLUMNS = [REWARD_KEY, SUCCESS_KEY, FL_INTERVENTION, FL_OUTCOME, FL_POLICY_VERSION,
                          FL_EPISODE_ID, FL_ROBOT_ID, FL_TIMESTAMP_NS, "frame_index"]
OPTIONAL_EPISODE_COLUMNS = ["tasks", EP_EPISODE_ID, EP_ROBOT_ID, EP_TASK_ID, EP_OUTCOME, EP_OUTCOME_SOURCE,
                            EP_POLICY_VERSION, EP_KIND, EP_STARTED_NS, EP_ENDED_NS, EP_INCOMPLETE,
                            EP_INTERVENTIONS]


def _pq():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LeRobotFormatError("reading LeRobot datasets needs pyarrow: pip install pyarrow") from None
    return pa, pq


def _schema_names(path: Path) -> set[str]:
    _, pq = _pq()
    try:
        return set(pq.read_schema(path).names)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for damaged files
        raise LeRobotFormatError(f"{path} is not a readable parquet file: {e}") from None


# ---- the dataset directory --------------------------------------------------------------------

@dataclass
class LeRobotDataset:
    """A checked LeRobot v3 dataset directory (see `open_dataset`)."""
    root: Path
    info: dict
    fps: float
    state_key: str | None
    video_keys: list[str]
    image_keys: list[str]            # features stored as images inside the parquet files
    tasks: dict[int, str]
    episode_files: list[Path]
    episode_columns: list[str]       # the columns read from meta/episodes/*.parquet
    frame_columns: list[str]         # the columns read from data/*.parquet
    total_episodes: int
    digest: str                      # identifies the dataset (hash of meta/info.json)

    @property
    def data_path(self) -> str:
        return self.info.get("data_path") or DATA_PATH

    @property
    def video_path(self) -> str:
        return self.info.get("video_path") or VIDEO_PATH

    def data_file(self, chunk_index: int, file_index: int) -> Path:
        return self.root / self.data_path.format(chunk_index=int(chunk_index), file_index=int(file_index))

    def video_file(self, key: str, chunk_index: int, file_index: int) -> Path:
        return self.root / self.video_path.format(video_key=key, chunk_index=int(chunk_index),
                                                  file_index=int(file_index))

    def episode_rows(self):
        """Episode metadata rows (dicts), file by file, in episode order."""
        _, pq = _pq()
        for path in self.episode_files:
            try:
                table = pq.read_table(path, columns=self.episode_columns)
            except Exception as e:  # noqa: BLE001
                raise LeRobotFormatError(f"{path} is not a readable parquet file: {e}") from None
            yield from sorted(table.to_pylist(), key=lambda r: r["episode_index"])


def open_dataset(root: str | Path, check_videos: bool = True) -> LeRobotDataset:
    """Check that `root` is a LeRobot v3 dataset we can import; raise LeRobotFormatError saying
    what is wrong otherwise. Reads only metadata, parquet schemas and video headers."""
    root = Path(root)
    if not root.is_dir():
        raise LeRobotFormatError(f"{root} is not a directory")
    info_path = root / INFO_PATH
    if not info_path.is_file():
        raise LeRobotFormatError(f"{root} is not a LeRobot dataset: {INFO_PATH} is missing")
    raw = info_path.read_bytes()
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LeRobotFormatError(f"{info_path} is not valid JSON: {e}") from None
    if not isinstance(info, dict):
        raise LeRobotFormatError(f"{info_path} is not a JSON object")
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        raise LeRobotFormatError(
            f"{root} has codebase_version {version or 'missing'!r}; this importer reads LeRobot v3.x "
            f"datasets (convert older ones with LeRobot's v2.1 -> v3.0 converter first)")
    features = info.get("features")
    if not isinstance(features, dict) or not features:
        raise LeRobotFormatError(f"{info_path} has no 'features'")
    try:
        fps = float(info["fps"])
    except (KeyError, TypeError, ValueError):
        raise LeRobotFormatError(f"{info_path} has no valid 'fps'") from None
    if fps <= 0:
        raise LeRobotFormatError(f"{info_path}: fps must be positive, got {fps}")
    if ACTION_KEY not in features:
        raise LeRobotFormatError(f"{info_path}: the dataset has no '{ACTION_KEY}' feature")
    bad = [k for k, ft in features.items() if not isinstance(ft, dict) or "dtype" not in ft]
    if bad:
        raise LeRobotFormatError(f"{info_path}: features without a dtype: {bad}")
    video_keys = [k for k, ft in features.items() if ft["dtype"] == "video"]
    image_keys = [k for k, ft in features.items() if ft["dtype"] == "image"]
    state_key = STATE_KEY if STATE_KEY in features else None

    tasks = _read_tasks(root / TASKS_PATH)

    episode_files = sorted((root / EPISODES_DIR).glob("*/*.parquet"))
    if not episode_files:
        raise LeRobotFormatError(f"{root} is not a LeRobot v3 dataset: no {EPISODES_DIR}/chunk-*/file-*.parquet")
    required = list(EPISODE_COLUMNS) + [video_column(k, c) for k in video_keys for c in VIDEO_COLUMNS]
    _, pq = _pq()
    optional = list(OPTIONAL_EPISODE_COLUMNS)
    data_files: set[tuple[int, int]] = set()
    video_files: set[tuple[str, int, int]] = set()
    total = 0
    for path in episode_files:
        names = _schema_names(path)
        missing = [c for c in required if c not in names]
        if missing:
            raise LeRobotFormatError(f"{path} lacks the columns {missing}")
        optional = [c for c in optional if c in names]
        wanted = ["data/chunk_index", "data/file_index"] + [video_column(k, c) for k in video_keys
                                                            for c in ("chunk_index", "file_index")]
        try:
            refs = pq.read_table(path, columns=wanted).to_pylist()
        except Exception as e:  # noqa: BLE001
            raise LeRobotFormatError(f"{path} is not a readable parquet file: {e}") from None
        total += len(refs)
        for r in refs:
            data_files.add((r["data/chunk_index"], r["data/file_index"]))
            for k in video_keys:
                video_files.add((k, r[video_column(k, "chunk_index")], r[video_column(k, "file_index")]))
    episode_columns = required + optional

    frame_required = [ACTION_KEY, "episode_index", "timestamp", "task_index"] + image_keys
    if state_key:
        frame_required.append(state_key)
    frame_columns = None
    tmp = LeRobotDataset(root, info, fps, state_key, video_keys, image_keys, tasks, episode_files,
                         episode_columns, [], total, hashlib.sha256(raw).hexdigest()[:8])
    for chunk_index, file_index in sorted(data_files):
        path = tmp.data_file(chunk_index, file_index)
        if not path.is_file():
            raise LeRobotFormatError(f"{path} is missing (referenced by {EPISODES_DIR})")
        names = _schema_names(path)
        missing = [c for c in frame_required if c not in names]
        if missing:
            raise LeRobotFormatError(f"{path} lacks the columns {missing}")
        present = frame_required + [c for c in OPTIONAL_FRAME_COLUMNS if c in names]
        frame_columns = present if frame_columns is None else [c for c in frame_columns if c in present]
    tmp.frame_columns = frame_columns or frame_required
    for key, chunk_index, file_index in sorted(video_files):
        path = tmp.video_file(key, chunk_index, file_index)
        if not path.is_file():
            raise LeRobotFormatError(f"{path} is missing (referenced by {EPISODES_DIR})")
        if check_videos:
            _check_video(path)
    return tmp


def _read_tasks(path: Path) -> dict[int, str]:
    """meta/tasks.parquet: the task string is the pandas index (a column named 'task' or
    '__index_level_0__' to pyarrow), next to a task_index column."""
    if not path.is_file():
        raise LeRobotFormatError(f"{path} is missing")
    _, pq = _pq()
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001
        raise LeRobotFormatError(f"{path} is not a readable parquet file: {e}") from None
    names = table.column_names
    text = next((c for c in ("task", "__index_level_0__") if c in names), None)
    if "task_index" not in names or text is None:
        raise LeRobotFormatError(f"{path} needs a task_index column and the task strings (columns: {names})")
    return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(), table.column(text).to_pylist())}


def _check_video(path: Path) -> None:
    import av
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise LeRobotFormatError(f"{path} has no video stream")
    except av.error.FFmpegError as e:
        raise LeRobotFormatError(f"{path} is not a readable video: {e}") from None


# ---- frames -----------------------------------------------------------------------------------

def _vectors(column, n: int, name: str) -> np.ndarray:
    """A list (or fixed-size list, or scalar) column -> float32 [n, d]."""
    pa, _ = _pq()
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if arr.null_count:
        raise LeRobotFormatError(f"column {name!r} has missing values")
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if not pa.types.is_fixed_size_list(arr.type):
            import pyarrow.compute as pc
            lengths = pc.list_value_length(arr)
            if len(arr) and pc.min(lengths).as_py() != pc.max(lengths).as_py():
                raise LeRobotFormatError(f"column {name!r} has rows of different lengths")
        arr = arr.flatten()
    values = arr.to_numpy(zero_copy_only=False).astype(np.float32)
    return values.reshape(n, -1) if n else values.reshape(0, 0)


class _DataFileCache:
    """Keeps the data parquet file the current episode is in (episodes are laid out in order,
    so each file is read once)."""

    def __init__(self, ds: LeRobotDataset):
        self.ds = ds
        self._path: Path | None = None
        self._table = None

    def frames(self, chunk_index: int, file_index: int, episode_index: int, length: int):
        _, pq = _pq()
        import pyarrow.compute as pc
        path = self.ds.data_file(chunk_index, file_index)
        if path != self._path:
            self._table = None
            try:
                self._table = pq.read_table(path, columns=self.ds.frame_columns)
            except Exception as e:  # noqa: BLE001
                raise LeRobotFormatError(f"{path} is not a readable parquet file: {e}") from None
            self._path = path
        rows = self._table.filter(pc.equal(self._table["episode_index"], episode_index))
        if "frame_index" in rows.column_names:
            rows = rows.sort_by("frame_index")
        if rows.num_rows != length:
            raise LeRobotFormatError(f"{path} holds {rows.num_rows} frames of episode {episode_index}, "
                                     f"{EPISODES_DIR} says {length}")
        return rows


def _segments(flags: np.ndarray) -> list[pb.InterventionSegment]:
    """Contiguous runs of intervention flags -> [start, end) segments."""
    segments, start = [], None
    for i, flag in enumerate(list(flags) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            segments.append(pb.InterventionSegment(start_step=start, end_step=i, reason="lerobot-import"))
            start = None
    return segments


def _decode_png_column(value, root: Path) -> np.ndarray:
    """An `image` feature cell: {'bytes': PNG/JPEG bytes, 'path': ...}."""
    import io

    from PIL import Image as PILImage
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))
        if path and (root / path).is_file():
            return np.asarray(PILImage.open(root / path).convert("RGB"))
    raise LeRobotFormatError("an image cell has neither bytes nor a readable path")


# ---- the import -------------------------------------------------------------------------------

@dataclass
class ImportSummary:
    dataset: str
    robot_id: str
    episodes: int = 0
    frames: int = 0
    seconds: float = 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def import_dataset(root: str | Path, store: ObjectStore, robot_id: str = DEFAULT_ROBOT_ID,
                   progress: bool = True, limits: Limits | None = None) -> ImportSummary:
    """Import every episode of the v3 dataset at `root` into `store` as demonstrations of
    `robot_id`. Raises LeRobotFormatError (before writing anything if the directory is not a
    valid dataset)."""
    check_id("robot id", robot_id)
    limits = limits or Limits()
    started = time.monotonic()
    ds = open_dataset(root)
    summary = ImportSummary(dataset=str(ds.root), robot_id=robot_id)
    base_ns = time.time_ns()
    cache = _DataFileCache(ds)
    bar = Progress(ds.total_episodes, "import", enabled=progress)
    try:
        for row in ds.episode_rows():
            try:
                manifest, chunks = _build_episode(ds, row, cache, robot_id, base_ns, limits)
            except LeRobotFormatError as e:
                raise LeRobotFormatError(_failed(row, e, summary)) from None
            except Exception as e:  # noqa: BLE001 -- damaged data surfaces as many error types
                raise LeRobotFormatError(_failed(row, f"{type(e).__name__}: {e}", summary)) from None
            commit_episode(store, manifest, chunks)
            summary.episodes += 1
            summary.frames += manifest.num_steps
            bar.update(1, manifest.num_steps)
    finally:
        bar.close()
    summary.seconds = time.monotonic() - started
    return summary


def _failed(row: dict, error, summary: ImportSummary) -> str:
    return (f"episode {row.get('episode_index')}: {error} -- nothing of it was written; "
            f"{summary.episodes} episodes were imported before it (re-running rewrites them)")


def _episode_id(ds: LeRobotDataset, row: dict) -> str:
    original = row.get(EP_EPISODE_ID)
    if original:
        try:
            return check_id("episode id", original)
        except ValueError:
            pass
    return f"{slug(ds.root.resolve().name, 48)}-{ds.digest}-{int(row['episode_index']):06d}"


def _build_episode(ds: LeRobotDataset, row: dict, cache: _DataFileCache, robot_id: str, base_ns: int,
                   limits: Limits) -> tuple[pb.EpisodeManifest, list]:
    """Read and decode one whole episode; return its manifest and its chunks as commit_episode
    takes them (nothing is written here)."""
    ep_index, n = int(row["episode_index"]), int(row["length"])
    if n <= 0:
        raise LeRobotFormatError("the episode has no frames")
    if n != int(row["dataset_to_index"]) - int(row["dataset_from_index"]):
        raise LeRobotFormatError(f"length {n} disagrees with dataset_from_index/dataset_to_index")
    if n > limits.max_steps:
        raise LeRobotFormatError(f"{n} frames, more than the store's {limits.max_steps} steps per episode")
    frames = cache.frames(row["data/chunk_index"], row["data/file_index"], ep_index, n)
    cols = set(frames.column_names)

    def scalars(name, dtype, default):
        if name not in cols:
            return np.full(n, default, dtype=dtype)
        return frames[name].to_numpy(zero_copy_only=False).astype(dtype)

    def first_string(name, default=""):
        return str(frames[name][0].as_py() or default) if name in cols else default

    actions = _vectors(frames[ACTION_KEY], n, ACTION_KEY)
    states = _vectors(frames[ds.state_key], n, ds.state_key) if ds.state_key else np.zeros((n, 0), np.float32)
    if not (np.isfinite(actions).all() and np.isfinite(states).all()):
        raise LeRobotFormatError("NaN/inf in actions or state")
    timestamps = scalars("timestamp", np.float64, 0.0)
    flags = scalars(FL_INTERVENTION, bool, False)
    rewards = scalars(REWARD_KEY, np.float32, 0.0)
    task_index = int(frames["task_index"][0].as_py())
    instruction = ds.tasks.get(task_index) or (row.get("tasks") or [""])[0]
    if not instruction:
        raise LeRobotFormatError(f"task_index {task_index} is not in {TASKS_PATH}")

    started_ns = int(row.get(EP_STARTED_NS) or base_ns)
    if FL_TIMESTAMP_NS in cols:
        stamps = scalars(FL_TIMESTAMP_NS, np.int64, 0)
    else:
        stamps = started_ns + np.round(timestamps * 1e9).astype(np.int64)

    # Cameras: videos decoded frame by frame, in step with the frames.
    cameras = [key_to_camera(k) for k in ds.video_keys + ds.image_keys]
    streams = []
    for key in ds.video_keys:
        path = ds.video_file(key, row[video_column(key, "chunk_index")], row[video_column(key, "file_index")])
        offset = float(row[video_column(key, "from_timestamp")])
        streams.append(decode_frames(path, [offset + float(t) for t in timestamps], ds.fps))
    image_cells = [frames[k].to_pylist() for k in ds.image_keys]

    episode_id = _episode_id(ds, row)
    episode_prefix(robot_id, episode_id)  # validates both ids
    chunks = []
    steps: list[pb.Step] = []
    total_bytes = 0
    for i in range(n):
        images = [encode_image(to_rgb(next(stream)), camera=cam) for stream, cam in zip(streams, cameras)]
        images += [encode_image(to_rgb(_decode_png_column(cells[i], ds.root)), camera=cam)
                   for cells, cam in zip(image_cells, cameras[len(streams):])]
        steps.append(pb.Step(index=i, timestamp_ns=int(stamps[i]), images=images, state=states[i].tolist(),
                             action=actions[i].tolist(), intervention=bool(flags[i]), reward=float(rewards[i])))
        if len(steps) == STEPS_PER_CHUNK or i == n - 1:
            total_bytes += sum(step.ByteSize() for step in steps)
            if total_bytes > limits.max_bytes:
                raise LeRobotFormatError(f"more than the store's {limits.max_bytes} bytes per episode")
            chunks.append((encode_chunk(episode_id, len(chunks), steps), len(steps)))
            steps = []

    outcome_text = row.get(EP_OUTCOME) or first_string(FL_OUTCOME)
    outcome_source = LABEL_SOURCES.get(row.get(EP_OUTCOME_SOURCE) or "", pb.LABEL_SOURCE_UNSPECIFIED)
    if not outcome_text and SUCCESS_KEY in cols:
        outcome_text = "success" if scalars(SUCCESS_KEY, bool, False).any() else "failure"
        outcome_source = pb.LABEL_SOURCE_ENVIRONMENT
    if row.get(EP_INTERVENTIONS):
        segments = [pb.InterventionSegment(**s) for s in json.loads(row[EP_INTERVENTIONS])]
    else:
        segments = _segments(flags)

    attributes = {"source": "lerobot", "lerobot.dataset": ds.root.resolve().name,
                  "lerobot.episode_index": str(ep_index), "lerobot.fps": f"{ds.fps:g}"}
    # what export writes back: the robot type and the feature names (joint names...)
    if isinstance(ds.info.get("robot_type"), str) and ds.info["robot_type"]:
        attributes["lerobot.robot_type"] = ds.info["robot_type"][:128]
    names = {k: ds.info["features"][k]["names"] for k in (ACTION_KEY, ds.state_key)
             if k and ds.info["features"].get(k, {}).get("names") is not None}
    if names:
        text = json.dumps(names, sort_keys=True)
        if len(text) <= 16384:  # a manifest attribute, not a place for megabytes
            attributes["lerobot.feature_names"] = text
    for attr, value in (("source.robot_id", row.get(EP_ROBOT_ID) or first_string(FL_ROBOT_ID)),
                        ("source.policy_version", row.get(EP_POLICY_VERSION) or first_string(FL_POLICY_VERSION)),
                        ("source.kind", row.get(EP_KIND))):
        if value:
            attributes[attr] = str(value)
    manifest = pb.EpisodeManifest(
        schema_version=SCHEMA_VERSION, episode_id=episode_id, robot_id=robot_id,
        task_id=row.get(EP_TASK_ID) or slug(instruction), instruction=instruction, policy_version="",
        kind=pb.EPISODE_KIND_DEMONSTRATION, outcome=OUTCOMES.get(outcome_text or "unknown", pb.OUTCOME_UNKNOWN),
        outcome_source=outcome_source, started_ns=started_ns,
        ended_ns=int(row.get(EP_ENDED_NS) or stamps[-1]), num_steps=n, action_dim=actions.shape[1],
        state_dim=states.shape[1], cameras=cameras, interventions=segments,
        incomplete=bool(row.get(EP_INCOMPLETE) or False), attributes=attributes)
    return manifest, chunks


# ---- CLI --------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fleetloop.config import default_store_uri
    parser.add_argument("dataset", metavar="DIR", help="LeRobot v3 dataset directory")
    parser.add_argument("--format", choices=["lerobot"], default="lerobot", help="input format")
    parser.add_argument("--store", default=default_store_uri(), help="store URI (file:///path or s3://bucket/prefix)")
    parser.add_argument("--robot-id", default=DEFAULT_ROBOT_ID,
                        help=f"robot id the episodes are stored under (default {DEFAULT_ROBOT_ID})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        store = open_store(args.store)
        summary = import_dataset(args.dataset, store, robot_id=args.robot_id, progress=not args.no_progress)
    except (LeRobotFormatError, ValueError, StoreError, OSError) as e:
        print(f"fleetloop import: error: {e}", file=sys.stderr)
        return 1
    print(f"imported {summary.episodes} episodes ({summary.frames} frames) from {summary.dataset} into "
          f"{store.uri} as robot {summary.robot_id!r} in {summary.seconds:.1f} s "
          f"({summary.frames_per_s:.0f} frames/s)")
    return 0
