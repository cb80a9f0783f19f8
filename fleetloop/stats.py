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


def rolling_rate(episodes: list[dict], window: int, key: str = "autonomous_success") -> list[tuple]:
    """Per episode (each has a wall time "t"): (t, rate, lo, hi, n) of `key` (autonomous success by
    default) over the last `window` episodes, lo/hi its Wilson 95% interval."""
    out = []
    for i in range(len(episodes)):
        w = episodes[max(0, i - window + 1): i + 1]
        s = sum(bool(e.get(key)) for e in w)
        lo, hi = wilson_interval(s, len(w))
        out.append((episodes[i]["t"], s / len(w), lo, hi, len(w)))
    return out


def time_to_success(episodes: list[dict], threshold: float = 0.8, window: int = 20,
                    key: str = "autonomous_success", hold: int = 0):
    """Wall time (s) when the rolling rate of `key` over the last `window` episodes first reaches
    `threshold` (window full), or None. (Default window 20: what `bench scaling` uses on the pooled
    fleet; the demo's per-task figures use fleetloop.demo.TIME_TO_WINDOW.)

    hold > 0 asks for a crossing that held up: one counts only if the `hold` episodes after it,
    fresh evidence disjoint from the window that crossed, are at `threshold` too. The first
    crossing of a noisy rolling rate is an optimistic figure (it is the maximum of many
    overlapping windows); a confirmed one is not, and its time is still the crossing's."""
    rolling = rolling_rate(episodes, window, key)
    for i, r in enumerate(rolling):
        if r[4] < window or r[1] < threshold:
            continue
        if hold <= 0:
            return r[0]
        after = episodes[i + 1: i + 1 + hold]
        if len(after) < hold:
            return None  # not confirmed (yet)
        if sum(bool(e.get(key)) for e in after) / hold >= threshold:
            return r[0]
    return None
