"""The learner-algorithm plug-in: SOP's G in theta <- G(theta, S(B_on U B_off)).

An algorithm is one class with a registered name. It has two halves that may run in different
processes (see fleetloop.learner.app):

  data side (where the frame index lives, the replay actor):
    frame_weights(entry)  [T] float >= 0   which frames train and how often (sampling weight)
    frame_classes(entry)  [T] int          classes for a fixed mix (class_mix), e.g. IWR 50/50
    action_labels(entry)  [T] bool         which recorded actions are valid chunk targets
    indicators(entry)     [T] int64        RECAP improvement indicator (0 unset, 1 neg, 2 pos)
    refresh(index)        periodic hook: fit/recompute whatever the labels depend on
  learner side (in every train worker):
    loss(net, batch)      the objective; default: the policy's masked chunk regression
  both:
    inference_settings()  what robots should run with (guidance), published with the weights
    state() / load_state(meta, tensors)   JSON + named arrays for checkpoints (never pickle)
    stats()               for the dashboard

Adding an algorithm: write one module with a subclass, decorate it with @register("name"),
and import it in fleetloop/learner/algorithms/__init__.py.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fleetloop.buffer.sampler import INDICATOR_UNSET, UniformRules  # noqa: F401 (re-exported)
from fleetloop.release.guidance import Guidance

INDICATOR_NEGATIVE, INDICATOR_POSITIVE = 1, 2  # fleetloop.policy.model's codes

ALGORITHMS: dict[str, type["Algorithm"]] = {}


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name
        ALGORITHMS[name] = cls
        return cls
    return deco


class Algorithm(UniformRules):
    name: str = ""
    weights_version: int = 0                  # bump when frame_weights/classes change
    class_mix: dict[int, float] | None = None

    def __init__(self, **options: Any):
        if options:
            raise TypeError(f"{type(self).__name__} got unknown options {sorted(options)}")

    # ---- data side ------------------------------------------------------------------------

    def bind(self, encode) -> None:
        """Receive the instruction encoder (instruction -> float32 [384]) if labels need it."""

    # frame_weights / frame_classes / action_labels / indicators default to UniformRules':
    # every frame, equal weight, indicator unset. Algorithms override what they change.

    def refresh(self, index) -> bool:
        """Called by the replay service before sampling when the index changed (rate-limited).
        Returns True if labels changed."""
        return False

    # ---- learner side ---------------------------------------------------------------------

    def loss(self, net, batch):
        return net.loss(batch)

    # ---- publishing, state, stats ----------------------------------------------------------

    def inference_settings(self) -> Guidance:
        """How robots should run the policies this algorithm trains (indicator, guidance beta),
        published in every version's signed manifest. Default: the plain policy."""
        return Guidance()

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {}

    def load_state(self, meta: dict, tensors: dict[str, np.ndarray]) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def options(self) -> dict:
        return {}


def make_algorithm(name: str, **options: Any) -> Algorithm:
    from fleetloop.learner import algorithms  # noqa: F401  (registers the built-in ones)
    try:
        cls = ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}: choose from {sorted(ALGORITHMS)}") from None
    return cls(**options)
