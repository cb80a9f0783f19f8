"""`fleetloop collect`: record scripted-expert demonstrations into the object store -- the
offline buffer B_off the policy is pretrained on and that the learner keeps mixing in.

    fleetloop collect --tasks reach-v3,push-v3 --episodes 50 --store file:///tmp/store [--seed 0] [--no-images]

Each task gets `--episodes` episodes with seeds seed, seed+1, ...; an episode's id is derived
from (task, seed), so re-running the same command rewrites the same episodes instead of adding
duplicates (use another --seed for more data). Episodes are written in the standard episode
layout (StepChunks then the manifest as commit point, through buffer.codec): kind
DEMONSTRATION, outcome from the environment's success detector, robot_id "sim-collector".

Demonstration steps carry intervention=False: the episode kind already says a human drove,
and per-step intervention flags are reserved for corrections inside rollouts (RECAP forces
those to "advantage positive"; demonstrations get their advantage from the value function).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from fleetloop.actor.sim.env import FRONT_CAMERA, SimEnv
from fleetloop.actor.sim.expert import ExpertPolicy, ExpertStyle
from fleetloop.actor.sim.robot import EpisodeCallbacks, EpisodeResult, SimRobot
from fleetloop.actor.sim.tasks import parse_task_list
from fleetloop.buffer.codec import commit_episode, encode_chunk, encode_image
from fleetloop.buffer.store import ObjectStore, open_store
from fleetloop.policy.interface import Observation
from fleetloop.proto.v1 import episode_pb2 as pb

log = logging.getLogger(__name__)

COLLECTOR_ROBOT_ID = "sim-collector"


def demo_episode_id(task: str, seed: int) -> str:
    return f"demo-{task}-s{seed:08d}"


class StoreEpisodeWriter(EpisodeCallbacks):
    """EpisodeCallbacks that write each episode straight into an object store (no spool, no
    queue event): the simplest recorder, for offline collection. Steps are cut into chunks of
    `chunk_steps`; the manifest is written at `end`."""

    def __init__(self, store: ObjectStore, robot_id: str = COLLECTOR_ROBOT_ID, chunk_steps: int = 64,
                 image_encoding: str = "png", kind: int = pb.EPISODE_KIND_DEMONSTRATION,
                 labelled_by: str = "metaworld-success", attributes: Optional[dict[str, str]] = None):
        if chunk_steps < 1:
            raise ValueError("chunk_steps must be >= 1")
        self.store, self.robot_id, self.chunk_steps = store, robot_id, chunk_steps
        self.image_encoding, self.kind, self.labelled_by = image_encoding, kind, labelled_by
        self.attributes = dict(attributes or {})
        self.episode_id: Optional[str] = None  # set by the caller before each episode
        self.last_manifest_key: Optional[str] = None

    def start(self, task: str, instruction: str) -> None:
        if not self.episode_id:
            raise RuntimeError("set episode_id before starting an episode")
        self._task, self._instruction = task, instruction
        self._steps: list[pb.Step] = []
        self._chunks: list = []
        self._cameras: list[str] = []
        self._state_dim = self._action_dim = 0
        self._started_ns = time.time_ns()

    def on_step(self, obs: Observation, action: np.ndarray, intervention: bool,
                policy_chunk: Optional[np.ndarray]) -> None:
        step = pb.Step(index=len(self._chunks) * self.chunk_steps + len(self._steps),
                       timestamp_ns=time.time_ns(), state=obs.state.tolist(),
                       action=np.asarray(action, np.float32).tolist(), intervention=bool(intervention))
        if policy_chunk is not None:
            step.policy_chunk.extend(np.asarray(policy_chunk, np.float32).reshape(-1).tolist())
        for camera, image in obs.images.items():
            step.images.append(encode_image(image, camera=camera, encoding=self.image_encoding))
        if not self._cameras:
            self._cameras = list(obs.images)
        self._state_dim, self._action_dim = len(step.state), len(step.action)
        self._steps.append(step)
        if len(self._steps) >= self.chunk_steps:
            self._flush()

    def end(self, result: EpisodeResult) -> None:
        if self._steps:
            self._flush()
        manifest = pb.EpisodeManifest(
            episode_id=self.episode_id, robot_id=self.robot_id, task_id=self._task,
            instruction=self._instruction,
            policy_version="" if self.kind == pb.EPISODE_KIND_DEMONSTRATION else result.policy_version,
            kind=self.kind, outcome=result.outcome, outcome_source=pb.LABEL_SOURCE_ENVIRONMENT,
            outcome_labelled_by=self.labelled_by, started_ns=self._started_ns, ended_ns=time.time_ns(),
            num_steps=result.num_steps, action_dim=self._action_dim, state_dim=self._state_dim,
            cameras=self._cameras)
        for s in result.segments:
            manifest.interventions.append(pb.InterventionSegment(start_step=s.start, end_step=s.end,
                                                                 operator=s.operator, reason=s.reason))
        manifest.attributes.update(self.attributes)
        if result.seed is not None:
            manifest.attributes["seed"] = str(result.seed)
        self.last_manifest_key = commit_episode(self.store, manifest, self._chunks)
        self.episode_id = None

    def _flush(self) -> None:
        steps, self._steps = self._steps, []
        self._chunks.append((encode_chunk(self.episode_id, len(self._chunks), steps), len(steps)))


@dataclass
class CollectSummary:
    """Per task: episodes written, successes, steps."""
    episodes: dict[str, int] = field(default_factory=dict)
    successes: dict[str, int] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def merge(self, other: "CollectSummary") -> None:
        for name in ("episodes", "successes", "steps"):
            mine = getattr(self, name)
            for task, v in getattr(other, name).items():
                mine[task] = mine.get(task, 0) + v


def collect_task(store: ObjectStore | str, task: str, seeds: list[int], *, images: bool = True,
                 image_size: int = 64, camera: str = FRONT_CAMERA, max_steps: Optional[int] = None,
                 style: ExpertStyle = ExpertStyle(), robot_id: str = COLLECTOR_ROBOT_ID,
                 chunk_steps: int = 64, image_encoding: str = "png") -> CollectSummary:
    """Record one expert demonstration per seed for `task`."""
    if isinstance(store, str):
        store = open_store(store)
    summary = CollectSummary()
    started = time.monotonic()
    attributes = {"source": "metaworld-scripted-expert", "expert_noise_std": f"{style.noise_std:g}",
                  "expert_speed": f"{style.speed:g}"}
    writer = StoreEpisodeWriter(store, robot_id=robot_id, chunk_steps=chunk_steps,
                                image_encoding=image_encoding, attributes=attributes)
    with SimEnv(task, images=images, image_size=image_size, camera=camera, max_steps=max_steps) as env:
        robot = SimRobot(env, ExpertPolicy(style), callbacks=writer)
        for seed in seeds:
            # Seed the expert's style noise per episode too, so an episode is reproducible.
            robot.set_policy(ExpertPolicy(style, seed=seed))
            writer.episode_id = demo_episode_id(task, seed)
            result = robot.run_episode(seed)
            summary.episodes[task] = summary.episodes.get(task, 0) + 1
            summary.successes[task] = summary.successes.get(task, 0) + int(result.success)
            summary.steps[task] = summary.steps.get(task, 0) + result.num_steps
    summary.wall_s = time.monotonic() - started
    return summary


def _collect_job(kwargs: dict) -> CollectSummary:
    return collect_task(**kwargs)


def collect(store_uri: str, tasks: list[str], episodes: int, *, seed: int = 0, workers: int = 1,
            **kwargs) -> CollectSummary:
    """`episodes` demonstrations per task into the store at `store_uri`; `workers` processes
    share the work (each task's seeds are dealt round-robin into blocks)."""
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    seeds = list(range(seed, seed + episodes))
    workers = max(1, int(workers))
    blocks = max(1, min(episodes, -(-workers // len(tasks))))  # enough jobs to keep every worker busy
    jobs = [dict(store=store_uri, task=task, seeds=seeds[i::blocks], **kwargs)
            for task in tasks for i in range(blocks) if seeds[i::blocks]]
    total = CollectSummary()
    started = time.monotonic()
    if workers == 1:
        results = map(_collect_job, jobs)
    else:
        # spawn, not fork: a forked child would inherit the parent's MuJoCo/GL state.
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
        results = pool.imap_unordered(_collect_job, jobs)
    try:
        for part in results:
            total.merge(part)
            for task in part.episodes:
                log.info("%s: %d episodes done (%d successes so far)", task, total.episodes[task],
                         total.successes[task])
    finally:
        if workers > 1:
            pool.close()
            pool.join()
    total.wall_s = time.monotonic() - started
    return total


# ---- CLI ---------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fleetloop.config import default_store_uri

    parser.add_argument("--tasks", default="demo",
                        help="comma-separated task names ('demo' = the demo set, 'all' = every task)")
    parser.add_argument("--episodes", type=int, default=20, help="episodes per task")
    parser.add_argument("--store", default=None, help=f"store URI (default {default_store_uri()})")
    parser.add_argument("--seed", type=int, default=0, help="first scene seed; episode i uses seed+i")
    parser.add_argument("--images", action=argparse.BooleanOptionalAction, default=True,
                        help="render a camera image per step (--no-images: state only, much faster)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--camera", default=FRONT_CAMERA)
    parser.add_argument("--image-encoding", choices=("png", "raw"), default="png")
    parser.add_argument("--max-steps", type=int, default=None, help="episode length (default: per task)")
    parser.add_argument("--noise", type=float, default=0.0, help="expert action noise std (style)")
    parser.add_argument("--speed", type=float, default=1.0, help="expert speed factor in (0, 1] (style)")
    parser.add_argument("--robot-id", default=COLLECTOR_ROBOT_ID)
    parser.add_argument("--chunk-steps", type=int, default=64, help="steps per stored chunk")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")


def run(args: argparse.Namespace) -> int:
    from fleetloop.config import default_store_uri

    tasks = parse_task_list(args.tasks)
    store_uri = args.store or default_store_uri()
    summary = collect(store_uri, tasks, args.episodes, seed=args.seed, workers=args.workers,
                      images=args.images, image_size=args.image_size, camera=args.camera,
                      max_steps=args.max_steps, style=ExpertStyle(args.noise, args.speed),
                      robot_id=args.robot_id, chunk_steps=args.chunk_steps, image_encoding=args.image_encoding)
    total_steps = sum(summary.steps.values())
    for task in tasks:
        n, s = summary.episodes.get(task, 0), summary.successes.get(task, 0)
        print(f"{task:26s} {n:5d} episodes  {s:5d} successes  {summary.steps.get(task, 0):7d} steps")
    print(f"wrote {sum(summary.episodes.values())} episodes ({total_steps} steps) to {store_uri} "
          f"in {summary.wall_s:.1f} s ({total_steps / max(summary.wall_s, 1e-9):.0f} steps/s)")
    return 0
