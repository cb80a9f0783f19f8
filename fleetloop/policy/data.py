"""Training data for the VLA: episodes -> (observation, action-chunk target) samples.

Pure functions over arrays, so the online learner reuses them on the episodes it indexes:
  chunk_targets(actions, H)        -> chunks [T, H, A] and mask [T, H]
  stack_camera_images(chunks, cams) -> images [T, C, 64, 64] uint8 from decoded StepChunks
  ChunkDataset(episodes, H, encode) -> flat arrays + batch()/sample() producing the dict that
                                       PolicyModel.loss() takes
and, for pretraining, load_demonstrations(store) reads every demonstration in a store.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from fleetloop.buffer.codec import EpisodeRejected, LoadedEpisode, decode_image, read_episode, read_manifest
from fleetloop.buffer.store import ObjectStore
from fleetloop.policy.backend import INDICATOR_UNSET
from fleetloop.proto.v1 import episode_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class EpisodeData:
    """One episode as training arrays. Only states/actions/instruction are required."""
    states: np.ndarray                      # [T, S] float32
    actions: np.ndarray                     # [T, A] float32
    instruction: str
    task_id: str = ""
    episode_id: str = ""
    images: np.ndarray | None = None        # [T, C, H, W] uint8, cameras stacked on C
    indicator: np.ndarray | None = None     # [T] int64 (0 unset, 1 negative, 2 positive)
    weight: np.ndarray | None = None        # [T] float32 per-sample weights
    intervention: np.ndarray | None = None  # [T] bool
    outcome: int = pb.OUTCOME_UNKNOWN

    def __len__(self) -> int:
        return len(self.states)


def chunk_targets(actions: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk targets a[t:t+H] for every t. Past the episode end the last action is repeated
    (any value works) and masked out: mask[t, h] = 1 iff t + h < T."""
    actions = np.asarray(actions, dtype=np.float32)
    t = len(actions)
    if t == 0:
        return np.zeros((0, horizon, actions.shape[-1]), np.float32), np.zeros((0, horizon), np.float32)
    idx = np.arange(t)[:, None] + np.arange(horizon)[None, :]   # [T, H]
    mask = (idx < t).astype(np.float32)
    return actions[np.minimum(idx, t - 1)], mask


def stack_camera_images(chunks: dict[int, pb.StepChunk], cameras: Sequence[str]) -> np.ndarray:
    """Decode the given cameras of every step into uint8 [T, 3*len(cameras), H, W], cameras
    stacked on channels in the given order. `chunks` is what read_episode(keep_chunks=...)
    fills: decoded StepChunks, by chunk index, with their images."""
    frames = []
    for i in sorted(chunks):
        for step in chunks[i].steps:
            by_cam = {img.camera: img for img in step.images}
            missing = [c for c in cameras if c not in by_cam]
            if missing:
                raise EpisodeRejected("inconsistent", f"{chunks[i].episode_id} step {step.index} lacks "
                                                      f"camera(s) {missing} (has {sorted(by_cam)})")
            frames.append(np.concatenate([decode_image(by_cam[c]) for c in cameras], axis=-1))
    if not frames:
        return np.zeros((0, 3 * len(cameras), 0, 0), np.uint8)
    return np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2))


def episode_data(ep: LoadedEpisode, chunks: dict[int, pb.StepChunk] | None = None,
                 cameras: Sequence[str] | None = None) -> EpisodeData:
    """A LoadedEpisode (and, for images, the chunks read_episode kept) as training arrays."""
    m = ep.manifest
    images = None
    if cameras:
        if chunks is None:
            raise ValueError("images need the decoded chunks: read_episode(..., keep_chunks={})")
        images = stack_camera_images(chunks, cameras)
    return EpisodeData(states=ep.states, actions=ep.actions, instruction=m.instruction, task_id=m.task_id,
                       episode_id=m.episode_id, intervention=ep.intervention, outcome=m.outcome, images=images)


def episode_from_store(store: ObjectStore, manifest_key: str, cameras: Sequence[str] | None = None) -> EpisodeData:
    """Read and verify one episode; decode images only when `cameras` is given."""
    chunks: dict | None = {} if cameras else None
    return episode_data(read_episode(store, manifest_key, keep_chunks=chunks), chunks, cameras)


def list_manifests(store: ObjectStore, prefix: str = "episodes/") -> list[str]:
    return sorted(k for k in store.list(prefix) if k.endswith("manifest.json"))


def load_demonstrations(store: ObjectStore, tasks: Iterable[str] | None = None,
                        cameras: Sequence[str] | None = None, only_success: bool = False,
                        kinds: Sequence[int] = (pb.EPISODE_KIND_DEMONSTRATION,)) -> list[EpisodeData]:
    """Every demonstration in the store (manifests under episodes/), optionally only some tasks.
    Filters on the manifest before fetching chunks; skips (and logs) rejected episodes."""
    tasks = set(tasks) if tasks else None
    out = []
    for key in list_manifests(store):
        try:
            m = read_manifest(store, key)
            if m.kind not in kinds or m.incomplete or m.num_steps == 0:
                continue
            if tasks is not None and m.task_id not in tasks:
                continue
            if only_success and m.outcome != pb.OUTCOME_SUCCESS:
                continue
            out.append(episode_from_store(store, key, cameras))
        except EpisodeRejected as e:
            log.warning("skipping %s: %s", key, e)
    return out


def state_stats(episodes: Sequence[EpisodeData]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the states of all episodes (for set_state_stats)."""
    s = np.concatenate([e.states for e in episodes]).astype(np.float64)
    return s.mean(0).astype(np.float32), s.std(0).astype(np.float32)


class ChunkDataset:
    """In-memory samples, one per step: state, language index, chunk target, mask, indicator,
    weight and (optionally) the image. Language embeddings are stored once per instruction.

    `encode` maps a list of instructions to the model's instruction features [N, ...] (float32
    embeddings for the tiny backend, token ids for hf-vla: see PolicyModel.featurize_instruction)."""

    def __init__(self, episodes: Sequence[EpisodeData], horizon: int,
                 encode: Callable[[list[str]], np.ndarray], use_images: bool = False,
                 default_indicator: int = INDICATOR_UNSET):
        if not episodes:
            raise ValueError("no episodes to train on")
        self.instructions = sorted({e.instruction for e in episodes})
        table = np.asarray(encode(self.instructions))  # embeddings (float) or token ids (int)
        self.lang_table = torch.from_numpy(table.astype(np.float32) if table.dtype.kind == "f" else table)
        lang_index = {s: i for i, s in enumerate(self.instructions)}
        states, chunks, masks, lang, ind, w, imgs = [], [], [], [], [], [], []
        for e in episodes:
            t = len(e)
            c, m = chunk_targets(e.actions, horizon)
            states.append(e.states)
            chunks.append(c)
            masks.append(m)
            lang.append(np.full(t, lang_index[e.instruction], np.int64))
            ind.append(np.full(t, default_indicator, np.int64) if e.indicator is None else e.indicator)
            w.append(np.ones(t, np.float32) if e.weight is None else e.weight)
            if use_images:
                if e.images is None or len(e.images) != t:
                    raise ValueError(f"episode {e.episode_id or '?'} has no images for every step")
                imgs.append(e.images)
        cat = lambda xs, dt: torch.from_numpy(np.ascontiguousarray(np.concatenate(xs), dtype=dt))  # noqa: E731
        self.state = cat(states, np.float32)
        self.actions = cat(chunks, np.float32)
        self.action_mask = cat(masks, np.float32)
        self.lang_idx = cat(lang, np.int64)
        self.indicator = cat(ind, np.int64)
        self.weight = cat(w, np.float32)
        self.images = cat(imgs, np.uint8) if use_images else None
        self.horizon = horizon

    def __len__(self) -> int:
        return len(self.state)

    @property
    def state_dim(self) -> int:
        return self.state.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[2]

    def batch(self, idx) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        b = {"state": self.state[idx], "lang": self.lang_table[self.lang_idx[idx]],
             "indicator": self.indicator[idx], "actions": self.actions[idx],
             "action_mask": self.action_mask[idx], "weight": self.weight[idx]}
        if self.images is not None:
            b["images"] = self.images[idx]
        return b

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Uniform with replacement (cheap and fine for BC at this scale)."""
        return self.batch(torch.randint(0, len(self), (batch_size,), generator=generator))


def batch_to(batch: dict[str, torch.Tensor], device: str | torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
