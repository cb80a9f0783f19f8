"""Simulated robots on MetaWorld v3: task catalogue, environment, scripted teleoperator,
HG-DAgger gating, the SimRobot episode loop, and the `collect` / `eval` commands.

MuJoCo picks its OpenGL backend from MUJOCO_GL once, when `mujoco` is first imported, so the
choice is made here -- before any submodule imports MuJoCo or MetaWorld. Headless EGL is the
fast path; OSMesa (software) is the fallback where no EGL library exists. An explicit
MUJOCO_GL set by the user always wins. (If something imported mujoco before this package, its
choice stands; state-only environments never need a GL context at all.)
"""
from __future__ import annotations

import ctypes.util
import os


def _select_gl_backend() -> None:
    if "MUJOCO_GL" in os.environ:
        return
    if ctypes.util.find_library("EGL"):
        os.environ["MUJOCO_GL"] = "egl"
    elif ctypes.util.find_library("OSMesa"):
        os.environ["MUJOCO_GL"] = "osmesa"


_select_gl_backend()
