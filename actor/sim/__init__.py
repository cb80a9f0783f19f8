"""Simulated robots on MetaWorld v3: task catalogue, environment, scripted teleoperator,
HG-DAgger gating, the SimRobot episode loop, and the `collect` / `eval` commands.

    tasks.py     the task catalogue (names, instructions, episode lengths)
    env.py       SimEnv: reset(seed) -> Observation, step(action) -> (Observation, success, done)
    expert.py    ScriptedExpert / ExpertPolicy: the simulated human (MetaWorld scripted policies)
    gating.py    InterventionGate / SimTeleoperator: HG-DAgger takeover and hand-back rules
    robot.py     SimRobot + EpisodeCallbacks: the episode loop and its recorder interface
    collect.py   `fleetloop collect`: expert demonstrations into the store
    evaluate.py  `fleetloop eval`: success rates with Wilson intervals

MuJoCo picks its OpenGL backend from MUJOCO_GL once, when `mujoco` is first imported, so the
choice is made here -- before any submodule imports MuJoCo or MetaWorld. Headless EGL is the
fast path; OSMesa (software) is the fallback where no EGL library exists. An explicit
MUJOCO_GL set by the user always wins. (If something imported mujoco before this package, its
choice stands; state-only environments never need a GL context at all.)
"""
from __future__ import annotations

import ctypes.util
import logging
import os
import sys


def _select_gl_backend() -> None:
    if "MUJOCO_GL" in os.environ:
        return
    if "mujoco" in sys.modules:
        # Too late to choose: MuJoCo settled on its default (GLFW, which needs a display).
        logging.getLogger(__name__).warning(
            "mujoco was imported before fleetloop.actor.sim without MUJOCO_GL set; offscreen "
            "rendering may fail. Set MUJOCO_GL=egl (or osmesa), or import fleetloop.actor.sim first.")
        return
    if ctypes.util.find_library("EGL"):
        os.environ["MUJOCO_GL"] = "egl"
    elif ctypes.util.find_library("OSMesa"):
        os.environ["MUJOCO_GL"] = "osmesa"


_select_gl_backend()

# Software GL (Mesa llvmpipe, what EGL/OSMesa give on a CPU-only box) rasterises with one thread
# per core by default. A 64x64 frame gains nothing from that, and with several simulated robots
# per machine the threads only fight each other: one each is faster under load. No effect on
# hardware GL; an explicit setting wins.
os.environ.setdefault("LP_NUM_THREADS", "1")
