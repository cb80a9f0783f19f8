"""Small statistics helpers for reporting results honestly.

Success rates from a few dozen episodes are binomial estimates with wide uncertainty; every
success rate fleetloop prints comes with a Wilson score interval. Wilson rather than the normal
approximation (p +- z*sqrt(p(1-p)/n)) because it stays inside [0, 1] and is not degenerate at
0/n or n/n -- exactly the rates a good or a broken policy produces.
"""
from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (z=1.96: 95%). Returns (lo, hi);
    (0.0, 1.0) when n == 0 (no information)."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # Clamp away floating-point dust at the ends (e.g. 0/n giving lo = -1e-17).
    return max(0.0, center - half), min(1.0, center + half)
