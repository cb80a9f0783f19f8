"""How a robot runs a policy version: RECAP's improvement indicator and classifier-free guidance.

A RECAP policy is trained conditioned on "was this action an improvement" (positive / negative /
unset) and runs with indicator positive and guidance weight beta:

    a = a_uncond + beta * (a_cond - a_uncond)        (beta 1: the conditional policy alone)

The learner's algorithm decides both (Algorithm.inference_settings) and the registry publishes them
in the version's signed manifest (PolicyManifest.inference), so what a robot verifies is what it
runs. A robot's actor settings may override either ([policy] indicator / guidance_beta); the
heartbeat reports what actually runs (Guidance.describe)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from fleetloop.proto.v1 import policy_pb2 as ppb

# Indicator names (configuration, heartbeat) <-> Policy.act's indicator (None / False / True).
INDICATORS: dict[str, Optional[bool]] = {"unset": None, "negative": False, "positive": True}
PUBLISHED = "published"   # actor setting: take what the version's manifest says
INDICATOR_SETTINGS = (PUBLISHED, *INDICATORS)
MAX_BETA = 10.0           # RECAP runs 1.5-2.5; far beyond that the guided action is noise
_NAMES = {v: k for k, v in INDICATORS.items()}
# Policy.act's indicator <-> the manifest's ImprovementIndicator
_CODES = {None: ppb.IMPROVEMENT_INDICATOR_UNSET, False: ppb.IMPROVEMENT_INDICATOR_NEGATIVE,
          True: ppb.IMPROVEMENT_INDICATOR_POSITIVE}
_BY_CODE = {v: k for k, v in _CODES.items()}


def indicator_name(indicator: Optional[bool]) -> str:
    return _NAMES[indicator]


def check_beta(beta: float, what: str = "guidance beta") -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {beta!r} is not a number") from None
    if not (math.isfinite(b) and 0.0 <= b <= MAX_BETA):
        raise ValueError(f"{what} {beta!r} is out of range: use a number from 0 to {MAX_BETA:g} "
                         "(1 = no guidance; RECAP publishes 1.5)")
    return b


@dataclass(frozen=True)
class Guidance:
    """indicator: None (unset), False (negative), True (positive). beta: guidance weight.
    overridden: which of the two a robot's setting replaced (for the heartbeat; not compared)."""
    indicator: Optional[bool] = None
    beta: float = 1.0
    overridden: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.indicator not in (None, False, True):
            raise ValueError(f"indicator must be None, False or True, not {self.indicator!r}")
        object.__setattr__(self, "beta", check_beta(self.beta))

    # ---- the signed manifest ---------------------------------------------------------------

    def to_proto(self) -> ppb.InferenceSettings:
        return ppb.InferenceSettings(indicator=_CODES[self.indicator], guidance_beta=self.beta)

    @classmethod
    def from_manifest(cls, manifest: ppb.PolicyManifest) -> "Guidance":
        """The version's published settings; a manifest without them (older learners, HG-DAgger)
        runs the plain policy. Out-of-range values raise ValueError (the version is refused)."""
        if not manifest.HasField("inference"):
            return cls()
        s = manifest.inference
        if s.indicator not in _BY_CODE:
            raise ValueError(f"policy {manifest.version}: unknown improvement indicator {s.indicator}")
        beta = s.guidance_beta if s.HasField("guidance_beta") else 1.0
        return cls(_BY_CODE[s.indicator], check_beta(beta, f"policy {manifest.version}: guidance beta"))

    # ---- a robot's settings ------------------------------------------------------------------

    def with_overrides(self, indicator: str = PUBLISHED, beta: Optional[float] = None) -> "Guidance":
        """indicator: "published" keeps this one, else unset/negative/positive; beta: None keeps."""
        if indicator not in INDICATOR_SETTINGS:
            raise ValueError(f"indicator {indicator!r}: accepted {', '.join(INDICATOR_SETTINGS)}")
        changed = []
        out = self
        if indicator != PUBLISHED:
            out, changed = replace(out, indicator=INDICATORS[indicator]), changed + ["indicator"]
        if beta is not None:
            out, changed = replace(out, beta=beta), changed + ["beta"]
        return replace(out, overridden=tuple(changed))

    def describe(self) -> dict:
        """For heartbeats, the registry's index and results: {"indicator", "beta", "overridden"}."""
        return {"indicator": indicator_name(self.indicator), "beta": self.beta, "overridden": list(self.overridden)}


__all__ = ["Guidance", "INDICATORS", "INDICATOR_SETTINGS", "PUBLISHED", "check_beta", "indicator_name"]
