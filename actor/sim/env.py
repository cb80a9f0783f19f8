"""A simulated robot: one MetaWorld v3 task behind a small reset/step interface that speaks
fleetloop's `Observation` (39-d state vector + optional RGB camera image).

    env = SimEnv("reach-v3", images=True)
    obs = env.reset(seed=7)                 # goal/object positions drawn from the seed
    obs, success, done = env.step(action)   # action: 4 floats in [-1, 1] (dx, dy, dz, gripper)

Why these choices:
- Goal observable: MetaWorld's "MT" observation (last 3 entries = goal position). Without it a
  state-only policy cannot know where e.g. the reach goal is; with images it is also visible.
- Per-seed randomisation through MetaWorld's own task sampling (`_random_reset_space`, drawn
  with the env's seeded generator), so seed s is the same scene in every process and run.
- Our own 64x64 offscreen renderer with MuJoCo's costly effects off (multisampling, shadows,
  reflections). On a CPU-only box (Mesa llvmpipe behind EGL) that is ~170 frames/s instead of
  1-15 with the defaults, and at 64x64 the look barely changes.
- A fixed free camera in front of the table ("front") that frames the whole workspace for every
  task; MetaWorld's named cameras ("corner", "topview", ...) can be chosen instead.
"""
from __future__ import annotations

import atexit
import logging
import os
import weakref
from typing import Optional, Sequence

import numpy as np

import fleetloop.actor.sim  # noqa: F401  (selects the MuJoCo GL backend before mujoco loads)
from fleetloop.actor.sim.tasks import TaskSpec, get_task
from fleetloop.policy.interface import Observation

# PyOpenGL announces at INFO level that its optional C accelerator is missing; not news.
logging.getLogger("OpenGL.acceleratesupport").setLevel(logging.WARNING)

STATE_DIM = 39
ACTION_DIM = 4
FRONT_CAMERA = "front"

# The "front" camera: looks at the middle of the table from the far side, tilted down, so the
# arm, the objects and the goals are all in frame for every task in the catalogue.
_FRONT_LOOKAT = (0.0, 0.68, 0.12)
_FRONT_DISTANCE = 1.15
_FRONT_AZIMUTH = 270.0
_FRONT_ELEVATION = -40.0


# Envs with a live renderer. Closed at exit, while the interpreter is still whole: a GL context
# left to garbage collection during interpreter teardown makes MuJoCo's EGL code print errors.
# The hook is registered after the first renderer exists, because MuJoCo registers its own
# eglTerminate then, and atexit runs hooks last-registered-first: ours must run before it.
_LIVE_RENDERING_ENVS: "weakref.WeakSet[SimEnv]" = weakref.WeakSet()
_atexit_registered = False


def _close_renderers() -> None:
    for env in list(_LIVE_RENDERING_ENVS):
        env.close()


def _track_renderer(env: "SimEnv") -> None:
    global _atexit_registered
    _LIVE_RENDERING_ENVS.add(env)
    if not _atexit_registered:
        atexit.register(_close_renderers)
        _atexit_registered = True


def _make_metaworld_env(name: str):
    """Instantiate a MetaWorld v3 task with the goal in the observation and seedable sampling."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    env = ALL_V3_ENVIRONMENTS[name]()
    env._partially_observable = False
    # The observation space is a cached property that depends on observability: drop the cache.
    env.__dict__.pop("sawyer_observation_space", None)
    # Sample a fresh scene on every reset from the env's own (seeded) generator rather than
    # MetaWorld's frozen benchmark goals or the global numpy RNG.
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env._set_task_called = True
    return env


class SimEnv:
    """One simulated robot on one task. Not thread-safe; one per robot/worker.

    images: render camera images into each Observation (key = camera name).
    camera: the camera, or a list of cameras, to render ("front" or MetaWorld camera names).
    max_steps: episode length limit (default: the task's catalogue value).
    terminate_on_success: end the episode at the first successful step (what a robot operator
        does: the task is done). With False, episodes always run max_steps.
    """

    action_dim = ACTION_DIM
    state_dim = STATE_DIM

    def __init__(self, task: str | TaskSpec, *, images: bool = False, image_size: int = 64,
                 camera: str | Sequence[str] = FRONT_CAMERA, max_steps: Optional[int] = None,
                 terminate_on_success: bool = True):
        self.spec = task if isinstance(task, TaskSpec) else get_task(task)
        self.images = images
        self.image_size = int(image_size)
        self.cameras = [camera] if isinstance(camera, str) else list(camera)
        if not self.cameras:
            raise ValueError("at least one camera is needed")
        self.max_steps = self.spec.max_steps if max_steps is None else int(max_steps)
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        self.terminate_on_success = terminate_on_success

        self._env = _make_metaworld_env(self.spec.name)
        # MetaWorld refuses to step past its own limit; ours is enforced in step().
        self._env.max_path_length = self.max_steps
        self._renderer = None
        self._views: dict = {}  # camera name -> what mujoco.Renderer.update_scene takes
        if images:
            self._setup_renderer()

        self._rng = np.random.default_rng()
        self._steps = 0
        self._done = True
        self._success = False
        self._progress = 0.0
        self._distance = float("nan")
        self.seed: Optional[int] = None

    # -- public properties -------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self.spec.name

    @property
    def instruction(self) -> str:
        return self.spec.instruction

    @property
    def steps(self) -> int:
        """Steps taken in the current episode."""
        return self._steps

    @property
    def success(self) -> bool:
        """Whether the current episode has succeeded (at any step so far)."""
        return self._success

    @property
    def done(self) -> bool:
        return self._done

    @property
    def progress(self) -> float:
        """Task progress in [0, 1]: MetaWorld's shaped reward / 10. It rises through every stage
        of the task (approach, grasp, move to goal), unlike the object-goal distance, which is
        flat while the arm approaches the object -- so it is the stall detector's signal."""
        return self._progress

    @property
    def distance_to_goal(self) -> float:
        """MetaWorld's task-specific distance that decides success (object/handle/hand to goal)."""
        return self._distance

    # -- episode -------------------------------------------------------------------------------
    def reset(self, seed: Optional[int] = None) -> Observation:
        """Start an episode. The same seed gives the same scene (goal and object positions)."""
        if seed is None:
            seed = int(self._rng.integers(0, 2**31 - 1))
        self.seed = int(seed)
        self._env.seed(self.seed)
        state, _info = self._env.reset()
        self._steps = 0
        self._done = False
        self._success = False
        # Score the initial state so progress starts from where the scene does, not from 0.
        reward, info = self._env.evaluate_state(state, np.zeros(ACTION_DIM, np.float32))
        self._record_info(float(reward), info)
        return self._observation(state)

    def step(self, action) -> tuple[Observation, bool, bool]:
        """Apply one action: (dx, dy, dz, gripper) in [-1, 1] (clipped). Returns
        (observation, success at this step, episode done)."""
        if self._done:
            raise RuntimeError("the episode is over: call reset() first")
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        if action.shape != (ACTION_DIM,) or not np.isfinite(action).all():
            raise ValueError(f"action must be {ACTION_DIM} finite floats, got {action!r}")
        state, reward, _terminated, _truncated, info = self._env.step(action)
        self._steps += 1
        self._record_info(float(reward), info)
        success = bool(info.get("success", 0.0))
        self._success = self._success or success
        self._done = (success and self.terminate_on_success) or self._steps >= self.max_steps
        return self._observation(state), success, self._done

    def render(self, camera: Optional[str] = None) -> np.ndarray:
        """The current image of `camera` (default: the first), HxWx3 uint8. Creates the renderer
        on first use."""
        if self._renderer is None:
            self._setup_renderer()
        camera = camera or self.cameras[0]
        if camera not in self._views:
            raise ValueError(f"camera {camera!r} is not one of this env's cameras {self.cameras}")
        self._renderer.update_scene(self._env.data, camera=self._views[camera])
        return self._renderer.render().copy()

    def close(self) -> None:
        # Free the GL context explicitly (see _LIVE_RENDERING_ENVS).
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> "SimEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _record_info(self, reward: float, info: dict) -> None:
        self._progress = float(np.clip(reward / 10.0, 0.0, 1.0))
        self._distance = float(info.get("obj_to_target", float("nan")))

    def _observation(self, state: np.ndarray) -> Observation:
        images = {c: self.render(c) for c in self.cameras} if self.images else {}
        return Observation(images=images, state=np.asarray(state, dtype=np.float32))

    def _setup_renderer(self) -> None:
        import mujoco

        model = self._env.model
        # Cheap rendering: no MSAA, no shadows, no reflections. Must be set before the renderer
        # (and its offscreen buffer) is created.
        model.vis.quality.offsamples = 0
        model.light_castshadow[:] = 0
        model.mat_reflectance[:] = 0
        for name in self.cameras:
            if name == FRONT_CAMERA:
                cam = mujoco.MjvCamera()
                cam.type = mujoco.mjtCamera.mjCAMERA_FREE
                cam.lookat[:] = _FRONT_LOOKAT
                cam.distance = _FRONT_DISTANCE
                cam.azimuth = _FRONT_AZIMUTH
                cam.elevation = _FRONT_ELEVATION
                self._views[name] = cam
            elif mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name) >= 0:
                self._views[name] = name
            else:
                names = [model.camera(i).name for i in range(model.ncam)]
                raise ValueError(f"unknown camera {name!r}: use {FRONT_CAMERA!r} or one of {names}")
        try:
            self._renderer = mujoco.Renderer(model, self.image_size, self.image_size)
            _track_renderer(self)
        except Exception as e:  # no usable GL: say what to do instead of a bare GL trace
            raise RuntimeError(
                f"cannot create an offscreen MuJoCo renderer (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}): "
                f"{e}. Try MUJOCO_GL=egl or "
                f"MUJOCO_GL=osmesa, or run state-only (images=False / --no-images).") from e

