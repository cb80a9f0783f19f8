"""Video files of a LeRobot v3 dataset, through PyAV: one stream per camera, many episodes per
mp4, encoded and decoded one frame at a time (memory does not grow with the dataset).

Frame n of a file has pts n in a 1/fps time base, so its time is exactly n / fps; an episode
that starts at frame n0 of the file has from_timestamp n0 / fps.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetloop.lerobot.format import VIDEO_PATH, LeRobotFormatError, next_file

# --vcodec name -> (FFmpeg encoder, codec name written into info.json, default crf)
CODECS = {
    "h264": ("libx264", "h264", 23),
    "av1": ("libsvtav1", "av1", 30),
    "hevc": ("libx265", "hevc", 28),
}


@dataclass
class VideoSettings:
    codec: str = "h264"
    crf: int | None = None
    gop: int = 2           # a keyframe every `gop` frames: cheap random access for training
    file_size_mb: float = 200.0
    chunks_size: int = 1000

    @property
    def encoder(self) -> str:
        return CODECS[self.codec][0]

    @property
    def codec_name(self) -> str:
        return CODECS[self.codec][1]

    @property
    def crf_value(self) -> int:
        return CODECS[self.codec][2] if self.crf is None else self.crf


@dataclass
class VideoSpan:
    """Where one episode's frames sit for one camera."""
    chunk_index: int
    file_index: int
    from_timestamp: float
    to_timestamp: float


def _import_av():
    try:
        import av
    except ImportError:
        raise LeRobotFormatError("video support needs PyAV: pip install av") from None
    return av


class RollingVideoWriter:
    """One camera's videos/<key>/chunk-XXX/file-XXX.mp4 files. Call begin_episode, add_frame per
    frame, end_episode; a new file starts at an episode boundary once the current one is past
    the size limit."""

    def __init__(self, root: Path, video_key: str, fps: int, height: int, width: int,
                 settings: VideoSettings):
        self.root, self.video_key, self.fps = Path(root), video_key, fps
        self.height, self.width, self.settings = height, width, settings
        # yuv420p is what every decoder plays; it needs even sizes, so odd ones keep full chroma.
        self.pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
        self.chunk_index, self.file_index = 0, -1
        self._container = self._stream = None
        self._path: Path | None = None
        self._frames_in_file = 0
        self._episode_start = 0

    def _open_next(self) -> None:
        self.close()
        if self.file_index < 0:
            self.file_index = 0
        else:
            self.chunk_index, self.file_index = next_file(self.chunk_index, self.file_index,
                                                          self.settings.chunks_size)
        av = _import_av()
        self._path = self.root / VIDEO_PATH.format(video_key=self.video_key, chunk_index=self.chunk_index,
                                                   file_index=self.file_index)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self._path), mode="w")
        options = {"crf": str(self.settings.crf_value), "g": str(self.settings.gop)}
        if self.settings.codec == "av1":
            os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its banner at info level otherwise
            options.update({"preset": "10"})
        elif self.settings.codec == "hevc":
            options.update({"x265-params": "log-level=error"})
        elif self.settings.codec == "h264":
            options.update({"preset": "veryfast", "bf": "0"})
        self._stream = self._container.add_stream(self.settings.encoder, rate=self.fps, options=options)
        self._stream.width, self._stream.height = self.width, self.height
        self._stream.pix_fmt = self.pix_fmt
        self._frames_in_file = 0

    def _size_mb(self) -> float:
        return os.path.getsize(self._path) / (1024 * 1024) if self._path and self._path.exists() else 0.0

    def begin_episode(self) -> None:
        if self._container is None or self._size_mb() >= self.settings.file_size_mb:
            self._open_next()
        self._episode_start = self._frames_in_file

    def add_frame(self, rgb: np.ndarray) -> None:
        if rgb.shape != (self.height, self.width, 3):
            raise ValueError(f"{self.video_key}: frame of shape {rgb.shape}, the video is "
                             f"{self.height}x{self.width}x3")
        av = _import_av()
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self._frames_in_file
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self._frames_in_file += 1

    def end_episode(self) -> VideoSpan:
        return VideoSpan(self.chunk_index, self.file_index, self._episode_start / self.fps,
                         self._frames_in_file / self.fps)

    def close(self) -> None:
        if self._container is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._container = self._stream = None

    def info(self) -> dict:
        """The `info` block of this feature in meta/info.json."""
        return {"video.height": self.height, "video.width": self.width,
                "video.codec": self.settings.codec_name, "video.pix_fmt": self.pix_fmt,
                "video.is_depth_map": False, "video.fps": self.fps, "video.channels": 3,
                "video.g": self.settings.gop, "video.crf": self.settings.crf_value, "has_audio": False}


def decode_frames(path: Path, timestamps: list[float], fps: float) -> Iterator[np.ndarray]:
    """RGB frames (HxWx3 uint8) of the video at `path` at the given times (seconds, ascending),
    one at a time. A frame matches a time within half a frame period; a missing frame raises
    LeRobotFormatError."""
    if not timestamps:
        return
    av = _import_av()
    tolerance = 0.5 / fps
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise LeRobotFormatError(f"cannot open video {path}: {e}") from None
    try:
        if not container.streams.video:
            raise LeRobotFormatError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        first = timestamps[0]
        if first > tolerance and stream.time_base:
            container.seek(max(0, int((first - tolerance) / stream.time_base)), stream=stream,
                           backward=True, any_frame=False)
        wanted = iter(timestamps)
        target = next(wanted)
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                while target is not None and frame.time >= target - tolerance:
                    if frame.time > target + tolerance:
                        raise LeRobotFormatError(f"{path}: no frame at t={target:.4f}s "
                                                 f"(next frame is at {frame.time:.4f}s)")
                    yield frame.to_ndarray(format="rgb24")
                    target = next(wanted, None)
                if target is None:
                    return
        except av.error.FFmpegError as e:
            raise LeRobotFormatError(f"cannot decode video {path}: {e}") from None
        raise LeRobotFormatError(f"{path}: video ends before t={target:.4f}s")
    finally:
        container.close()
