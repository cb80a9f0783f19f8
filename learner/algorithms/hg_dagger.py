"""HG-DAgger (Kelly et al., ICRA 2019), streaming as in SOP: no rounds, the expert-labelled
segments of every rollout join the online buffer as they arrive and are trained on at once.

What trains (per-frame sampling weight; the policy's loss is plain chunk regression):
  offline demonstrations        every frame (expert data)
  online, expert-driven frames  every frame with intervention = True   (strict HG-DAgger)
  online, robot-driven frames   only with `autonomous`:
      "none"     (default) never -- the novice's own actions are not labels
      "success"  frames of episodes that succeeded without any intervention
      "all"      every frame (IWR-style; pair with balance=0.5)
`balance`: the share of intervention frames among online draws (IWR, Mandlekar 2020: 0.5);
None draws online frames in proportion to their counts. `iwr=True` = autonomous "all" + 0.5.

Chunk targets: a chunk that starts on an intervention frame ends where the human handed
control back (action_labels = intervention), so the robot's own later actions never become
targets. Chunks from demonstrations or accepted autonomous episodes use every action.

Indicator: "unset" (default) trains the plain, unconditional policy -- what a robot runs when
it passes no RECAP indicator -- on every sample. "positive" labels all of this data as good
instead (the model's 30% dropout then trains the unconditional branch on the rest): for a fleet
that deploys with indicator = positive.
"""
from __future__ import annotations

import numpy as np

from fleetloop.buffer.sampler import OFFLINE
from fleetloop.learner.algorithms.base import (INDICATOR_POSITIVE, INDICATOR_UNSET, Algorithm, Guidance,
                                              register)

AUTONOMOUS, INTERVENTION = 0, 1  # frame classes


@register("hg-dagger")
class HGDagger(Algorithm):
    def __init__(self, autonomous: str = "none", balance: float | None = None, iwr: bool = False,
                 indicator: str = "unset"):
        super().__init__()
        if iwr:
            autonomous, balance = "all", 0.5 if balance is None else balance
        if autonomous not in ("none", "success", "all"):
            raise ValueError(f"autonomous must be none, success or all, not {autonomous!r}")
        if balance is not None and not 0.0 < balance < 1.0:
            raise ValueError("balance must be in (0, 1)")
        if indicator not in ("positive", "unset"):
            raise ValueError(f"indicator must be positive or unset, not {indicator!r}")
        self.autonomous, self.balance, self.indicator = autonomous, balance, indicator
        self.class_mix = None if balance is None else {INTERVENTION: balance, AUTONOMOUS: 1.0 - balance}

    def _accepts_autonomous(self, entry) -> bool:
        if self.autonomous == "all":
            return True
        return self.autonomous == "success" and entry.outcome == "success" and not entry.has_intervention

    def action_labels(self, entry) -> np.ndarray:
        if entry.source == OFFLINE or self._accepts_autonomous(entry):
            return np.ones(entry.num_steps, bool)
        return np.asarray(entry.intervention, bool)

    def frame_weights(self, entry) -> np.ndarray:
        return self.action_labels(entry).astype(np.float32)  # a frame trains iff its action is a label

    def frame_classes(self, entry) -> np.ndarray:
        if entry.source == OFFLINE:
            return np.full(entry.num_steps, AUTONOMOUS, np.int8)
        return np.where(entry.intervention, INTERVENTION, AUTONOMOUS).astype(np.int8)

    def indicators(self, entry) -> np.ndarray:
        code = INDICATOR_POSITIVE if self.indicator == "positive" else INDICATOR_UNSET
        return np.full(entry.num_steps, code, np.int64)

    def inference_settings(self) -> Guidance:
        return Guidance(indicator=True if self.indicator == "positive" else None, beta=1.0)

    def options(self) -> dict:
        return {"autonomous": self.autonomous, "balance": self.balance, "indicator": self.indicator}

    def stats(self) -> dict:
        return {"algorithm": self.name, **self.options()}
